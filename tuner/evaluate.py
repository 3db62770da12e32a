"""Held-out evaluation of the tuned selection (``flash-mla evaluate``).

For workloads that no tuning suite measured, every variant of the searched space is checked and timed
(the exhaustive best), and so are the public API calls an engine makes: ``get_mla_metadata`` and
``flash_mla_with_kvcache`` with an engine-style block table (as wide as ``max_model_len / page_size``), once
with the lengths passed as the hint and once without. Whatever those calls select (a DB winner, a neighbouring
bucket's winner, or the default) is what gets timed, through the same dispatch a server goes through.
"""

from __future__ import annotations

import math

from .workloads import SUITES, Workload

ENGINE_MAX_MODEL_LEN = 131072          # the block table of an engine serving 128k contexts
WITHIN = 0.03                          # "within 3% of the exhaustive best"

HELD_OUT = [
    # h_q = 16 (TP8), batches and lengths between and beyond the suites' points
    Workload(16, 1, 2, 3000), Workload(16, 1, 16, 1500), Workload(16, 1, 48, 700), Workload(16, 1, 64, 6000),
    Workload(16, 1, 96, 12000),
    # h_q = 32 (TP4): the suites measure only b1 and b8
    Workload(32, 1, 4, 5000), Workload(32, 1, 16, 3000), Workload(32, 1, 64, 1200), Workload(32, 1, 128, 4096),
    # h_q = 64 (TP2): in no suite
    Workload(64, 1, 1, 4096), Workload(64, 1, 8, 2000), Workload(64, 1, 32, 8192), Workload(64, 1, 128, 1024),
    # h_q = 128 (TP1)
    Workload(128, 1, 1, 12000), Workload(128, 1, 2, 6000), Workload(128, 1, 16, 3000), Workload(128, 1, 64, 1500),
    Workload(128, 1, 96, 5000),
    # multi-token prediction: s_q = 2 and 4, causal
    Workload(128, 2, 16, 4096, causal=True), Workload(128, 2, 64, 2500, causal=True),
    Workload(16, 2, 64, 6000, causal=True), Workload(16, 4, 32, 3000, causal=True),
    Workload(16, 4, 128, 1024, causal=True), Workload(64, 4, 16, 2048, causal=True),
]


def held_out() -> list[Workload]:
    """The held-out workloads; none has the workload key (the buckets a winner row is stored under) of a workload
    of a suite (checked), so that no held-out call finds a row tuned for its own key."""
    tuned = {w.workload_key for ws in SUITES.values() for w in ws}
    clash = [w for w in HELD_OUT if w.workload_key in tuned]
    if clash:
        raise ValueError(f"held-out workloads also in a suite: {clash}")
    return list(HELD_OUT)


def engine_block_table(block_table, page_size: int, max_model_len: int = ENGINE_MAX_MODEL_LEN):
    """``block_table`` widened to ``max_model_len / page_size`` columns as engines allocate it; the extra
    entries (never read: past every length) are page 0."""
    import torch
    b, n = block_table.shape
    width = max(n, max_model_len // page_size)
    wide = torch.zeros((b, width), dtype=block_table.dtype, device=block_table.device)
    wide[:, :n] = block_table
    return wide


def evaluate(workloads: list[Workload], space, rep_ms: int = 100, seed: int = 0, progress=None) -> list[dict]:
    """One row per workload: the exhaustive best of ``space`` and the two API calls' variants and times."""
    import torch
    import flash_mla
    from flash_mla import dispatch
    from flash_mla.testing import compare
    from .measure import HEAD_DIM_V, SCALE, graph_time_us, make_problem, measure_variant
    rows = []
    for i, w in enumerate(workloads):
        problem = make_problem(w.shape, w.dtype, w.page_size, seed + i)
        q, k, sl = problem.q, problem.k_cache, problem.cache_seqlens
        bt = engine_block_table(problem.block_table, w.page_size)
        times = {}
        for v in space:
            if (v.dtype, v.page_size) != (w.dtype, w.page_size):
                continue
            r = measure_variant(v, problem, rep_ms)
            times[v.key] = r["us"] if r["ok"] else None
            if progress:
                progress(w, v.key, times[v.key])
        ok_times = {key: us for key, us in times.items() if us}
        best = min(ok_times, key=ok_times.get) if ok_times else None
        row = {"workload": w.key, "shape": w.shape.name, "n_variants": len(times),
               "n_failed": sum(1 for us in times.values() if us is None), "best": best,
               "best_us": ok_times.get(best), "default": dispatch.default_variant(w.dtype, w.page_size).key,
               "times": times}                 # every variant's time (None: failed), kept in evaluate.json
        row["default_us"] = times.get(row["default"])
        causal = w.causal and w.s_q > 1
        for tag, hint in (("hint", list(problem.seqlens)), ("nohint", None)):
            meta, splits = flash_mla.get_mla_metadata(sl, w.s_q * w.h_q // w.h_kv, w.h_kv, seqlens_hint=hint)
            mean = None if hint is None else sum(hint) / len(hint)
            chosen = dispatch.select_variant(q, k, causal, mean)

            def call(meta=meta, splits=splits):
                return flash_mla.flash_mla_with_kvcache(q, k, bt, sl, HEAD_DIM_V, meta, splits, softmax_scale=SCALE,
                                                        causal=w.causal)
            out, lse = call()
            torch.cuda.synchronize()
            verdict = compare(out, problem.ref_out, lse, problem.ref_lse, q.dtype)
            us = graph_time_us(call, rep_ms) if verdict["ok"] else None
            row[f"{tag}_variant"] = chosen.key
            row[f"{tag}_us"] = us
            row[f"{tag}_ratio"] = (us / row["best_us"]) if (us and row["best_us"]) else None
            if progress:
                progress(w, f"API ({tag}): {chosen.key}", us)
        rows.append(row)
        del problem
    return rows


def summary(rows: list[dict]) -> dict:
    out = {"workloads": len(rows)}
    for tag in ("hint", "nohint"):
        ratios = [r[f"{tag}_ratio"] for r in rows if r.get(f"{tag}_ratio")]
        out[tag] = {"within_3pct": sum(1 for x in ratios if x <= 1 + WITHIN), "measured": len(ratios),
                    "geomean": math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else None,
                    "worst": max(ratios) if ratios else None}
    d = [r["default_us"] / r["best_us"] for r in rows if r.get("default_us") and r.get("best_us")]
    out["default"] = {"within_3pct": sum(1 for x in d if x <= 1 + WITHIN), "measured": len(d),
                      "geomean": math.exp(sum(math.log(x) for x in d) / len(d)) if d else None}
    return out


def format_table(rows: list[dict]) -> str:
    def f(x, w, p=1):
        return f"{x:{w}.{p}f}" if x is not None else f"{'-':>{w}}"
    cols = (f"{'shape':28} {'best variant':34} {'best us':>8} {'default':>8} {'hint: variant':34} {'us':>8} "
            f"{'ratio':>6} {'no hint: variant':34} {'us':>8} {'ratio':>6}")
    lines = ["ratio = API call time / exhaustive best of the searched space (<= 1.03: within 3%)", cols,
             "-" * len(cols)]
    for r in rows:
        lines.append(f"{r['shape']:28} {str(r['best']):34} {f(r['best_us'], 8)} {f(r['default_us'], 8)} "
                     f"{r['hint_variant']:34} {f(r['hint_us'], 8)} {f(r['hint_ratio'], 6, 3)} "
                     f"{r['nohint_variant']:34} {f(r['nohint_us'], 8)} {f(r['nohint_ratio'], 6, 3)}")
    s = summary(rows)
    lines.append("")
    for tag, name in (("hint", "with the length hint"), ("nohint", "without a hint"), ("default", "default variant")):
        g = s[tag]
        lines.append(f"{name:22} within 3% of the best on {g['within_3pct']}/{g['measured']} workloads, geomean "
                     f"ratio {f(g['geomean'], 5, 3)}" + (f", worst {g['worst']:.3f}" if g.get("worst") else ""))
    return "\n".join(lines)
