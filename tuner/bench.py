"""Benchmark: implementations x shape grid against ceilings measured in the same run.

``flash-mla bench`` drives this module. Rows are dicts with keys shape, regime, impl, ok, us, gbs,
tflops, pct_copy, pct_gemm; reports are a printed table, CSV, JSON and a PNG plot.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .measure import Shape

MEMORY_BOUND = [Shape(b, 1, h, sk) for b in (1, 8, 32, 128) for h in (16, 32) for sk in (1024, 4096, 16384)]
COMPUTE_BOUND = ([Shape(128, 1, 128, sk) for sk in (4096, 8192, 16384, 32768)]
                 + [Shape(128, 2, 128, sk, causal=c) for sk in (4096, 8192, 16384, 32768) for c in (False, True)])
MTP = [Shape(b, 4, h, sk, causal=True) for b in (64, 128) for h in (16, 64) for sk in (2048, 8192)]
PEER_POINTS = [Shape(1, 1, 128, 32768, varlen=False), Shape(16, 1, 128, 32768, varlen=False),
               Shape(132, 1, 128, 6000, varlen=False)]


def default_grid() -> list[Shape]:
    """Memory-bound, compute-bound (causal only matters for s_q > 1), MTP, and the peers' fixed-length points."""
    return MEMORY_BOUND + COMPUTE_BOUND + MTP + PEER_POINTS


def quick_grid() -> list[Shape]:
    """One shape per regime, for smoke runs."""
    return [Shape(128, 1, 16, 16384), Shape(8, 1, 16, 16384), Shape(128, 2, 128, 8192), Shape(64, 4, 64, 2048, causal=True)]


def with_ceilings(row: dict, ceil: dict) -> dict:
    if row.get("ok") and row.get("us"):
        row["pct_copy"] = 100.0 * row["gbs"] / ceil["copy_gbs"]
        row["pct_gemm"] = 100.0 * row["tflops"] / ceil["gemm_tflops"]
    return row


def tuned_variant(problem):
    """What the runtime would run for this problem: the tuning DB's winner (None without an entry)."""
    from flash_mla import selection
    from flash_mla.codegen.variant import Variant
    shape = problem.shape
    gpu, sms, cuda = selection.device_info(problem.q.device.index or 0)
    sel = selection.select(gpu, sms, cuda, problem.dtype, shape.h_q, shape.h_kv, shape.s_q, problem.page_size,
                           shape.causal and shape.s_q > 1, shape.b, problem.block_table.shape[1] * problem.page_size)
    return Variant.from_dict(sel.variant) if sel.variant else None


def run(shapes: list[Shape], impls: dict, include_reference: bool = True, seed: int = 0, progress=None) -> list[dict]:
    """Measure every implementation on every shape.

    ``impls`` maps a label to a Variant, or to a function of the problem returning a Variant (or None
    to skip that shape, e.g. :func:`tuned_variant` without a DB entry). Inputs are drawn once per shape
    and shared by all implementations.
    """
    from .measure import make_problem, measure_reference, measure_variant
    rows = []
    for i, shape in enumerate(shapes):
        problem = make_problem(shape, "bf16", 64, seed + i)
        for label, impl in impls.items():
            variant = impl(problem) if callable(impl) else impl
            if variant is None:
                if progress:
                    progress(None)
                continue
            r = measure_variant(variant, problem)
            rows.append({"shape": shape.name, "regime": shape.regime, "impl": label, "variant": variant.key, **r})
            if progress:
                progress(rows[-1])
        if include_reference:
            r = measure_reference(problem)
            rows.append({"shape": shape.name, "regime": shape.regime, "impl": "torch reference", "variant": "", **r})
            if progress:
                progress(rows[-1])
        del problem
    return rows


def format_table(rows: list[dict], ceil: dict) -> str:
    head = (f"device {ceil.get('device', '?')}: copy {ceil['copy_gbs']:.0f} GB/s, "
            f"bf16 GEMM {ceil['gemm_tflops']:.0f} TFLOPS (measured in this run)\n")
    cols = f"{'shape':30} {'impl':34} {'us':>9} {'GB/s':>7} {'%copy':>6} {'TFLOPS':>7} {'%gemm':>6}"
    lines = [head + cols, "-" * len(cols)]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"{r['shape']:30} {r['impl']:34} {'FAILED reference check':>40}")
            continue
        lines.append(f"{r['shape']:30} {r['impl']:34} {r['us']:9.1f} {r['gbs']:7.0f} {r.get('pct_copy', 0):5.0f}% "
                     f"{r['tflops']:7.1f} {r.get('pct_gemm', 0):5.0f}%")
    return "\n".join(lines)


FIELDS = ["shape", "regime", "impl", "variant", "ok", "us", "gbs", "tflops", "pct_copy", "pct_gemm"]


def write_reports(rows: list[dict], ceil: dict, outdir: Path, stem: str = "bench") -> dict:
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": outdir / f"{stem}.csv", "json": outdir / f"{stem}.json", "png": outdir / f"{stem}.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    with open(paths["json"], "w") as f:
        json.dump({"ceilings": ceil, "rows": rows}, f, indent=1, default=str)
    plot(rows, paths["png"])
    return paths


def plot(rows: list[dict], path: Path) -> None:
    """Fraction of the binding ceiling per shape, one series per implementation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(shapes) + 3), 5))
    for impl in impls:
        xs, ys = [], []
        for r in rows:
            if r["impl"] == impl and r.get("ok") and "pct_copy" in r:
                xs.append(shapes.index(r["shape"]))
                ys.append(r["pct_gemm"] if r["regime"] == "compute" else r["pct_copy"])
        ax.plot(xs, ys, marker="o", linestyle="-" if impl != "torch reference" else ":", label=impl)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(shapes, rotation=75, fontsize=7)
    ax.set_ylabel("% of binding ceiling")
    ax.set_title("memory-bound shapes: % of copy bandwidth; compute-bound: % of bf16 GEMM rate", fontsize=9)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
