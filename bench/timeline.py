"""Start-up timeline of the nsplit schedule and its merge, from a trace build (templates/kernels/trace.cuh).

Usage: python bench/timeline.py "b,s_q,h_q,sk[,fixed][,causal]" [KEY] [--replays N]
Builds KEY (default: the bf16 / page-64 default variant) with trace=True, checks one call against the reference,
then replays the call from a CUDA graph N times (default 20), L2 flushed before each, and reads back after each
replay the %globaltimer stamps that thread 0 of every CTA wrote. Prints, per event, the median over replays of the
earliest, median and latest CTA, in microseconds after the earliest decode CTA's entry:
  decode CTA: entry, schedule row read, the first request's span known and its Q load issued, its Q landed and the
  ring's loads issued, its first tile landed, its tiles computed, its output stored (issued), every request done;
  merge CTA (wide_pdl): entry, decode grid complete (griddepcontrol.wait), split weights computed, output stored.
Then, from the per-SM clock, the median cycles of each decode step (event to event within a CTA).
"""

import argparse
import ctypes
import dataclasses
import statistics
import sys

import torch

from flash_mla.codegen.variant import default_variant, variants_by_key
from flash_mla.dispatch import library_for
from flash_mla.tuner.measure import Shape, check, make_problem
from flash_mla.tuner.timing import capture_graph

cli = argparse.ArgumentParser(description="Start-up timeline of a trace build of the nsplit schedule.")
cli.add_argument("shape", help="b,s_q,h_q,sk[,fixed][,causal]")
cli.add_argument("key", nargs="?", help="variant key (default: the bf16 / page-64 default variant)")
cli.add_argument("--replays", type=int, default=20)
args = cli.parse_args()
replays = args.replays
shape = Shape.from_spec(args.shape)
base = variants_by_key([args.key])[0] if args.key else default_variant()
v = dataclasses.replace(base, trace=True).validate()
problem = make_problem(shape, v.dtype, v.page_size, 0)
lib = ctypes.CDLL(str(library_for(v).path))      # the same loaded module as the runtime's (dlopen)
lib.fmla_trace_read.argtypes = [ctypes.POINTER(ctypes.c_uint)]
n = lib.fmla_trace_size()
verdict, call = check(v, problem)
torch.cuda.synchronize()
if not verdict["ok"]:
    sys.exit(f"{v.key}: FAILED check {verdict}")

EVENTS, SLOTS, DECODE_CTAS = 8, 16, 256           # trace.cuh: kTimelineEvents, kTimelineSlots, kTimelineCtas
MERGE_CTAS = n // SLOTS - DECODE_CTAS
DECODE = ["entry", "schedule row read", "span read, Q issued", "Q landed, ring issued", "first tile landed",
          "tiles computed", "output stored", "every request done"]
MERGE = ["entry", "decode grid complete", "weights computed", "output stored"]

graph = capture_graph(call)
flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

per_replay = []          # [replay] -> {("d"|"m", event): (first, median, last)} in us
cycles = []              # [replay] -> {event: median cycles from the previous event}
graph_us = []
for _ in range(replays):
    if lib.fmla_trace_clear():
        sys.exit("fmla_trace_clear failed")
    flush.zero_()
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    graph_us.append(start.elapsed_time(end) * 1e3)
    buf = (ctypes.c_uint * n)()
    if lib.fmla_trace_read(buf):
        sys.exit("fmla_trace_read failed")
    rows = [[buf[c * SLOTS + e] for e in range(SLOTS)] for c in range(n // SLOTS)]
    dec = [r for r in rows[:DECODE_CTAS] if r[0]]
    mer = [r for r in rows[DECODE_CTAS:] if r[0]]
    if not dec:
        sys.exit("no decode CTA stamped: is the variant a trace build of nsplit?")
    t0 = min(r[0] for r in dec)
    stat = {}
    for tag, group, names in (("d", dec, DECODE), ("m", mer, MERGE)):
        for e in range(len(names)):
            xs = sorted(((r[e] - t0) % (1 << 32)) / 1e3 for r in group if r[e])
            if xs:
                stat[(tag, e)] = (xs[0], statistics.median(xs), xs[-1], len(xs))
    per_replay.append(stat)
    steps = {}
    for e in range(1, EVENTS):
        ds = [(r[EVENTS + e] - r[EVENTS + e - 1]) % (1 << 32) for r in dec if r[e] and r[e - 1]]
        if ds:
            steps[e] = statistics.median(ds)
    cycles.append(steps)

print(f"{v.key} on {shape.name}: {replays} graph replays (L2 flushed), graph time median "
      f"{statistics.median(graph_us):.1f} us; stamps in us after the earliest decode CTA's entry "
      "(median over replays)")
print(f"{'kernel':7} {'event':28} {'CTAs':>5} {'first':>7} {'median':>7} {'last':>7}")
for tag, names, label in (("d", DECODE, "decode"), ("m", MERGE, "merge")):
    for e, name in enumerate(names):
        vals = [r[(tag, e)] for r in per_replay if (tag, e) in r]
        if not vals:
            continue
        med = [statistics.median(x[i] for x in vals) for i in range(4)]
        print(f"{label:7} {name:28} {int(med[3]):5d} {med[0]:7.2f} {med[1]:7.2f} {med[2]:7.2f}")
print("decode steps within a CTA (median cycles of its own SM clock, median over replays):")
for e in range(1, EVENTS):
    xs = [c[e] for c in cycles if e in c]
    if xs:
        print(f"  {DECODE[e - 1]:>26} -> {DECODE[e]:26} {statistics.median(xs):8.0f}")
