"""Time the default and a few other variants on representative shapes; print a table against ceilings."""

import sys

import torch

from flash_mla.codegen.variant import Variant, default_variant
from flash_mla.tuner.measure import Shape, ceilings, measure

SHAPES = [
    Shape(128, 1, 16, 16384), Shape(32, 1, 16, 16384), Shape(8, 1, 16, 16384), Shape(1, 1, 16, 16384),
    Shape(128, 1, 128, 4096), Shape(128, 2, 128, 8192), Shape(132, 1, 128, 6000, varlen=False),
    Shape(64, 4, 64, 2048, causal=True),
]
VARIANTS = [default_variant(), Variant(block_n=32, stages=4, num_warpgroups=2),
            Variant(block_n=32, stages=4, num_warpgroups=4), Variant(block_n=64, stages=2, split_overhead=2)]

c = ceilings()
print(f"device {torch.cuda.get_device_name()}: copy {c['copy_gbs']:.0f} GB/s, bf16 GEMM {c['gemm_tflops']:.0f} TFLOPS")
rows = []
for shape in SHAPES:
    for v in VARIANTS:
        r = measure(v, shape)
        rows.append(r)
        print(r, flush=True)
print(f"\n{'shape':32} {'variant':28} {'us':>8} {'GB/s':>7} {'%copy':>6} {'TFLOPS':>7} {'%gemm':>6}")
for r in rows:
    if not r["ok"]:
        print(f"{r['shape']:32} {r['variant']:28} FAILED CHECK")
        continue
    print(f"{r['shape']:32} {r['variant']:28} {r['us']:8.1f} {r['gbs']:7.0f} {100 * r['gbs'] / c['copy_gbs']:5.0f}% "
          f"{r['tflops']:7.1f} {100 * r['tflops'] / c['gemm_tflops']:5.0f}%")
sys.exit(0 if all(r["ok"] for r in rows) else 1)
