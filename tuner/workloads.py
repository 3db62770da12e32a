"""Workloads the tuner optimises for, and the named suites (DeepSeek-V3 decode shapes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flash_mla.workload_key import WorkloadKey

from .measure import Shape


@dataclass(frozen=True)
class Workload:
    """One tuning target: the DB key fields plus the representative batch and mean length measured."""
    h_q: int
    s_q: int
    batch: int
    mean_sk: int
    h_kv: int = 1
    causal: bool = False
    dtype: str = "bf16"
    page_size: int = 64

    @property
    def workload_key(self) -> WorkloadKey:
        """The key its winner is stored under: the key of a call of this batch with its lengths as the hint."""
        return WorkloadKey.for_call(dtype=self.dtype, h_q=self.h_q, h_kv=self.h_kv, s_q=self.s_q,
                                    page_size=self.page_size, causal=self.causal, batch=self.batch,
                                    mean_seqlen=self.mean_sk)

    @property
    def key(self) -> str:
        return self.workload_key.canonical

    @property
    def shape(self) -> Shape:
        return Shape(self.batch, self.s_q, self.h_q, self.mean_sk, self.h_kv, self.causal)

    def db_fields(self) -> dict:
        """The workload part of the tuning-DB key (flash_mla.db)."""
        return self.workload_key.db_fields()

    def as_dict(self) -> dict:
        """Fields for a trial row: the measured batch and mean length, and the key's buckets."""
        k = self.workload_key
        return {**asdict(self), "batch_bucket": k.batch_bucket, "seqlen_bucket": k.seqlen_bucket}


BATCHES = (4, 32, 128)
SEQLENS = (2048, 8192)
MID_BATCHES = (16, 64)
MID_SEQLENS = (1024, 4096)

SUITES = {
    # DeepSeek-V3 decode without tensor parallelism: all 128 heads on one GPU
    "dsv3-tp1": [Workload(128, 1, b, sk) for b in BATCHES for sk in SEQLENS],
    # with TP8: 16 heads per GPU
    "dsv3-tp8": [Workload(16, 1, b, sk) for b in BATCHES for sk in SEQLENS],
    # multi-token prediction: two query tokens, causal
    "dsv3-mtp": [Workload(128, 2, b, sk, causal=True) for b in BATCHES for sk in SEQLENS],
    # the same without the causal mask (draft tokens verified as one block)
    "dsv3-mtp-nc": [Workload(128, 2, b, sk) for b in BATCHES for sk in SEQLENS],
    # small batches (latency-bound): TP8, TP4 and TP1 head counts at one and eight requests
    "dsv3-small": [Workload(h, 1, b, sk) for h in (16, 32, 128) for b in (1, 8) for sk in SEQLENS],
    # short contexts at one and eight requests, TP8 and TP4 head counts (where fixed per-call costs dominate)
    "dsv3-short": [Workload(h, 1, b, 1024) for h in (16, 32) for b in (1, 8)],
    # TP2 (64 heads per GPU) with three draft tokens: four query tokens, causal (256 q rows per kv head)
    "dsv3-tp2-mtp": [Workload(64, 4, b, sk, causal=True) for b in (64, 128) for sk in (2048, 8192)],
    # TP1 at few requests: one and sixteen, short to long contexts
    "dsv3-tp1-few": [Workload(128, 1, b, sk) for b, sk in ((1, 4096), (1, 32768), (16, 8192), (16, 32768))],
    # TP16 (8 heads per GPU), TP4 (32) and TP2 (64) at one query token
    "dsv3-tp16": [Workload(8, 1, b, sk) for b in BATCHES for sk in SEQLENS],
    "dsv3-tp4": [Workload(32, 1, b, sk) for b in BATCHES for sk in SEQLENS],
    # (dsv3-tp2 leaves out b32 s_k = 8192: a held-out workload of tuner/evaluate.py)
    "dsv3-tp2": [Workload(64, 1, b, sk) for b in BATCHES for sk in SEQLENS if (b, sk) != (32, 8192)],
    # TP8 over a float8 e4m3 KV cache (bf16 q)
    "dsv3-fp8": [Workload(16, 1, b, sk, dtype="bf16_e4m3") for b in BATCHES for sk in SEQLENS],
    # fp16 q and cache (models served in half precision): TP8 and TP1 head counts
    "dsv3-tp8-fp16": [Workload(16, 1, b, sk, dtype="fp16") for b in BATCHES for sk in SEQLENS],
    "dsv3-tp1-fp16": [Workload(128, 1, b, sk, dtype="fp16") for b in BATCHES for sk in SEQLENS],
    # TP8 with one and three draft tokens: s_q = 2 and 4, causal (32 and 64 q rows per kv head)
    "dsv3-tp8-mtp": [Workload(16, sq, b, sk, causal=True) for sq in (2, 4) for b in (32, 128) for sk in SEQLENS],
    # a paged cache of 32-token pages (bf16): TP8 and TP1 head counts
    "dsv3-tp8-p32": [Workload(16, 1, b, sk, page_size=32) for b in BATCHES for sk in SEQLENS],
    "dsv3-tp1-p32": [Workload(128, 1, b, sk, page_size=32) for b in BATCHES for sk in SEQLENS],
    # the four head counts at one query token between the other suites' points: b16 / b64, s_k 1024 / 4096 (the
    # batch and length buckets halfway, in log scale, between theirs), less the three whose key a held-out workload
    # of tuner/evaluate.py has (h_q=32 b16 s_k 4096 and b64 s_k 1024, h_q=128 b16 s_k 4096)
    "dsv3-mid": [Workload(h, 1, b, sk) for h in (16, 32, 64, 128) for b in MID_BATCHES for sk in MID_SEQLENS
                 if (h, b, sk) not in ((32, 16, 4096), (32, 64, 1024), (128, 16, 4096))],
}


def suite(name: str) -> list[Workload]:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name]
