"""Per-kernel GPU time of chosen variants on chosen shapes (torch.profiler / CUPTI), beside the graph time.

Usage: python bench/profile_kernels.py [--once] KEY[,KEY...] "b,s_q,h_q,sk[,fixed][,causal]" ...
Prints, per (shape, variant): the CUDA-graph time and the mean duration of each kernel over 20 replays.
``--once``: only one checked call per (shape, variant), for ``ncu`` to profile.
"""

import re
import sys
from collections import defaultdict

import torch

from flash_mla.codegen.variant import variants_by_key
from flash_mla.tuner.measure import Shape, check, graph_time_us, make_problem

def kernel_label(name: str) -> str:
    """decode_kernel / combine_kernel from a demangled name such as
    ``void fmla::decode_kernel<fmla_bf16_..::Config>(CUtensorMap_st, FmlaParams)``."""
    m = re.search(r"(decode_kernel|combine_kernel)", name)
    return m.group(1) if m else name.split("(")[0]


once = sys.argv[1] == "--once"
args = sys.argv[2:] if once else sys.argv[1:]
variants = variants_by_key(args[0].split(","))
shapes = [Shape.from_spec(spec) for spec in args[1:]]

if not once:
    one = torch.zeros(1, device="cuda")
    print(f"graph replay of a one-element add: {graph_time_us(lambda: one.add_(1)):.1f} us")
print(f"{'shape':28} {'variant':34} {'graph us':>8}  kernels (mean us)")
for i, shape in enumerate(shapes):
    problems = {}
    for v in variants:
        if v.dtype not in problems:             # a float8 variant gets the same data quantised
            problems[v.dtype] = make_problem(shape, v.dtype, 64, i)
        problem = problems[v.dtype]
        verdict, call = check(v, problem)
        if not verdict["ok"]:
            print(f"{shape.name:28} {v.key:34} FAILED check")
            continue
        if once:
            print(f"{shape.name:28} {v.key:34} checked", flush=True)
            continue
        us = graph_time_us(call)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call()
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                g.replay()
            torch.cuda.synchronize()
        dur = defaultdict(list)
        evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        for e in evs:
            dur[kernel_label(e.name)].append(e.device_time)
        ks = "  ".join(f"{n} {sum(t) / len(t):.1f}" for n, t in dur.items())
        print(f"{shape.name:28} {v.key:34} {us:8.1f}  {ks}", flush=True)
        # timeline of the last replay: start offset and duration of each kernel (launch gaps show here)
        last = sorted(evs, key=lambda e: e.time_range.start)[-len(dur):]
        t0 = last[0].time_range.start
        print(" " * 30 + "last replay: " + "  ".join(
            f"{kernel_label(e.name)} @{e.time_range.start - t0:.1f}+{e.device_time:.1f}" for e in last))
    del problems, problem
