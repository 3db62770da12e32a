"""On-GPU measurement: ceilings, and CUDA-graph timing of one variant on one shape (checked first).

Byte and FLOP counts follow ANCHORS.md: bytes = b * (s_q*h_q*576*2 + mean_s_k*h_kv*576*2 + s_q*h_q*512*2),
FLOPs = 2 * (576 + 512) * attended (query row, key) pairs (causal counts only attended pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    b: int
    s_q: int
    h_q: int
    mean_sk: int
    h_kv: int = 1
    causal: bool = False
    varlen: bool = True

    @property
    def name(self) -> str:
        return (f"b{self.b} sq{self.s_q} hq{self.h_q} sk{self.mean_sk}"
                f"{'' if self.varlen else ' fixed'}{' causal' if self.causal else ''}")


def traffic_bytes(shape: Shape, seqlens: list[int], elem: int = 2) -> int:
    b = len(seqlens)
    mean_sk = sum(seqlens) / max(b, 1)
    return int(b * (shape.s_q * shape.h_q * 576 * elem + mean_sk * shape.h_kv * 576 * elem
                    + shape.s_q * shape.h_q * 512 * elem))


def flops(shape: Shape, seqlens: list[int]) -> int:
    pairs = 0
    for n in seqlens:
        for s in range(shape.s_q):
            pairs += max(0, n - (shape.s_q - 1 - s)) if shape.causal else n
    return 2 * (576 + 512) * shape.h_q * pairs


def _do_bench(fn, rep_ms: int = 200) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def ceilings() -> dict:
    """Device copy bandwidth (bytes read + written) and large bf16 GEMM rate, measured now."""
    n = 1 << 28                                   # 512 MiB of bf16 per side
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = _do_bench(lambda: b.copy_(a))
    copy_gbs = 2 * n * 2 / ms / 1e6
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    ms = _do_bench(lambda: x @ y)
    gemm_tflops = 2 * m ** 3 / ms / 1e9
    return {"copy_gbs": copy_gbs, "gemm_tflops": gemm_tflops}


def graph_time_us(fn) -> float:
    """Median time of ``fn`` replayed from a CUDA graph (do_bench flushes L2 between runs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _do_bench(graph.replay) * 1e3


def measure(variant, shape: Shape, seed: int = 0, page_size: int | None = None) -> dict:
    """Check ``variant`` on fresh random inputs of ``shape`` against the reference, then time it."""
    from flash_mla import runtime, scheduler
    from flash_mla.dispatch import library_for
    from flash_mla.reference import mla_decode_reference
    from flash_mla.testing import compare, make_paged_kv, varlen_seqlens

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[variant.dtype]
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = varlen_seqlens(shape.b, shape.mean_sk, shape.s_q, g) if shape.varlen else [shape.mean_sk] * shape.b
    q, k, bt, sl = make_paged_kv(shape.b, shape.s_q, shape.h_q, shape.h_kv, lens, variant.page_size, dtype,
                                 "cuda", g)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    parts = scheduler.num_sm_parts(num_sms, shape.s_q * shape.h_q // shape.h_kv, shape.h_kv)
    meta, splits = scheduler.schedule(sl, parts, overhead=variant.split_overhead)
    lib = library_for(variant)
    scale = 576 ** -0.5
    out = torch.full((shape.b, shape.s_q, shape.h_q, 512), float("nan"), dtype=dtype, device="cuda")
    lse = torch.full((shape.b, shape.h_q, shape.s_q), float("nan"), dtype=torch.float32, device="cuda")
    call = lambda: runtime.run_decode(lib, q, k, bt, sl, meta, splits, scale, shape.causal, out=out, lse=lse)
    call()
    torch.cuda.synchronize()
    ref_out, ref_lse = mla_decode_reference(q, k, bt, sl, 512, scale, shape.causal)
    verdict = compare(out, ref_out, lse, ref_lse, dtype)
    row = {"variant": variant.key, "shape": shape.name, "ok": verdict["ok"]}
    if not verdict["ok"]:
        return {**row, "error": {k: v for k, v in verdict.items() if k != "tolerances"}}
    us = graph_time_us(call)
    nbytes, nflop = traffic_bytes(shape, lens), flops(shape, lens)
    return {**row, "us": us, "gbs": nbytes / us / 1e3, "tflops": nflop / us / 1e6}
