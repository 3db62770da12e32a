"""Per-kernel GPU time of chosen variants on chosen shapes (torch.profiler / CUPTI), beside the graph time.

Usage: python bench/profile_kernels.py KEY[,KEY...] "b,s_q,h_q,sk[,fixed][,causal]" ...
Prints, per (shape, variant): the CUDA-graph time and the mean duration of each kernel over 20 replays.
"""

import sys
from collections import defaultdict

import torch

from flash_mla.codegen.variant import full_space
from flash_mla.tuner.measure import Shape, check, graph_time_us, make_problem

keys = sys.argv[1].split(",")
variants = [v for k in keys for v in full_space() if v.key == k]
shapes = []
for spec in sys.argv[2:]:
    parts = spec.split(",")
    b, s_q, h_q, sk = (int(x) for x in parts[:4])
    shapes.append(Shape(b, s_q, h_q, sk, causal="causal" in parts, varlen="fixed" not in parts))

print(f"{'shape':28} {'variant':34} {'graph us':>8}  kernels (mean us)")
for i, shape in enumerate(shapes):
    problem = make_problem(shape, "bf16", 64, i)
    for v in variants:
        verdict, call = check(v, problem)
        if not verdict["ok"]:
            print(f"{shape.name:28} {v.key:34} FAILED check")
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
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                dur[e.name.split("(")[0].split("::")[-1]].append(e.device_time)
        ks = "  ".join(f"{n} {sum(t) / len(t):.1f}" for n, t in dur.items())
        print(f"{shape.name:28} {v.key:34} {us:8.1f}  {ks}", flush=True)
    del problem
