"""Phase times of the qreg schedule, from its trace build (32-bit clock stamps of CTA (0, 0, 0), one thread per
warpgroup).

Usage: python bench/trace_qreg.py "b,s_q,h_q,sk[,fixed][,causal]" [KEY]
Builds KEY (default: the 64-token two-stage qreg variant) with trace=True, checks one call against the reference,
and prints the median cycles of each phase over the steady-state tiles of that CTA:
  warpgroup 0: wait for the tile, Q K^T issue, Q K^T, softmax, and the tile period;
  warpgroups 1 and 2: wait for P, P V issue, P V;
  the producer (first thread of warpgroup 1): wait for the stage's release, refill issue, and refill -> the tile's
  full barrier seen by warpgroup 0 (an upper bound of the load's latency).
For qreg_ahead keys, Q K^T of a tile is issued before the previous tile's softmax, so "Q K^T (issued -> done)"
spans that softmax too. The trace build is a diagnostic: with the stamps, ptxas reports 124 B of spill for the
64-token qreg variant (the plain build has none), so its phase times are approximate; compare its tile period with
the plain variant's time.
"""

import ctypes
import dataclasses
import statistics
import sys

import torch

from flash_mla.codegen.variant import variants_by_key
from flash_mla.dispatch import library_for
from flash_mla.tuner.measure import Shape, check, make_problem

shape = Shape.from_spec(sys.argv[1])
key = sys.argv[2] if len(sys.argv) > 2 else "bf16_p64_n64_s2_w3_o5_c4_mwide_qr"
v = dataclasses.replace(variants_by_key([key])[0], trace=True).validate()
problem = make_problem(shape, v.dtype, v.page_size, 0)
lib = ctypes.CDLL(str(library_for(v).path))      # the same loaded module as the runtime's (dlopen)
lib.fmla_trace_read.argtypes = [ctypes.POINTER(ctypes.c_uint)]
n = lib.fmla_trace_size()
if lib.fmla_trace_clear():
    sys.exit("fmla_trace_clear failed")
verdict, _ = check(v, problem)                   # one launch, checked against the reference
torch.cuda.synchronize()
if not verdict["ok"]:
    sys.exit(f"{v.key}: FAILED check {verdict}")
buf = (ctypes.c_uint * n)()
if lib.fmla_trace_read(buf):
    sys.exit("fmla_trace_read failed")
WG, TILES, EV = 3, n // (3 * 8), 8
stamp = [[[buf[(w * TILES + t) * EV + e] for e in range(EV)] for t in range(TILES)] for w in range(WG)]
tiles = [t for t in range(TILES) if stamp[0][t][1] and stamp[0][t][4] and stamp[1][t][3] and stamp[2][t][3]]
stages = v.stages
steady = [t for t in tiles if stages + 1 <= t < tiles[-1] - 1] if tiles else []
if not steady:
    sys.exit(f"{v.key}: too few traced tiles ({len(tiles)}) on {shape.name}")


def med(f):
    xs = [f(t) for t in steady]
    xs = [x % (1 << 32) for x in xs if x is not None]      # 32-bit cycle counter: differences modulo 2^32
    return statistics.median(xs) if xs else float("nan")


w0, w1, w2 = stamp
rows = [
    ("wg0 wait for the tile", med(lambda t: w0[t][1] - w0[t][0])),
    ("wg0 Q K^T issue", med(lambda t: w0[t][2] - w0[t][1])),
    ("wg0 Q K^T (issued -> done)", med(lambda t: w0[t][3] - w0[t][2])),
    ("wg0 softmax + P publish", med(lambda t: w0[t][4] - w0[t][3])),
    ("wg0 tile period", med(lambda t: w0[t + 1][0] - w0[t][0] if t + 1 in tiles else None)),
    ("wg1 wait for P", med(lambda t: w1[t][1] - w1[t][0])),
    ("wg1 P V issue", med(lambda t: w1[t][2] - w1[t][1])),
    ("wg1 P V (issued -> done)", med(lambda t: w1[t][3] - w1[t][2])),
    ("wg2 wait for P", med(lambda t: w2[t][1] - w2[t][0])),
    ("wg2 P V (issued -> done)", med(lambda t: w2[t][3] - w2[t][2])),
    ("producer wait for the release", med(lambda t: w1[t][4] - w1[t][3] if w1[t][4] else None)),
    ("producer refill issue", med(lambda t: w1[t][5] - w1[t][4] if w1[t][5] else None)),
    ("refill issued -> tile seen landed by wg0",
     med(lambda t: w0[t + stages][1] - w1[t][5] if w1[t][5] and t + stages in tiles else None)),
    ("P published (wg0) -> P V done (wg1)", med(lambda t: w1[t][3] - w0[t][4])),
]
print(f"{v.key} on {shape.name}: {len(tiles)} tiles traced in CTA (0,0,0), medians over {len(steady)} (cycles)")
for name, cyc in rows:
    print(f"  {name:42} {cyc:10.0f}")
