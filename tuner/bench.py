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
PEER_POINTS = [Shape(1, 1, 128, 4096, varlen=False), Shape(16, 1, 128, 4096, varlen=False),
               Shape(1, 1, 128, 32768, varlen=False), Shape(16, 1, 128, 32768, varlen=False),
               Shape(132, 1, 128, 6000, varlen=False)]


def default_grid() -> list[Shape]:
    """Memory-bound, compute-bound (causal only matters for s_q > 1), MTP, and the peers' fixed-length points."""
    return MEMORY_BOUND + COMPUTE_BOUND + MTP + PEER_POINTS


def latency_grid() -> list[Shape]:
    """The small-batch (b <= 8) shapes of the default grid: where fixed per-call costs dominate."""
    return [s for s in default_grid() if s.b <= 8]


def quick_grid() -> list[Shape]:
    """One shape per regime, for smoke runs."""
    return [Shape(128, 1, 16, 16384), Shape(8, 1, 16, 16384), Shape(128, 2, 128, 8192), Shape(64, 4, 64, 2048, causal=True)]


def overhead_grid() -> list[Shape]:
    """b1 shapes, where one call's GPU time is shortest and host time shows most, then the quick grid."""
    return [Shape(1, 1, h, sk) for h in (16, 32, 128) for sk in (1024, 4096)] + quick_grid()


def memory_grid() -> list[Shape]:
    """The memory-bound (h_q <= 32) shapes of the default grid."""
    return [s for s in default_grid() if s.h_q <= 32]


def compute_grid() -> list[Shape]:
    """The compute-bound (h_q >= 64) shapes of the default grid."""
    return [s for s in default_grid() if s.h_q >= 64]


GRIDS = {"default": default_grid, "quick": quick_grid, "latency": latency_grid, "overhead": overhead_grid,
         "memory": memory_grid, "compute": compute_grid}


def with_ceilings(row: dict, ceil: dict) -> dict:
    if row.get("ok") and row.get("us"):
        row["pct_copy"] = 100.0 * row["gbs"] / ceil["copy_gbs"]
        row["pct_gemm"] = 100.0 * row["tflops"] / ceil["gemm_tflops"]
    return row


def tuned_variant(problem):
    """What the runtime would run for this problem when its caller passes the lengths as the hint of
    ``get_mla_metadata`` (as engines can): the tuning DB's winner, None without an entry."""
    from flash_mla import selection
    shape = problem.shape
    gpu, sms, cuda = selection.device_info(problem.q.device.index or 0)
    mean_seqlen = float(problem.cache_seqlens.double().mean())      # the bench may sync; a server passes a hint
    key = selection.key_for_tensors(problem.q, problem.k_cache, shape.causal and shape.s_q > 1, mean_seqlen)
    return selection.select(gpu, sms, cuda, key).variant


def run(shapes: list[Shape], impls: dict, include_reference: bool = True, seed: int = 0, progress=None,
        peers=(), ceil: dict | None = None) -> list[dict]:
    """Measure every implementation on every shape.

    ``impls`` maps a label to a Variant, or to a function of the problem returning a Variant (or None
    to skip that shape, e.g. :func:`tuned_variant` without a DB entry). Inputs are drawn once per shape
    and shared by all implementations. ``peers`` (:class:`flash_mla.tuner.peers.Peer`) run on the same
    inputs, checked and timed the same way; with peers, each shape also gets a ``floor`` row (needs
    ``ceil``, the ceilings measured in this run).
    """
    from .measure import floor_us, make_problem, measure_reference, measure_variant, read_floor_us
    from .peers import measure_peer
    rows = []

    def add(shape, impl, variant, r):
        rows.append({"shape": shape.name, "regime": shape.regime, "b": shape.b, "s_q": shape.s_q, "h_q": shape.h_q,
                     "impl": impl, "variant": variant, **r})
        if progress:
            progress(rows[-1])

    for i, shape in enumerate(shapes):
        problem = make_problem(shape, "bf16", 64, seed + i)
        for label, impl in impls.items():
            variant = impl(problem) if callable(impl) else impl
            if variant is None:
                if progress:
                    progress(None)
                continue
            add(shape, label, variant.key, measure_variant(variant, problem))
        for peer in peers:
            add(shape, f"peer {peer.label}", "", measure_peer(peer, problem))
        if peers:
            read_us = read_floor_us(problem.nbytes)
            us = floor_us(read_us, problem.nflop, ceil["gemm_tflops"])
            add(shape, FLOOR, "", {"ok": True, "us": us, "read_us": read_us, "gbs": problem.nbytes / us / 1e3,
                                   "tflops": problem.nflop / us / 1e6})
        if include_reference:
            add(shape, "torch reference", "", measure_reference(problem))
        del problem
    return rows


def overhead_run(shapes: list[Shape], peers=(), seed: int = 0, progress=None) -> list[dict]:
    """Host overhead per call (:func:`flash_mla.tuner.timing.overhead_us`) of the public API as an engine calls
    it (classic metadata from ``get_mla_metadata``, the tuned selection), of the registered operator, of the
    Python path (validation, selection and a ctypes launch on every call, as without the C++ launcher) and of
    each peer's classic API, on the same inputs. Every implementation's output is checked against the
    reference first; one that fails gets no times."""
    import torch
    import flash_mla
    from flash_mla import api, dispatch, ops, scheduler
    from flash_mla.testing import compare
    from .measure import HEAD_DIM_V, SCALE, make_problem
    from .peers import measure_peer
    from .timing import overhead_us
    rows = []
    for i, shape in enumerate(shapes):
        problem = make_problem(shape, "bf16", 64, seed + i)
        q, k, bt, sl = problem.q, problem.k_cache, problem.block_table, problem.cache_seqlens
        causal = shape.causal
        meta, splits = flash_mla.get_mla_metadata(sl, shape.s_q * shape.h_q // shape.h_kv, shape.h_kv)
        calls = {
            f"ours: flash_mla_with_kvcache ({ops.IMPLEMENTATION} launcher)":
                lambda: flash_mla.flash_mla_with_kvcache(q, k, bt, sl, HEAD_DIM_V, meta, splits,
                                                         softmax_scale=SCALE, causal=causal),
            f"ours: torch.ops.flash_mla.mla_decode ({ops.IMPLEMENTATION})":
                lambda: torch.ops.flash_mla.mla_decode(q, k, bt, sl, meta, splits, SCALE, causal, None),
            "ours: Python path (validate + select + ctypes per call)":
                lambda: api.decode(q, k, bt, sl, HEAD_DIM_V, meta, splits, SCALE, causal),
        }
        for label, fn in calls.items():
            out, lse = fn()
            torch.cuda.synchronize()
            verdict = compare(out, problem.ref_out, lse, problem.ref_lse, q.dtype)
            r = {"ok": True, **overhead_us(fn)} if verdict["ok"] else {"ok": False, "error": verdict}
            rows.append({"shape": shape.name, "impl": label, **r})
            if progress:
                progress(rows[-1])
        # the step's metadata: the schedule kernel against the torch-op specification it must equal
        rows_k = shape.s_q * shape.h_q // shape.h_kv
        parts = meta.shape[0]
        policy = dispatch.split_policy_for(sl.device.index or 0, rows_k, shape.h_kv, sl.shape[0])   # as without a hint
        want = scheduler.schedule(sl.cpu(), parts, overhead=policy.overhead, min_payload=policy.min_blocks)
        metadata_calls = {
            "ours: get_mla_metadata (one kernel)": lambda: flash_mla.get_mla_metadata(sl, rows_k, shape.h_kv),
            "ours: scheduler.schedule (torch ops, the specification)":
                lambda: scheduler.schedule(sl, parts, overhead=policy.overhead, min_payload=policy.min_blocks),
        }
        for label, fn in metadata_calls.items():
            m, n = fn()
            ok = torch.equal(m.cpu(), want[0]) and torch.equal(n.cpu(), want[1])
            r = {"ok": True, **overhead_us(fn)} if ok else {"ok": False, "error": "differs from scheduler.schedule"}
            rows.append({"shape": shape.name, "impl": label, **r})
            if progress:
                progress(rows[-1])
        for peer in peers:
            r = measure_peer(peer, problem, rep_ms=20)      # the reference check (its graph time is not used)
            if r.get("ok"):
                t = peer.overhead_us()
                r = {"ok": True, **{k: t[k] for k in ("host", "eager", "graph")}} if t.get("ok") else \
                    {"ok": False, "error": t.get("error", "")[-2000:]}
            rows.append({"shape": shape.name, "impl": f"peer {peer.label}", **r})
            if progress:
                progress(rows[-1])
        del problem
    return rows


FP8 = "bf16_e4m3"


def kv_fp8_run(shapes: list[Shape], bf16: dict, fp8: dict, seed: int = 0, progress=None) -> list[dict]:
    """A float8 e4m3 KV cache beside bf16 on each shape: ``bf16`` and ``fp8`` map labels to variants of each
    dtype (or functions of the problem, as in :func:`run`). The float8 cache is the bf16 one of the same
    seed quantised per tensor (``flash_mla.testing.quantize_e4m3``); each is checked against the reference on
    its own (dequantised) data, then timed. Rows: shape, impl, dtype, us, gbs (of the bytes that dtype moves)."""
    from .measure import make_problem, measure_variant
    rows = []
    for i, shape in enumerate(shapes):
        for dtype, impls in (("bf16", bf16), (FP8, fp8)):
            problem = make_problem(shape, dtype, 64, seed + i)
            for label, impl in impls.items():
                variant = impl(problem) if callable(impl) else impl
                if variant is None:
                    continue
                rows.append({"shape": shape.name, "regime": shape.regime, "b": shape.b, "h_q": shape.h_q,
                             "impl": label, "dtype": dtype, "variant": variant.key,
                             **measure_variant(variant, problem)})
                if progress:
                    progress(rows[-1])
            del problem
    return rows


def format_kv_fp8_table(rows: list[dict], ceil: dict) -> str:
    """Per shape: each bf16 implementation's time, the (first) float8 implementation's time, float8 / bf16 (< 1:
    the float8 cache is faster) and the float8 kernel's bandwidth (of its halved cache bytes) as a fraction of
    copy; further float8 implementations follow as plain times."""
    labels = list(dict.fromkeys(r["impl"] for r in rows if r["dtype"] == "bf16"))
    more = list(dict.fromkeys(r["impl"] for r in rows if r["dtype"] == FP8))[1:]
    head = (f"device {ceil.get('device', '?')}: copy {ceil['copy_gbs']:.0f} GB/s (measured in this run); "
            "fp8/x = fp8 us / x us (< 1.00: the float8 cache is faster)\n")
    cols = (f"{'shape':30} " + " ".join(f"{l[:22]:>22}" for l in labels) + f" {'fp8 us':>8} "
            + " ".join(f"{'fp8/' + l[:8]:>13}" for l in labels) + f" {'fp8 GB/s':>9} {'%copy':>6}"
            + "".join(f" {l[-24:]:>24}" for l in more))
    lines = [head + cols, "-" * len(cols)]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        by = {r["impl"]: r for r in rows if r["shape"] == shape}
        fp8 = next((r for r in rows if r["shape"] == shape and r["dtype"] == FP8), None)
        us = {l: by[l]["us"] if l in by and by[l].get("ok") else None for l in labels}
        f_us = fp8["us"] if fp8 and fp8.get("ok") else None

        def f(x, w, d=1):
            return f"{x:{w}.{d}f}" if x is not None else f"{'-':>{w}}"
        lines.append(f"{shape:30} " + " ".join(f(us[l], 22) for l in labels) + f" {f(f_us, 8)} "
                     + " ".join(f(f_us / us[l] if (f_us and us[l]) else None, 13, 2) for l in labels)
                     + f" {f(fp8['gbs'] if f_us else None, 9, 0)} "
                     f"{f(100 * fp8['gbs'] / ceil['copy_gbs'] if f_us else None, 5, 0)}%"
                     + "".join(f" {f(by[l]['us'] if l in by and by[l].get('ok') else None, 24)}" for l in more))
    return "\n".join(lines)


def format_overhead_table(rows: list[dict]) -> str:
    cols = (f"{'shape':26} {'impl':62} {'host us':>8} {'eager us':>9} {'graph us':>9} {'eager-graph':>11}")
    lines = ["per call, back to back, no L2 flush; host = time to issue a call (no sync), eager = until the GPU "
             "is done, graph = one call in a CUDA graph (median of 9 rounds)", cols, "-" * len(cols)]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"{r['shape']:26} {r['impl']:62} {'FAILED':>8}")
            continue
        lines.append(f"{r['shape']:26} {r['impl']:62} {r['host']:8.1f} {r['eager']:9.1f} {r['graph']:9.1f} "
                     f"{r['eager'] - r['graph']:11.1f}")
    return "\n".join(lines)


FLOOR = "floor"
TUNED = "tuned (DB winner)"


def peer_summary(rows: list[dict]) -> list[dict]:
    """Per shape: ours (the tuned selection: the DB winner, else the default), each peer, the best peer,
    the floor, ``vs_best`` = best peer time / our time (>= 1: we are at least as fast) and time / floor."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == shape]
        by = {r["impl"]: r for r in rs}
        ours = by.get(TUNED) or next((r for r in rs if r["impl"].startswith("default")), None)
        peers = {r["impl"][len("peer "):]: (r["us"] if r.get("ok") else None) for r in rs if r["impl"].startswith("peer ")}
        timed = {k: v for k, v in peers.items() if v}
        best = min(timed, key=timed.get) if timed else None
        fl = by.get(FLOOR, {}).get("us")
        ours_us = ours["us"] if ours and ours.get("ok") else None
        out.append({
            "shape": shape, "regime": rs[0]["regime"], "b": rs[0].get("b"), "s_q": rs[0].get("s_q"),
            "h_q": rs[0].get("h_q"), "ours_impl": ours["impl"] if ours else None, "ours_us": ours_us,
            "ours_variant": ours.get("variant") if ours else None, "peers": peers, "best_peer": best,
            "best_us": timed.get(best), "floor_us": fl,
            "vs_best": (timed[best] / ours_us) if (best and ours_us) else None,
            "ours_over_floor": (ours_us / fl) if (ours_us and fl) else None,
            "best_over_floor": (timed[best] / fl) if (best and fl) else None,
        })
    return out


def _geomean(xs):
    import math
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


PEER_GROUPS = {
    "b <= 8": lambda s: s["b"] <= 8,
    "memory-bound (h_q <= 32)": lambda s: s["h_q"] <= 32,
    "h_q >= 64": lambda s: s["h_q"] >= 64,
    "all": lambda s: True,
}


def format_peer_table(summary: list[dict], ceil: dict) -> str:
    labels = list(dict.fromkeys(k for s in summary for k in s["peers"]))
    head = (f"device {ceil.get('device', '?')}: copy {ceil['copy_gbs']:.0f} GB/s, bf16 GEMM "
            f"{ceil['gemm_tflops']:.0f} TFLOPS (measured in this run); ours = tuned selection; "
            f"vs best = best peer us / ours us (>= 1.00: ours at least as fast)\n")
    cols = (f"{'shape':30} {'ours us':>8} " + " ".join(f"{l[:14]:>14}" for l in labels)
            + f" {'floor us':>8} {'vs best':>7} {'ours/floor':>10} {'best/floor':>10}")
    lines = [head + cols, "-" * len(cols)]

    def f(x, w, d=1):
        return f"{x:{w}.{d}f}" if x is not None else f"{'-':>{w}}"
    for s in summary:
        lines.append(f"{s['shape']:30} {f(s['ours_us'], 8)} "
                     + " ".join(f(s["peers"].get(l), 14) for l in labels)
                     + f" {f(s['floor_us'], 8)} {f(s['vs_best'], 7, 2)} {f(s['ours_over_floor'], 10, 2)}"
                     f" {f(s['best_over_floor'], 10, 2)}")
    lines.append("")
    for name, pred in PEER_GROUPS.items():
        grp = [s for s in summary if pred(s) and s["vs_best"]]
        if not grp:
            continue
        wins = sum(1 for s in grp if s["vs_best"] >= 1.0)
        lines.append(f"{name:26} shapes {len(grp):3}  ours >= best peer on {wins:3}  geomean vs best "
                     f"{_geomean(s['vs_best'] for s in grp):.3f}  worst {min(s['vs_best'] for s in grp):.2f}")
    return "\n".join(lines)


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


FIELDS = ["shape", "regime", "impl", "variant", "ok", "us", "gbs", "tflops", "pct_copy", "pct_gemm", "read_us"]


def write_reports(rows: list[dict], ceil: dict, outdir: Path, stem: str = "bench", summary=None) -> dict:
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": outdir / f"{stem}.csv", "json": outdir / f"{stem}.json", "png": outdir / f"{stem}.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    with open(paths["json"], "w") as f:
        json.dump({"ceilings": ceil, "rows": rows, **({"peer_summary": summary} if summary else {})}, f,
                  indent=1, default=str)
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
