"""Measurement core shared by the benchmark and the tuner: inputs, reference check, CUDA-graph timing.

Byte and FLOP counts follow ANCHORS.md: bytes = b * (s_q*h_q*576*2 + mean_s_k*h_kv*576*2 + s_q*h_q*512*2),
FLOPs = 2 * (576 + 512) * h_q * attended (query row, key) pairs; causal counts only attended pairs.
Only the accounting (pure Python) runs without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from flash_mla.constants import HEAD_DIM, HEAD_DIM_V

from .timing import bench_ms, graph_time_us

SCALE = HEAD_DIM ** -0.5


@dataclass(frozen=True)
class Shape:
    b: int
    s_q: int
    h_q: int
    mean_sk: int
    h_kv: int = 1
    causal: bool = False
    varlen: bool = True

    @classmethod
    def from_spec(cls, spec: str) -> "Shape":
        """The bench scripts' shape argument ``"b,s_q,h_q,sk[,fixed][,causal]"`` (one KV head)."""
        parts = spec.split(",")
        b, s_q, h_q, sk = (int(x) for x in parts[:4])
        return cls(b, s_q, h_q, sk, causal="causal" in parts, varlen="fixed" not in parts)

    @property
    def name(self) -> str:
        return (f"b{self.b} sq{self.s_q} hq{self.h_q} sk{self.mean_sk}"
                f"{'' if self.varlen else ' fixed'}{' causal' if self.causal else ''}")

    @property
    def regime(self) -> str:
        """Which ceiling binds: arithmetic intensity ~ 2*h_q*s_q FLOP/byte against ~150 on the H100."""
        return "compute" if self.h_q * self.s_q // self.h_kv >= 128 else "memory"


def traffic_bytes(shape: Shape, seqlens: list[int], elem: int = 2, kv_elem: int | None = None) -> int:
    """Fewest bytes a decode step must move: q and the KV cache read once, out written once (``kv_elem``:
    bytes per cache element, default ``elem``)."""
    b = len(seqlens)
    mean_sk = sum(seqlens) / max(b, 1)
    kv_elem = elem if kv_elem is None else kv_elem
    return int(b * (shape.s_q * shape.h_q * HEAD_DIM * elem + mean_sk * shape.h_kv * HEAD_DIM * kv_elem
                    + shape.s_q * shape.h_q * HEAD_DIM_V * elem))


def attended_pairs(shape: Shape, seqlens: list[int]) -> int:
    pairs = 0
    for n in seqlens:
        for s in range(shape.s_q):
            pairs += max(0, n - (shape.s_q - 1 - s)) if shape.causal else n
    return pairs


def flops(shape: Shape, seqlens: list[int]) -> int:
    return 2 * (HEAD_DIM + HEAD_DIM_V) * shape.h_q * attended_pairs(shape, seqlens)


# ---------------------------------------------------------------------------------------------- GPU


def ceilings() -> dict:
    """Device copy bandwidth (bytes read + written) and large bf16 GEMM rate, measured now."""
    import torch
    n = 1 << 28                                   # 512 MiB of bf16 per side
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    copy_gbs = 2 * n * 2 / ms / 1e6
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    ms = bench_ms(lambda: x @ y)
    return {"copy_gbs": copy_gbs, "gemm_tflops": 2 * m ** 3 / ms / 1e9,
            "device": torch.cuda.get_device_name()}


def read_floor_us(nbytes: int, rep_ms: int = 100) -> float:
    """Time of a graph-replayed ``torch.sum`` over ``nbytes`` bytes of random bf16: the read floor of a shape."""
    import torch
    buf = torch.empty(max(nbytes // 2, 1), dtype=torch.bfloat16, device="cuda").uniform_(-1, 1)
    out = torch.empty((), dtype=torch.float32, device="cuda")
    return graph_time_us(lambda: read_all(buf, out), rep_ms)


def read_all(buf, out):
    """One pass over ``buf`` into the 0-dim fp32 ``out`` (no allocation, so it replays from a graph)."""
    import torch
    return torch.sum(buf, dim=0, dtype=torch.float32, out=out)


def floor_us(read_us: float, nflop: int, gemm_tflops: float) -> float:
    """What no kernel can beat on this device: the read floor or the FLOPs at the measured GEMM rate."""
    return max(read_us, nflop / (gemm_tflops * 1e6))


@dataclass
class Problem:
    """Fresh random inputs of one shape on the GPU, with the reference answer computed once."""
    shape: Shape
    dtype: str
    page_size: int
    seqlens: list
    q: object
    k_cache: object
    block_table: object
    cache_seqlens: object
    ref_out: object = None
    ref_lse: object = None
    k_scale: object = None       # a float8 cache's dequantisation scale: one-element float32 tensor, or None

    @property
    def nbytes(self) -> int:
        return traffic_bytes(self.shape, self.seqlens, kv_elem=self.k_cache.element_size())

    @property
    def nflop(self) -> int:
        return flops(self.shape, self.seqlens)


def make_problem(shape: Shape, dtype: str = "bf16", page_size: int = 64, seed: int = 0) -> Problem:
    import torch
    from flash_mla.reference import mla_decode_reference
    from flash_mla.testing import varlen_seqlens
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = varlen_seqlens(shape.b, shape.mean_sk, shape.s_q, g) if shape.varlen else [shape.mean_sk] * shape.b
    q, k, bt, sl, k_scale = make_typed_inputs(dtype, shape.b, shape.s_q, shape.h_q, shape.h_kv, lens, page_size,
                                              "cuda", g)
    ref_out, ref_lse = mla_decode_reference(q, k, bt, sl, HEAD_DIM_V, SCALE, shape.causal, k_scale=k_scale)
    return Problem(shape, dtype, page_size, lens, q, k, bt, sl, ref_out, ref_lse, k_scale)


def make_typed_inputs(dtype: str, b, s_q, h_q, h_kv, lens, page_size, device, generator):
    """``flash_mla.testing.make_paged_kv`` inputs for a variant dtype name: ``(q, k_cache, block_table,
    cache_seqlens, k_scale)``. A float8 cache is the bf16 one quantised per tensor
    (``flash_mla.testing.quantize_e4m3``, NaN poison kept), with ``k_scale`` a one-element float32 tensor on
    ``device``; otherwise ``k_scale`` is None."""
    import torch
    from flash_mla.testing import make_paged_kv, quantize_e4m3
    from flash_mla.workload_key import DTYPE_ELEMENTS
    q_el, kv_el = DTYPE_ELEMENTS[dtype]
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[q_el]
    q, k, bt, sl = make_paged_kv(b, s_q, h_q, h_kv, lens, page_size, tdtype, device, generator)
    k_scale = None
    if kv_el == "e4m3":
        k, scale = quantize_e4m3(k)
        k_scale = torch.tensor([scale], dtype=torch.float32, device=device)
    return q, k, bt, sl, k_scale


def _rates(problem: Problem, us: float) -> dict:
    return {"us": us, "gbs": problem.nbytes / us / 1e3, "tflops": problem.nflop / us / 1e6}


def check(variant, problem: Problem):
    """Run ``variant`` once on ``problem`` into NaN-poisoned outputs and compare with the reference.

    Returns ``(verdict, call)``: the metrics of flash_mla.testing.compare (``verdict["ok"]``) and a
    closure that repeats the same launch (for timing). No time may be taken unless the verdict is ok.
    """
    import torch
    from flash_mla import runtime, scheduler
    from flash_mla.dispatch import library_for
    from flash_mla.testing import compare
    shape = problem.shape
    if (variant.dtype, variant.page_size) != (problem.dtype, problem.page_size):
        raise ValueError(f"variant {variant.key} does not fit a {problem.dtype}/page {problem.page_size} problem")
    num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    parts = scheduler.num_sm_parts(num_sms, shape.s_q * shape.h_q // shape.h_kv, shape.h_kv)
    meta, splits = scheduler.schedule(problem.cache_seqlens, parts, overhead=variant.split_overhead,
                                      min_payload=variant.split_min_blocks)
    lib = library_for(variant)
    out = torch.full_like(problem.ref_out, float("nan"))
    lse = torch.full_like(problem.ref_lse, float("nan"))

    def call():
        runtime.run_decode(lib, problem.q, problem.k_cache, problem.block_table, problem.cache_seqlens, meta,
                           splits, SCALE, shape.causal, out=out, lse=lse, k_scale=problem.k_scale)

    call()
    torch.cuda.synchronize()
    verdict = compare(out, problem.ref_out, lse, problem.ref_lse, problem.q.dtype)
    verdict.pop("tolerances", None)
    return verdict, call


def measure_variant(variant, problem: Problem, rep_ms: int = 200) -> dict:
    """Reference check first, then CUDA-graph timing. A variant that fails the check has no time."""
    verdict, call = check(variant, problem)
    if not verdict["ok"]:
        return {"ok": False, "error": verdict}
    return {"ok": True, **_rates(problem, graph_time_us(call, rep_ms))}


def measure_reference(problem: Problem, rep_ms: int = 100) -> dict:
    """The torch reference on the GPU as the naive baseline (eager: it reads lengths on the host)."""
    from flash_mla.reference import mla_decode_reference
    shape = problem.shape
    ms = bench_ms(lambda: mla_decode_reference(problem.q, problem.k_cache, problem.block_table,
                                                problem.cache_seqlens, HEAD_DIM_V, SCALE, shape.causal), rep_ms)
    return {"ok": True, **_rates(problem, ms * 1e3)}
