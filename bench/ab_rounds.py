"""Interleaved A/B timing of variant groups: each group's first variant is the baseline of the others.

Usage: python bench/ab_rounds.py [--rounds N] "A1,B1[,C1...];A2,B2..." "b,s_q,h_q,sk[,fixed][,causal]" ...
Per shape every variant is checked against the reference on the same random problem first (a failing one is not
timed), then timed with CUDA graphs (tuner.measure.graph_time_us: warm-up, L2 flushed, median) in N rounds, the
order of the variants rotated every round so that drift of the GPU's clocks does not favour one of them. Prints,
per (shape, variant), the time of every round, their median and the median's ratio to its group's baseline.
"""

import statistics
import sys

from flash_mla.codegen.variant import variants_by_key
from flash_mla.tuner.measure import Shape, check, graph_time_us, make_problem

args = sys.argv[1:]
rounds = 3
if args[:1] == ["--rounds"]:
    rounds, args = int(args[1]), args[2:]
if len(args) < 2:
    sys.exit(__doc__)
groups = [variants_by_key(g.split(",")) for g in args[0].split(";")]
shapes = [Shape.from_spec(spec) for spec in args[1:]]

print(f"{'shape':28} {'variant':42} " + " ".join(f"{'r' + str(r):>8}" for r in range(rounds))
      + f" {'median':>8} {'vs base':>8}")
for i, shape in enumerate(shapes):
    problems, calls = {}, {}
    for v in (v for g in groups for v in g):
        if (v.dtype, v.page_size) not in problems:
            problems[(v.dtype, v.page_size)] = make_problem(shape, v.dtype, v.page_size, i)
        verdict, call = check(v, problems[(v.dtype, v.page_size)])
        if verdict["ok"]:
            calls[v.key] = call
        else:
            print(f"{shape.name:28} {v.key:42} FAILED check {verdict}", flush=True)
    order = [v.key for g in groups for v in g if v.key in calls]
    times = {k: [] for k in order}
    for r in range(rounds):
        shift = r % max(1, len(order))
        for k in order[shift:] + order[:shift]:
            times[k].append(graph_time_us(calls[k]))
    for g in groups:
        base = statistics.median(times[g[0].key]) if g[0].key in times else None
        for v in g:
            if v.key not in times:
                continue
            med = statistics.median(times[v.key])
            ratio = f"{med / base:8.3f}" if base else f"{'':>8}"
            print(f"{shape.name:28} {v.key:42} " + " ".join(f"{t:8.1f}" for t in times[v.key])
                  + f" {med:8.1f} {ratio}", flush=True)
    del problems, calls
