"""Optuna search over the variant space for one workload at a time, results into the tuning DB.

Studies live in Optuna storage (a journal file by default, any RDB URL for many machines), so killing
the tuner and running it again continues each study, and several workers (one per GPU, or several
machines) can share one study. Every measurement happens in a worker subprocess (tuner/worker.py):
a crash or hang costs one trial. Invalid knob combinations are rejected by ``Variant.validate()``
before anything is compiled; all valid variants are compiled in parallel (ninja) before measuring;
a variant that fails the reference check is recorded as failed and can never win.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import optuna

from flash_mla.codegen.build import build
from flash_mla.codegen.render import kernel_source_digest
from flash_mla.codegen.variant import KNOBS, Variant, default_variant, search_space
from flash_mla.db import TRIAL_STATES, TuningDB

from .worker import Worker
from .workloads import Workload


#: Trial states that mean "measured and not usable" (the variant is never measured again in its study).
MEASURED_FAILURES = tuple(s for s in TRIAL_STATES if s not in ("ok", "invalid"))


def journal_storage(path: str):
    """Optuna's file journal: safe for several processes on one machine."""
    from optuna.storages import JournalStorage
    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna < 4
        from optuna.storages import JournalFileStorage as JournalFileBackend
    return JournalStorage(JournalFileBackend(path))


def open_storage(spec: str):
    """``spec`` is an RDB URL (``sqlite:///...``, ``postgresql://...``) or a journal file path."""
    return spec if "://" in spec else journal_storage(spec)


def study_name(gpu_name: str, w: Workload) -> str:
    """One study per GPU, workload and kernel source: a study resumed after the kernels changed starts
    afresh instead of reusing timings of the old code (the DB's trial rows keep the name, so each
    measurement records the kernel source it timed)."""
    return f"{gpu_name.replace(' ', '_')}:{w.key}:k{kernel_source_digest()}"


def variant_from_trial(trial: optuna.trial.BaseTrial, w: Workload) -> Variant:
    knobs = {k: trial.suggest_categorical(k, list(values)) for k, values in KNOBS.items()}
    return Variant(dtype=w.dtype, page_size=w.page_size, **knobs)


def prebuild(w: Workload, jobs: Optional[int] = None) -> set:
    """Compile every valid variant of the workload's space in parallel; return the build keys that failed."""
    arts = build(list({v.build_key: v for v in search_space(w.dtype, w.page_size)}.values()), jobs=jobs)
    return {a.variant.build_key for a in arts if not a.ok}


@dataclasses.dataclass
class StudyResult:
    workload: Workload
    best: Optional[dict]            # {"variant": Variant, "us": float, "trial_index": int}
    default_us: Optional[float]
    history: list                   # (trial_index, variant_key, state, us) in measurement order
    sweep: Optional[dict] = None    # filled by sweep(): the exhaustive reference of the search


def tune_workload(w: Workload, storage, db: TuningDB, run_id: int, gpu_name: str, *, n_trials: int,
                  timeout_s: Optional[float] = None, trial_timeout_s: float = 120.0, gpu: Optional[int] = None,
                  seed: int = 0, build_failed: frozenset = frozenset(),
                  on_trial: Optional[Callable[[dict], None]] = None, measurer=None) -> StudyResult:
    """Run (or continue) the study of ``w`` for up to ``n_trials`` new measurements.

    ``measurer`` (default: a :class:`Worker` subprocess on ``gpu``) has ``measure(variant_dict,
    shape_dict, seed) -> {"state", "us", ...}`` and ``stop()``; tests pass a synthetic one.
    """
    name = study_name(gpu_name, w)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5))
    valid = {v.key for v in search_space(w.dtype, w.page_size)}
    # Results already in the study (a resumed or shared study) are reused, never re-measured.
    known: dict[str, Optional[float]] = {}
    for t in study.get_trials(deepcopy=False):
        k = t.user_attrs.get("variant_key")
        if k and t.state == optuna.trial.TrialState.COMPLETE:
            known[k] = t.value
        elif k and t.state == optuna.trial.TrialState.FAIL:
            known.setdefault(k, None)
    # The DB row of a measurement is written before Optuna is told; a process killed in between leaves
    # the row without the tell. Rows of this study count as measured too, so nothing is measured twice.
    for t in db.trials(study=name):
        if t["state"] == "ok":
            known[t["variant_key"]] = min(t["time_us"], known.get(t["variant_key"]) or float("inf"))
        elif t["state"] in MEASURED_FAILURES:
            known.setdefault(t["variant_key"], None)
    worker = measurer if measurer is not None else Worker(gpu=gpu, timeout_s=trial_timeout_s)
    history, measured, t0 = [], 0, time.time()
    try:
        while measured < n_trials and len(known) < len(valid):
            if timeout_s is not None and time.time() - t0 > timeout_s:
                break
            trial = study.ask()
            v = variant_from_trial(trial, w)
            trial.set_user_attr("variant_key", v.key)
            if v.key not in valid:
                db.add_trial(run_id, name, v, w.as_dict(), "invalid",
                             error="rejected by Variant.validate()")
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                continue
            if v.key in known:                        # sampled again: reuse, costs nothing
                if known[v.key] is None:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, known[v.key])
                continue
            if v.build_key in build_failed:
                r = {"state": "build_failed", "error": "compilation failed"}
            else:
                r = worker.measure(v.as_dict(), dataclasses.asdict(w.shape), seed)
            measured += 1
            trial.set_user_attr("measured", True)
            db.add_trial(run_id, name, v, w.as_dict(), r["state"], time_us=r.get("us"), gbs=r.get("gbs"),
                         tflops=r.get("tflops"), error=r.get("error"))
            if r["state"] == "ok":
                known[v.key] = r["us"]
                study.tell(trial, r["us"])
            else:
                known[v.key] = None
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            history.append((len(history), v.key, r["state"], r.get("us")))
            if on_trial:
                best = min((x for x in known.values() if x is not None), default=None)
                on_trial({"variant": v.key, "state": r["state"], "us": r.get("us"), "best_us": best})
        d = default_variant(w.dtype, w.page_size)       # always measured: the winner row reports it
        if d.key not in known:
            r = worker.measure(d.as_dict(), dataclasses.asdict(w.shape), seed)
            db.add_trial(run_id, name, d, w.as_dict(), r["state"], time_us=r.get("us"), gbs=r.get("gbs"),
                         tflops=r.get("tflops"), error=r.get("error"))
            known[d.key] = r.get("us") if r["state"] == "ok" else None
    finally:
        worker.stop()
    ok = {k: u for k, u in known.items() if u is not None}
    if not ok:
        return StudyResult(w, None, known.get(default_variant(w.dtype, w.page_size).key), history)
    best_key = min(ok, key=ok.get)
    best_v = next(v for v in search_space(w.dtype, w.page_size) if v.key == best_key)
    trial_index = next((i for i, k, s, u in history if k == best_key), None)
    return StudyResult(w, {"variant": best_v, "us": ok[best_key], "trial_index": trial_index},
                       known.get(default_variant(w.dtype, w.page_size).key), history)


def record(db: TuningDB, run_id: int, res: StudyResult, gpu_name: str) -> None:
    """Store the study's winner (an 'ok' trial of this run) in the winners table."""
    if res.best is None:
        return
    name = study_name(gpu_name, res.workload)
    rows = [t for t in db.trials(study=name, variant_key=res.best["variant"].key, state="ok")]
    if not rows:                                   # measured in an earlier run of the study
        rows = [{"id": db.add_trial(run_id, name, res.best["variant"], res.workload.as_dict(), "ok",
                                    time_us=res.best["us"])}]
    best_row = min(rows, key=lambda t: t.get("time_us") or float("inf"))
    dv = default_variant(res.workload.dtype, res.workload.page_size)
    db.record_winner(best_row["id"], default_variant_key=dv.key, default_time_us=res.default_us,
                     n_trials=len(res.history))


def measured_history(storage, gpu_name: str, w: Workload) -> list:
    """Times of the study's measured trials in trial order (None for a failed one), across resumes."""
    study = optuna.load_study(study_name=study_name(gpu_name, w), storage=storage)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    return [t.value if t.state == optuna.trial.TrialState.COMPLETE else None
            for t in trials if t.user_attrs.get("measured")]


def trials_to_within(history: list, target_us: float, tol: float = 0.03) -> Optional[int]:
    """Measured trials the search needed before its best was within ``tol`` of ``target_us``."""
    best = float("inf")
    for i, us in enumerate(history, 1):
        if us is not None:
            best = min(best, us)
        if best <= target_us * (1 + tol):
            return i
    return None


def sweep(w: Workload, storage, db: TuningDB, run_id: int, gpu_name: str, *, gpu: Optional[int] = None,
          seed: int = 0, build_failed: frozenset = frozenset(), trial_timeout_s: float = 120.0,
          measurer=None) -> dict:
    """Measure every valid variant of the space (the exhaustive answer the search is judged against)."""
    worker = measurer if measurer is not None else Worker(gpu=gpu, timeout_s=trial_timeout_s)
    name = study_name(gpu_name, w) + ":sweep"
    times = {}
    try:
        for v in search_space(w.dtype, w.page_size):
            r = {"state": "build_failed"} if v.build_key in build_failed else \
                worker.measure(v.as_dict(), dataclasses.asdict(w.shape), seed)
            db.add_trial(run_id, name, v, w.as_dict(), r["state"], time_us=r.get("us"), gbs=r.get("gbs"),
                         tflops=r.get("tflops"), error=r.get("error"))
            if r["state"] == "ok":
                times[v.key] = r["us"]
    finally:
        worker.stop()
    if not times:
        return {"n": 0, "best_key": None, "best_us": None, "trials_to_3pct": None}
    best_key = min(times, key=times.get)
    return {"n": len(times), "best_key": best_key, "best_us": times[best_key],
            "trials_to_3pct": trials_to_within(measured_history(storage, gpu_name, w), times[best_key])}


def _geomean(xs) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def no_hint_winners(results: list, db: TuningDB, run_id: int, gpu_name: str, *, gpu: Optional[int] = None,
                    seed: int = 0, trial_timeout_s: float = 120.0, measurer=None) -> list[dict]:
    """Winners for calls without a length hint (``seqlen_bucket = NO_HINT``, see flash_mla.workload_key).

    The tuned workloads are grouped by their key without the length. In each group the candidates are the
    group's winners and the default variant; every (candidate, workload) time the DB lacks is measured
    (and recorded in that workload's study), and the candidate with the smallest geometric mean of
    ``time / best time of that workload`` wins (ties: the default, then the key). Its row holds the
    geometric-mean time over the group's workloads, the default's likewise.
    Returns one dict per group: ``key`` (the hint-free WorkloadKey), ``variant``, ``us``, ``default_us``,
    ``score`` (the winner's geometric-mean ratio to the per-workload best) and ``workloads``.
    """
    groups: dict = {}
    for res in results:
        if res.best is not None:
            groups.setdefault(res.workload.workload_key.without_hint(), []).append(res)
    out = []
    if not groups:
        return out
    worker = measurer if measurer is not None else Worker(gpu=gpu, timeout_s=trial_timeout_s)
    try:
        for key, members in groups.items():
            dv = default_variant(key.dtype, key.page_size)
            cands = {dv.key: dv}
            for res in members:
                cands.setdefault(res.best["variant"].key, res.best["variant"])
            times: dict = {}                       # (variant key, workload key) -> us or None (failed)
            for res in members:
                w = res.workload
                name = study_name(gpu_name, w)
                for t in db.trials(study=name, state="ok"):
                    k = (t["variant_key"], w.key)
                    times[k] = min(t["time_us"], times.get(k) or float("inf"))
                for vk, v in cands.items():
                    if (vk, w.key) in times:
                        continue
                    r = worker.measure(v.as_dict(), dataclasses.asdict(w.shape), seed)
                    db.add_trial(run_id, name, v, w.as_dict(), r["state"], time_us=r.get("us"), gbs=r.get("gbs"),
                                 tflops=r.get("tflops"), error=r.get("error"))
                    times[(vk, w.key)] = r["us"] if r["state"] == "ok" else None
            best_of = {res.workload.key: min(times[(vk, res.workload.key)] for vk in cands
                                             if times.get((vk, res.workload.key)) is not None)
                       for res in members}
            scored = []
            for vk in cands:
                ts = [times.get((vk, res.workload.key)) for res in members]
                if any(t is None for t in ts):
                    continue                           # failed somewhere in the group: not a candidate
                score = _geomean([t / best_of[res.workload.key] for t, res in zip(ts, members)])
                scored.append((score, vk != dv.key, vk, _geomean(ts)))
            if not scored:
                continue
            score, _, vk, us = min(scored)
            d_ts = [times.get((dv.key, res.workload.key)) for res in members]
            d_us = _geomean(d_ts) if all(t is not None for t in d_ts) else None
            wl = {k: v for k, v in key.db_fields().items() if k not in ("head_dim", "head_dim_v")}
            name = f"{gpu_name.replace(' ', '_')}:{key.canonical}"
            tid = db.add_trial(run_id, name, cands[vk], wl, "ok", time_us=us)
            db.record_winner(tid, default_variant_key=dv.key, default_time_us=d_us,
                             n_trials=sum(len(res.history) for res in members))
            out.append({"key": key, "variant": cands[vk], "us": us, "default_us": d_us, "score": score,
                        "workloads": [res.workload.key for res in members]})
    finally:
        worker.stop()
    return out
