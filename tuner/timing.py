"""GPU timing shared by the project's variants and the peers: CUDA-graph replay, median, L2 flushed.

Imports nothing of the project: the peer worker (tuner/peer_worker.py) loads this file by path in a process
where ``flash_mla`` is a peer's package, not this one.
"""

from __future__ import annotations


def bench_ms(fn, rep_ms: int = 200) -> float:
    """Median milliseconds; triton's do_bench times with CUDA events and flushes L2 between runs."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def graph_time_us(fn, rep_ms: int = 200) -> float:
    """Median time of ``fn`` replayed from a CUDA graph."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return bench_ms(graph.replay, rep_ms) * 1e3
