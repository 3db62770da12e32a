"""Variant: every tunable knob of a generated decode kernel plus the problem traits it is built for.

A Variant is pure data. ``validate()`` rejects impossible combinations before anything is compiled,
``key`` names it stably (same knobs -> same key on every machine), and ``search_space()`` enumerates
the valid variants the tuner may try.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass

from ..scheduler import FIXED_OVERHEAD_BLOCKS, SplitPolicy
from ..constants import BLOCK_M, CONSUMER_REGS, HEAD_DIM, HEAD_DIM_V, PRODUCER_REGS, QREG_CHANNELS, SCHED_BLOCK_N
from ..workload_key import DTYPE_ELEMENTS, DTYPES
SMEM_LIMIT = 227 * 1024         # opt-in dynamic shared memory per block on SM90
REGS_PER_SM = 64 * 1024
MAX_REGS_PER_THREAD = 255
REG_MARGIN = 60        # registers beyond the accumulators a decode kernel needs (ptxas, nvcc 13.0)
QREG_MARGIN = 32       # the same for the qreg schedule's output warpgroups (no S, no softmax)
# Registers of the qreg schedules' warpgroup 0 beyond Q's register share and its S accumulator(s): the 64-token qreg
# variant (96 + 32) builds at the 168 cap without spilling.
QREG_S_MARGIN = 40

PAGE_SIZES = (64, 32)
# How split requests are merged. "separate": a plain second launch, one warp per q row walking every
# split. "wide_pdl": both kernels use programmatic dependent launch, the merge is spread over (request,
# row block, 64-channel slice) CTAs with the split weights computed once in shared memory.
MERGES = ("separate", "wide_pdl")
_MERGE_TAGS = {"separate": "sep", "wide_pdl": "wide"}
# Who computes S = Q K^T. "nsplit": every warpgroup computes block_n / num_warpgroups columns (wgmma N = 32,
# 16 or 8: each re-reads Q from shared memory), exchanging row maxima through shared memory. "full_wg":
# warpgroup 0 computes all block_n columns and the softmax, P goes into the stage's rope chunk, both
# warpgroups accumulate half of the output channels, on mbarriers (P V of tile j issued before Q K^T of
# tile j+1). "full_wg_ahead": the same with Q K^T of tile j+1 issued first, so its softmax overlaps P V.
# "swap16" / "swap32" (swapped operands, for up to 16 / 32 q rows per KV head): the 64 tokens of a tile are the
# wgmma M and the 16 / 32 q rows its N (S^T = K Q^T, O^T = V^T P^T), so no work goes to padding rows.
# "qreg" (three warpgroups): warpgroup 0 keeps 384 of Q's channels in registers and computes the whole S tile
# and its softmax; warpgroups 1 and 2 each accumulate half of the output. With less of Q in shared memory a
# deeper ring fits (five 32-token stages; templates/kernels/decode_qreg.cuh). "qreg_ahead": the same with Q K^T of
# tile j+1 issued before the softmax of tile j (two S accumulators in warpgroup 0), so the tensor cores are not idle
# through the softmax (H100 trace of qreg: idle ~1200 of ~3650 cycles per 64-token tile).
QKS = ("nsplit", "full_wg", "full_wg_ahead", "swap16", "swap32", "qreg", "qreg_ahead")
QREGS = ("qreg", "qreg_ahead")   # the three-warpgroup schedules with Q partly in registers
_QK_TAGS = {"nsplit": "", "full_wg": "_qf", "full_wg_ahead": "_qfa", "swap16": "_qs16", "swap32": "_qs32",
            "qreg": "_qr", "qreg_ahead": "_qra"}
# How a float8 tile reaches the bf16 tile the wgmmas read in the swapped schedules. "inline": every thread widens
# it at the top of the tile (one widened tile). "ahead": two widened tiles, warpgroup 1 widens tile j+1 while
# warpgroup 0 computes S of tile j (needs one stored stage to fit in shared memory).
WIDENS = ("inline", "ahead")
# CTAs per thread-block cluster along the row-block axis (grid z). 2: the two CTAs of a cluster compute two row
# blocks of the same (request, kv head) over the same work list and share every K tile: each CTA's producer loads
# half of a tile's TMA boxes and multicasts them into both CTAs' shared memory, so L2 serves each tile once per
# cluster instead of once per CTA (the row-block grid is rounded up to a multiple of 2; an odd last row block
# computes padding rows). qreg only.
CLUSTERS = (1, 2)
# How the producer loads a KV stage. "boxes": one TMA per 64-channel chunk (nine per 64-token bf16 tile, each a
# 64-row x 128-byte box). "tile": one 5-D TMA per stage (channel-in-chunk, row, chunk, kv head, page: the chunk axis
# strides 128 bytes inside a row) that lands the same [chunk][row][64] swizzled layout in one instruction, so a
# refill costs the producer one issue instead of nine. A stage must lie in one page (page size >= block_n), and
# the cache must be bf16 / fp16. "tile3" (full_wg and qreg schedules): the same tile in three 5-D TMAs of three chunks
# (192 channels) each, each landing on its own full barrier, so that Q K^T starts on the first third while the rest
# lands (FlashMLA waits per 64-channel chunk the same way). "tile9": nine parts of one chunk (64 channels) each, a
# full barrier per chunk as FlashMLA has them.
TMAS = ("boxes", "tile", "tile3", "tile9")
TILE_TMAS = ("tile", "tile3", "tile9")
#: tma value -> TMAs (each on its own full barrier) that load one KV stage (boxes: one barrier for the nine boxes)
TILE_PARTS = {"boxes": 1, "tile": 1, "tile3": 3, "tile9": 9}
# Where the full_wg schedule's warpgroup 0 reads its own P for O += P V. "smem": from the stage's rope chunk, like
# warpgroup 1 (its P V waits on a warpgroup barrier after the P stores). "regs": from the registers its softmax
# left P in (register-A wgmma; the softmax's accumulator layout is the A operand's, so P is not moved), with no
# barrier; only warpgroup 1 reads the stored copy.
PVS = ("smem", "regs")
# When the full_wg schedule's warpgroup 0 releases the stage of tile j. "behind_qk": it issues Q K^T of tile j+1 right
# behind its P V of tile j (waiting for tile j+1's bytes first) and releases the stage once that P V is done.
# "early": it waits for its P V of tile j and releases the stage before it waits for tile j+1, so the refill of the
# stage never waits for a late tile j+1.
RELEASES = ("behind_qk", "early")
# What warpgroup 1's P V of tile j overlaps in the full_wg schedule. "with_qk": warpgroup 0 publishes P at the end of
# its softmax, so warpgroup 1's P V runs beside warpgroup 0's P V and Q K^T of tile j+1, and the tensor cores idle
# through the softmax of tile j+1. "with_softmax": P of tile j is published once Q K^T of tile j+1 is done, so
# warpgroup 1's P V runs during that softmax (the stage is released later).
WG1_PVS = ("with_qk", "with_softmax")
# Who issues the full_wg schedule's KV loads. "inline": the first thread of warpgroup 1, between its own P V's, one
# request at a time (the ring is filled at each request's start and drains at its end, behind a CTA-wide barrier).
# "warpgroup": a third, producer warpgroup (setmaxnreg: PRODUCER_REGS for it, CONSUMER_REGS for the two consumer
# warpgroups) whose first thread walks the CTA's whole work list: it refills a stage the moment both consumers have
# released it, loads the next request's first tile and then its Q (once warpgroup 0's last Q K^T of the request is
# done) while the consumers still finish and store the request before, so a request boundary does not drain the ring.
PRODUCERS = ("inline", "warpgroup")
# Knobs of the full_wg schedule alone: the other schedules take only their first value, so enumerating them does not
# multiply the whole space.
FULL_WG_KNOBS = ("release", "wg1_pv", "producer")


class InvalidVariant(ValueError):
    """The knob combination cannot be built (shared memory, registers, divisibility)."""


@dataclass(frozen=True)
class Variant:
    # problem traits
    dtype: str = "bf16"
    page_size: int = 64
    # knobs
    block_n: int = 64           # KV tokens per pipeline stage (independent of page size)
    stages: int = 2             # KV stages in flight
    num_warpgroups: int = 2     # warpgroups splitting S columns and output channels
    split_overhead: int = FIXED_OVERHEAD_BLOCKS  # scheduler's fixed per-request cost in blocks: higher = fewer splits
    split_min_blocks: int = 1   # fewest work units (64-token blocks) a partition takes: higher = fewer splits
    combine_rows: int = 4       # q rows (one warp each) per combine CTA of the "separate" merge
    merge: str = "separate"     # merge path of split requests, one of MERGES
    qk: str = "nsplit"          # who computes S = Q K^T, one of QKS
    widen: str = "inline"       # float8 cache, swapped schedules: "ahead" = warpgroup 1 widens the next tile, one of WIDENS
    cluster: int = 1            # CTAs per cluster sharing each K tile by TMA multicast, one of CLUSTERS
    tma: str = "boxes"          # TMA issues per KV stage: one per 64-channel chunk, or one for the tile, one of TMAS
    pv: str = "smem"            # full_wg: warpgroup 0's own P for P V from shared memory or its registers, one of PVS
    release: str = "behind_qk"  # full_wg: warpgroup 0 releases a stage behind Q K^T of the next tile or early, one of RELEASES
    wg1_pv: str = "with_qk"     # full_wg: warpgroup 1's P V beside Q K^T of the next tile or the softmax, one of WG1_PVS
    producer: str = "inline"    # full_wg: who issues the KV loads (a consumer thread, a warpgroup), one of PRODUCERS
    trace: bool = False         # diagnostics (templates/kernels/trace.cuh): qreg: CTA (0,0,0) stamps each phase
                                # of its first tiles (bench/trace_qreg.py); nsplit: every CTA stamps its start-up
                                # and its merge CTAs their steps (bench/timeline.py)

    # -- identity -----------------------------------------------------------------------------
    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def key(self) -> str:
        """Readable, stable name; doubles as the C++ namespace of the generated code."""
        return self._name(launch_knobs=True)

    @property
    def build_key(self) -> str:
        """Name of the compiled binary: launch-time knobs (the split policy) do not change the code."""
        return self._name(launch_knobs=False)

    def _name(self, launch_knobs: bool) -> str:
        """The knobs' tags in one fixed order; the split policy's (``_o``, ``_b``) only with ``launch_knobs``."""
        overhead = f"_o{self.split_overhead}" if launch_knobs else ""
        return (f"{self.dtype}_p{self.page_size}_n{self.block_n}_s{self.stages}_w{self.num_warpgroups}"
                f"{overhead}_c{self.combine_rows}_m{_MERGE_TAGS.get(self.merge, self.merge)}"
                f"{self._qk_tag}{self._widen_tag}{self._cluster_tag}{self._tma_tag}{self._pv_tag}{self._order_tag}"
                f"{self._producer_tag}"
                f"{self._trace_tag}"
                f"{self._min_blocks_tag if launch_knobs else ''}")

    @property
    def _trace_tag(self) -> str:
        return "_trace" if self.trace else ""

    @property
    def _cluster_tag(self) -> str:
        return "" if self.cluster == 1 else f"_x{self.cluster}"

    @property
    def _tma_tag(self) -> str:
        if self.tma in TILE_TMAS:                     # tile, tile3, tile9 -> _tt, _tt3, _tt9
            return "_tt" + self.tma.removeprefix("tile")
        return "" if self.tma == "boxes" else "_t" + self.tma

    @property
    def _pv_tag(self) -> str:
        return "" if self.pv == "smem" else "_pr"

    @property
    def _order_tag(self) -> str:
        return ("_re" if self.release == "early" else "") + ("_ws" if self.wg1_pv == "with_softmax" else "")

    @property
    def _producer_tag(self) -> str:
        return "_pw" if self.producer == "warpgroup" else ""

    @property
    def _widen_tag(self) -> str:
        return "" if self.widen == "inline" else "_wa"

    @property
    def _qk_tag(self) -> str:
        return _QK_TAGS.get(self.qk, "_q" + self.qk)

    @property
    def _min_blocks_tag(self) -> str:
        return "" if self.split_min_blocks == 1 else f"_b{self.split_min_blocks}"

    @property
    def split_policy(self) -> SplitPolicy:
        """What ``get_mla_metadata`` needs from this variant: the scheduler's launch-time knobs."""
        return SplitPolicy(self.split_overhead, self.split_min_blocks)

    def compile_knobs(self) -> dict:
        d = self.as_dict()
        d.pop("split_overhead")
        d.pop("split_min_blocks")
        return d

    @property
    def digest(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> "Variant":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown Variant fields: {sorted(unknown)}")
        return cls(**d)

    @property
    def q_dtype(self) -> str:
        """Element of q and the output ("bf16", "fp16")."""
        return DTYPE_ELEMENTS[self.dtype][0]

    @property
    def kv_dtype(self) -> str:
        """Element of the KV cache ("bf16", "fp16", "e4m3")."""
        return DTYPE_ELEMENTS[self.dtype][1]

    @property
    def kv_fp8(self) -> bool:
        return self.kv_dtype == "e4m3"

    @property
    def rows_per_cta(self) -> int:
        """q rows one CTA computes: 64 (the wgmma M), or the swapped schedules' N."""
        return int(self.qk[4:]) if self.qk.startswith("swap") else BLOCK_M

    # -- resources ------------------------------------------------------------------------------
    @property
    def tile_parts(self) -> int:
        """TMAs (each on its own full barrier) that load one KV stage with tma = tile / tile3 / tile9."""
        return TILE_PARTS.get(self.tma, 1)

    @property
    def threads(self) -> int:
        """Threads of a decode CTA: the computing warpgroups, plus the producer warpgroup (producer = warpgroup)."""
        return 128 * (self.num_warpgroups + (self.producer == "warpgroup"))

    @property
    def reg_cap(self) -> int:
        """Registers a thread of a computing warpgroup may use: the launch's share of the register file, or with a
        producer warpgroup what setmaxnreg gives the consumers."""
        if self.producer == "warpgroup":
            return CONSUMER_REGS
        return min(MAX_REGS_PER_THREAD, REGS_PER_SM // self.threads)

    def smem_bytes(self) -> int:
        """Shared memory the decode kernel asks for, mirroring the SharedStorage structs of
        templates/kernels/decode_kernel.cuh."""
        el = 2
        # Q in shared memory: all its channels, or qreg's share (the rest is in warpgroup 0's registers)
        q = (BLOCK_M * (HEAD_DIM - QREG_CHANNELS) if self.qk in QREGS else self.rows_per_cta * HEAD_DIM) * el
        k = self.stages * self.block_n * HEAD_DIM * el
        if self.kv_fp8:                         # the stored (1-byte) ring + one (two: widen ahead) widened bf16 tile(s)
            k = self.stages * self.block_n * HEAD_DIM + (1 + (self.widen == "ahead")) * self.block_n * HEAD_DIM * el
        if self.qk.startswith("swap"):          # SharedStorageSwap: P^T, (unused 128 B ring for bf16), exchanges
            n = self.rows_per_cta
            p = n * self.block_n * el
            tail = (0 if self.kv_fp8 else 128) + (4 * n + 3 * 2 * n) * 4 + 8 * self.stages
            return -(-(q + k + p + tail) // 1024) * 1024 + 1024
        if self.qk == "nsplit":
            p = BLOCK_M * self.block_n * el
            tail = 2 * self.num_warpgroups * BLOCK_M * 4 + 8 * self.stages + 8          # + the Q barrier
        else:                                   # full_wg, qreg: P lives in each stage's rope chunk
            p = 0
            tail = 2 * self.stages * BLOCK_M * 4 + (2 + self.tile_parts) * 8 * self.stages   # alpha, row_inv, barriers
            tail += 16 if self.qk not in QREGS else 0                     # full_wg: the Q barriers (full, empty)
        tail = -(-tail // 1024) * 1024          # struct is 1024-aligned
        return q + k + p + tail + 1024          # + alignment slack of the dynamic base

    def accumulator_regs(self) -> int:
        """fp32 registers per thread held by the O and S accumulators (qreg: by its output warpgroups)."""
        if self.qk in QREGS:                    # the larger role: an output warpgroup's half of O
            return BLOCK_M * (HEAD_DIM_V // 2) // 128
        if self.qk.startswith("swap"):          # O^T: this warpgroup's channels x N; S^T: 64 tokens x N
            n = self.rows_per_cta
            return (HEAD_DIM_V // self.num_warpgroups) * n // 128 + self.block_n * n // 128
        o = BLOCK_M * (HEAD_DIM_V // self.num_warpgroups) // 128
        s = BLOCK_M * (self.block_n // (1 if self.qk != "nsplit" else self.num_warpgroups)) // 128
        return o + s

    # -- validity -------------------------------------------------------------------------------
    def validate(self) -> "Variant":
        def bad(msg):
            raise InvalidVariant(f"{self.key}: {msg}")

        if self.dtype not in DTYPES:
            bad(f"dtype must be one of {DTYPES}")
        if self.page_size not in PAGE_SIZES:
            bad(f"page_size must be one of {PAGE_SIZES}")
        if self.block_n not in (32, 64):
            bad("block_n must be 32 or 64")
        if SCHED_BLOCK_N % self.block_n:
            bad(f"block_n must divide the scheduler block ({SCHED_BLOCK_N})")
        box = min(self.block_n, self.page_size)
        if self.block_n % box or self.page_size % box or box % 8:
            bad("page size and block_n must nest in multiples of 8 rows")
        if self.num_warpgroups not in (1, 2, 3, 4):
            bad("num_warpgroups must be 1, 2, 3 or 4")
        if (self.num_warpgroups == 3) != (self.qk in QREGS):
            bad(f"qk={self.qk if self.qk in QREGS else 'qreg'} and three warpgroups go together (one computes S from "
                "Q in registers, two hold the output)")
        if self.qk in QREGS and self.kv_fp8:
            bad(f"qk={self.qk} reads the K tile as it lands: the cache must be bf16 / fp16")
        if self.qk in QREGS and self.block_n == 64 and self.stages == 1:
            bad(f"qk={self.qk} with one 64-token stage spills (ptxas, nvcc 13.0: 24 B stored at the 168-register cap)")
        if self.qk == "qreg_ahead" and self.stages < 2:
            bad("qk=qreg_ahead reads tile j+1 while tile j is in use: stages must be >= 2")
        if self.num_warpgroups == 1:
            bad("one warpgroup would hold a 64x512 fp32 accumulator (256 registers/thread)")
        if self.qk not in QKS:
            bad(f"qk must be one of {QKS}")
        if self.kv_fp8 and self.qk not in ("nsplit", "swap16", "swap32"):
            bad(f"a float8 KV cache is widened in the nsplit and swapped schedules only, got qk={self.qk}")
        if self.widen not in WIDENS:
            bad(f"widen must be one of {WIDENS}")
        if self.widen == "ahead" and not (self.kv_fp8 and self.qk.startswith("swap") and self.stages == 1):
            bad("widen=ahead (two widened tiles, warpgroup 1 widening the next) needs a float8 cache, a swapped "
                "schedule and one stored stage")
        if self.qk.startswith("swap") and (self.block_n != 64 or self.num_warpgroups != 2):
            bad(f"qk={self.qk}: a tile's 64 tokens are warpgroup 0's wgmma M: block_n must be 64, num_warpgroups 2")
        if self.qk in ("full_wg", "full_wg_ahead") and self.num_warpgroups != 2:
            bad(f"qk={self.qk} has warpgroup 0 compute S and two warpgroups share the output: num_warpgroups must be 2")
        if self.qk in ("full_wg", "full_wg_ahead") and self.stages < 2:
            bad(f"qk={self.qk} keeps two tiles in use at once (P V of one, Q K^T of the next): stages must be >= 2")
        if self.qk == "nsplit" and (self.block_n // self.num_warpgroups) % 8:
            bad("S columns per warpgroup (block_n / num_warpgroups) must be a multiple of 8 (wgmma N)")
        if self.stages < 1:
            bad("stages must be >= 1")
        if self.smem_bytes() > SMEM_LIMIT:
            bad(f"needs {self.smem_bytes()} B of shared memory > {SMEM_LIMIT}")
        reg_cap = self.reg_cap
        # Accumulators plus the addressing/softmax state must fit under the cap. The margin is measured:
        # 4 warpgroups (cap 128) with block_n=64 (72 accumulator regs) spilled 544 B, block_n=32 (68) none.
        # qreg's output warpgroups hold no S and run no softmax: their margin is smaller (QREG_MARGIN).
        if self.accumulator_regs() + (REG_MARGIN if self.qk not in QREGS else QREG_MARGIN) > reg_cap:
            bad(f"accumulators need {self.accumulator_regs()} regs/thread, cap is {reg_cap}")
        if self.qk in QREGS:                    # warpgroup 0: Q's register share (bf16 pairs) and 1 or 2 S tiles
            s_regs = (QREG_CHANNELS * BLOCK_M // 2 // 128
                      + (2 if self.qk == "qreg_ahead" else 1) * BLOCK_M * self.block_n // 128)
            if s_regs + QREG_S_MARGIN > reg_cap:
                bad(f"warpgroup 0 needs {s_regs} regs/thread for Q and S + {QREG_S_MARGIN}, cap is {reg_cap}")
        if self.cluster not in CLUSTERS:
            bad(f"cluster must be one of {CLUSTERS}")
        if self.cluster > 1 and self.qk not in QREGS + ("full_wg",):
            bad("cluster > 1 (K tiles multicast to the CTAs of a cluster) is built for the qreg and full_wg schedules "
                "only")
        if self.tma not in TMAS:
            bad(f"tma must be one of {TMAS}")
        if self.tma in TILE_TMAS and (self.kv_fp8 or self.page_size < self.block_n):
            bad(f"tma={self.tma} loads a stage with 5-D TMAs: the stage must lie in one page (page_size >= block_n) of "
                "a bf16 / fp16 cache")
        if self.tile_parts > 1 and self.qk not in QREGS + ("full_wg", "full_wg_ahead"):
            bad(f"tma={self.tma} (a full barrier per part of the tile, Q K^T starting on the first) is built for the "
                "full_wg and qreg schedules only")
        if self.tma == "tile9" and self.qk in QREGS:
            bad("tma=tile9 in the qreg schedules spills (warpgroup 0 at its 168-register cap: 32 B with 64-token "
                "stages in clusters of two); use tile3 there")
        if self.pv not in PVS:
            bad(f"pv must be one of {PVS}")
        if self.pv == "regs" and self.qk != "full_wg":
            bad("pv=regs: warpgroup 0 reads its own P from registers in the full_wg schedule only (qreg's warpgroup 0 "
                "computes no P V; full_wg_ahead rewrites P before the previous P V is done)")
        if self.release not in RELEASES:
            bad(f"release must be one of {RELEASES}")
        if self.wg1_pv not in WG1_PVS:
            bad(f"wg1_pv must be one of {WG1_PVS}")
        if (self.release, self.wg1_pv) != (RELEASES[0], WG1_PVS[0]) and self.qk != "full_wg":
            bad(f"release={self.release} / wg1_pv={self.wg1_pv} reorder the full_wg schedule's warpgroup 0 only")
        if self.producer not in PRODUCERS:
            bad(f"producer must be one of {PRODUCERS}")
        if self.producer == "warpgroup" and (self.qk != "full_wg" or self.tma not in TILE_TMAS):
            bad("producer=warpgroup (a producer warpgroup walking the work list) is built for the full_wg schedule "
                f"with a stage per 5-D TMA load (tma in {TILE_TMAS}), got qk={self.qk}, tma={self.tma}")
        if self.trace and self.qk not in QREGS + ("nsplit",):
            bad("trace (time stamps) is built into the qreg and nsplit schedules only")
        if self.split_overhead < 1:
            bad("split_overhead must be >= 1")
        if self.split_min_blocks < 1:
            bad("split_min_blocks must be >= 1")
        if self.combine_rows not in (1, 2, 4, 8):
            bad("combine_rows must be 1, 2, 4 or 8")
        if self.merge not in MERGES:
            bad(f"merge must be one of {MERGES}")
        if self.merge != "separate" and self.combine_rows != 4:
            bad("combine_rows shapes only the separate merge kernel: keep it at 4 for other merges")
        return self

    def is_valid(self) -> bool:
        try:
            self.validate()
            return True
        except InvalidVariant:
            return False


# Knob values the search explores. Problem traits (dtype, page size) are fixed per search.
KNOBS = {
    # First, so that a study's local step tries the incumbent with the other load path before anything else: one
    # 5-D TMA per stage against nine 64-channel boxes, interleaved A/B on the H100
    # (bench/results/h100-tma-tile-2026-11-24.txt): 2-5% faster for the two-warpgroup nsplit schedule and for qreg
    # in clusters of two at h_q >= 64; -0.7% to +1.4% on memory-bound and small-batch shapes; -2.1% to +3.1% for
    # qreg without clusters.
    # tile3 against tile, interleaved A/B on the H100 (bench/results/h100-tile3-2026-11-25.txt): full_wg 1.1-5.1%
    # faster on five h_q >= 64 shapes, in clusters of two or not; qreg -0.5% to +2.4%.
    # tile9 (a barrier per 64-channel chunk) is built and checked but not searched until measured against tile3.
    "tma": ("boxes", "tile", "tile3"),
    # Second and third, so that the local step tries the other sharing of K tiles and P source early (from a
    # qreg winner, pv = regs reaches the full_wg schedule in clusters of two).
    # cluster = 2 (qreg and full_wg: two row blocks share each K tile by TMA multicast): interleaved, repeated A/B against
    # cluster = 1 on the H100 (bench/results/h100-qreg-halves-2026-11-24.txt section 5): 3-8% faster at h_q = 128
    # with s_q = 1 (b16 s_k 4096 / 32768 fixed, b128 s_k 8192, b132 s_k 6000 fixed), 1.5-3% slower at s_q = 2 causal
    # and s_q = 4 h_q = 64.
    "cluster": (1, 2),
    # pv = regs (full_wg only): interleaved A/B on the H100 (bench/results/h100-full-wg-cluster-pv-2026-11-25.txt):
    # 64-token tiles -3.4% to +0.4% against pv = smem on six h_q >= 64 shapes, 32-token ones +0.6% to +6%; the
    # better one depends on the shape, so both are searched.
    "pv": PVS,
    # release (full_wg), interleaved A/B on the H100 (bench/results/h100-release-order-2026-11-25.txt): early is 1-8%
    # faster with 64-token stages at h_q >= 64 (b16 s_k 4096 / 32768 fixed, s_q = 2 and 4 causal), 0.5-3% slower
    # with three 32-token stages and on memory-bound shapes: both are searched. wg1_pv = with_softmax was 7-18% slower
    # on every shape measured (the refill of the stage comes too late): built and checked, run only when named.
    # producer = warpgroup (full_wg, bench/results/h100-producer-warpgroup-2026-11-25.txt): 0.98-1.04x the inline
    # producer's time on five h_q >= 64 shapes in two runs: built and checked, run only when named.
    "release": RELEASES,
    "block_n": (32, 64),
    "stages": (1, 2, 3, 4),
    "num_warpgroups": (2, 3, 4),            # 3: the qreg schedule only
    "split_overhead": (2, 5),
    # Above 1 (4, 16) it was slower on every shape measured (H100, b1-16, h_q 16-128, s_k 1024-4096 fixed and
    # varlen): one CTA takes ~1.8 us per 64-token tile at 64 padded rows, more than a merge of more
    # splits costs. The knob stays (get_mla_metadata, variant keys), the search leaves it at 1.
    "split_min_blocks": (1,),
    "merge": MERGES,
    # full_wg passes the reference check and compute-sanitizer's racecheck (H100, 1 / row sum published with
    # the last tile's P under its P-ready barrier). full_wg_ahead shares that code but has not been through
    # racecheck on a GPU yet: it runs only when named (--variants, variant=).
    # swap16 / swap32 pass the sampled matrix (H100, bf16 and float8 caches); on a float8 cache swap16 is up to
    # 15% faster than nsplit at h_q = 16 (bench/results/h100-fp8-kv-cache-2026-11-23.txt).
    # qreg passes the sampled matrix (H100, n64 s2 and n32 s5); n64 s2 is 6-8% faster than nsplit on h_q >= 64.
    "qk": ("nsplit", "full_wg", "swap16", "swap32", "qreg"),
}


def search_space(dtype: str = "bf16", page_size: int = 64, knobs: dict | None = None) -> list[Variant]:
    """All valid variants for one (dtype, page size), in a deterministic order."""
    knobs = knobs or KNOBS
    names = [n for n in knobs if n not in FULL_WG_KNOBS]
    extra = [n for n in knobs if n in FULL_WG_KNOBS]
    out = []
    for values in itertools.product(*(knobs[n] for n in names)):
        v = Variant(dtype=dtype, page_size=page_size, **dict(zip(names, values)))
        if not v.is_valid():
            continue
        if v.qk != "full_wg" or not extra:
            out.append(v)
            continue
        for more in itertools.product(*(knobs[n] for n in extra)):   # the full_wg schedule's own knobs
            w = dataclasses.replace(v, **dict(zip(extra, more)))
            if w.is_valid():
                out.append(w)
    return out


# Every knob value a variant may take, searched or not (variants_by_key resolves all of them).
# widen=ahead passes the sampled matrix but was slower than the searched float8 winner on every memory-bound
# shape measured (H100: 816 us against 727 at b128 h_q=16 s_k=16384; its single stored stage keeps one tile
# load in flight): it runs when named.
ALL_KNOBS = {**KNOBS, "qk": QKS, "stages": (1, 2, 3, 4, 5), "num_warpgroups": (2, 3, 4), "split_min_blocks": (1, 4, 16), "widen": WIDENS,
             "cluster": CLUSTERS, "pv": PVS, "tma": TMAS, "wg1_pv": WG1_PVS,
             "producer": PRODUCERS}


def full_space(knobs: dict | None = None) -> list[Variant]:
    """Every valid variant the tuner searches (``knobs=ALL_KNOBS``: every valid variant) over every
    supported dtype and page size."""
    return [v for d in DTYPES for ps in PAGE_SIZES for v in search_space(d, ps, knobs)]


def variants_by_key(keys) -> list[Variant]:
    """The variants of the full space with these keys, in the given order; ValueError names unknown keys."""
    by_key = {v.key: v for v in full_space(ALL_KNOBS)}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ValueError(f"unknown variant keys: {missing}")
    return [by_key[k] for k in keys]


def default_variant(dtype: str = "bf16", page_size: int = 64) -> Variant:
    """The variant used where the tuning database has no entry for this GPU and shape.

    Its merge path is "wide_pdl" (measured on the H100 at or ahead of "separate" on the small-batch shapes,
    within noise on large batches). The dataclass default stays "separate", so rows written before the knob
    existed keep meaning the kernel they measured.
    """
    return Variant(dtype=dtype, page_size=page_size, merge="wide_pdl").validate()
