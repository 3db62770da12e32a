"""GPU timing shared by the project's variants and the peers: CUDA-graph replay, median, L2 flushed.

Imports nothing of the project: the peer worker (tuner/peer_worker.py) loads this file by path in a process
where ``flash_mla`` is a peer's package, not this one.
"""

from __future__ import annotations


def bench_ms(fn, rep_ms: int = 200) -> float:
    """Median milliseconds; triton's do_bench times with CUDA events and flushes L2 between runs."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def capture_graph(fn):
    """``fn`` warmed up on a side stream (three calls), then captured in a CUDA graph; returned synchronised."""
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
    return graph


def graph_time_us(fn, rep_ms: int = 200) -> float:
    """Median time of ``fn`` replayed from a CUDA graph."""
    return bench_ms(capture_graph(fn).replay, rep_ms) * 1e3


def overhead_us(fn, calls: int = 50, rounds: int = 9, graph_calls: int = 20) -> dict:
    """Per-call times of ``fn`` called back to back (no L2 flush; medians over ``rounds``):

    - ``host``: wall time to issue ``calls`` calls without waiting for the GPU (the host side of one call:
      argument handling, selection, launches), as long as the launch queue does not fill up;
    - ``eager``: wall time until the GPU has finished those calls (what an eager caller sees);
    - ``graph``: GPU time of one call, from ``graph_calls`` calls captured in one CUDA graph.

    ``eager - graph`` is the host overhead a caller cannot hide behind the GPU.
    """
    import statistics
    import time
    import torch
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    host, eager = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) / calls * 1e6)
        eager.append((t2 - t0) / calls * 1e6)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(graph_calls):
            fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays = []
    for _ in range(rounds):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        replays.append(start.elapsed_time(end) * 1e3 / graph_calls)
    return {"host": statistics.median(host), "eager": statistics.median(eager), "graph": statistics.median(replays)}
