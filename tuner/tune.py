"""Optuna search over the variant space for one workload at a time, results into the tuning DB.

Studies live in Optuna storage (a journal file by default, any RDB URL for many machines), so killing
the tuner and running it again continues each study, and several workers (one per GPU, or several
machines) can share one study. Every measurement happens in a worker subprocess (tuner/worker.py):
a crash or hang costs one trial. Invalid knob combinations are rejected by ``Variant.validate()``
before anything is compiled; all valid variants are compiled in parallel (ninja) before measuring;
a variant that fails the reference check is recorded as failed and can never win.

Winners are noise-aware: after the search, its best ``confirm_top`` candidates and the default variant are
re-measured in ``confirm_rounds`` interleaved rounds (each round in a rotated order, so no candidate always
runs first). The candidate with the lowest median wins only where it beats the default beyond the noise:
every one of its repeats is faster than every repeat of the default (the ranges do not overlap) and its median
is at least ``MIN_MARGIN`` below the default's; otherwise the default stays the winner. A candidate that passes
is then measured beside the default at the edges of its workload's length bucket (``BUCKET_EDGES``): it stays the
winner only if it is at most ``BUCKET_TOLERANCE`` slower there, since the runtime selects it for every length of the
bucket. The winner row records the repeats' median, both spreads ((max - min) / median) and the rule that decided.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import statistics
import threading
import time
import warnings
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Sequence

import optuna

from flash_mla.codegen.build import BuildError, build, cutlass_version, nvcc_version
from flash_mla.codegen.render import kernel_source_digest
from flash_mla.codegen.variant import KNOBS, Variant, default_variant, search_space
from flash_mla.db import TRIAL_STATES, TuningDB, current_hardware, shipped_db_path, user_db_path
from flash_mla.workload_key import NO_HINT, WorkloadKey, bucket_seqlen

from .transfer import stored_variant, transfer_points
from .worker import Worker
from .workloads import Workload


#: Trial states that mean "measured and not usable" (the variant is never measured again in its study).
MEASURED_FAILURES = tuple(s for s in TRIAL_STATES if s not in ("ok", "invalid"))

#: Confirmation of a study's winner: its best CONFIRM_TOP candidates and the default, CONFIRM_ROUNDS
#: interleaved rounds. Simulated with equal candidates under uniform +-2% noise (same-kernel repeats on the
#: H100 differ by up to 1.4-3.5%), the rule below picks a false winner in ~1% of studies at 5 rounds against
#: ~9% at 3, and still finds a true 4% gain in > 99%.
CONFIRM_TOP = 2
CONFIRM_ROUNDS = 5
#: A candidate replaces the default only if its repeats and the default's do not overlap and its median is
#: faster by at least this.
MIN_MARGIN = 0.01
#: The bucket check: a winner other than the default is measured beside it at these multiples of its length
#: bucket's centre (inside the bucket [L / sqrt 2, L sqrt 2)), BUCKET_ROUNDS interleaved rounds each, and keeps
#: the row only if its median is at most BUCKET_TOLERANCE above the default's at every edge. (H100: a b1 h_q=128
#: winner confirmed 1.5% faster at its one tuned length took 25.2 us against the default's 23.9 at s_k = 4096
#: fixed, same bucket. H200: with no tolerance a winner was rejected for being 0.1% slower at an edge, within the
#: repeats' spread.) The tolerance is the win rule's own margin.
BUCKET_EDGES = (0.75, 1.33)
BUCKET_ROUNDS = 3
BUCKET_TOLERANCE = MIN_MARGIN


def run_info() -> dict:
    """The ``runs`` row of a tuning session: this machine (db.current_hardware) plus the toolchain and the
    kernel source the variants are built from."""
    info = current_hardware()
    try:
        info["nvcc_version"] = nvcc_version()
    except (BuildError, OSError, Exception):
        info["nvcc_version"] = None
    info["cutlass_version"] = cutlass_version()
    info["source_hash"] = kernel_source_digest()
    return info


def _add_trial(db: TuningDB, run_id: int, name: str, v: Variant, w: Workload, r: dict, phase: str, seed: int,
               source_hash: str) -> int:
    """One measurement into the DB, with its provenance."""
    return db.add_trial(run_id, name, v, w.as_dict(), r["state"], time_us=r.get("us"), gbs=r.get("gbs"),
                        tflops=r.get("tflops"), error=r.get("error"), phase=phase, seed=seed,
                        source_hash=source_hash, sm_clock_start_mhz=r.get("sm_clock_start_mhz"),
                        sm_clock_end_mhz=r.get("sm_clock_end_mhz"))


def spread(times: list) -> float:
    """Relative spread of repeated times: (max - min) / median (0 for one time)."""
    return (max(times) - min(times)) / statistics.median(times) if len(times) > 1 else 0.0


def choose_winner(confirmed: dict, default_key: str, min_margin: float = MIN_MARGIN) -> Optional[dict]:
    """The noise rule. ``confirmed``: variant key -> its repeated times (None: it failed during confirmation).

    Returns ``{"key", "us", "spread", "default_us", "default_spread", "rule"}`` (``us``: medians), or None
    when nothing was confirmed. The fastest median wins only if its slowest repeat is faster than the
    default's fastest and its median is at least ``min_margin`` below the default's; else the default stays.
    (Comparing medians against the spread alone let uniform +-2% noise pick a false winner in 1 of 4 seeded
    synthetic studies: the fastest of several equal candidates is often low by chance.)
    """
    ok = {k: ts for k, ts in confirmed.items() if ts}
    if not ok:
        return None
    med = {k: statistics.median(ts) for k, ts in ok.items()}
    best = min(med, key=lambda k: (med[k], k != default_key, k))
    out = {"key": best, "us": med[best], "spread": spread(ok[best]),
           "default_us": med.get(default_key), "default_spread": spread(ok[default_key]) if default_key in ok else None}
    if default_key not in ok:
        out["rule"] = "fastest median; the default failed or was not measured"
    elif best == default_key:
        out["rule"] = "the default has the fastest median"
    else:
        gain = 1 - med[best] / med[default_key]
        if max(ok[best]) < min(ok[default_key]) and gain >= min_margin:
            out["rule"] = (f"faster than the default by {gain:.1%}, every repeat below every repeat of the default "
                           f"(spreads {out['spread']:.1%} and {out['default_spread']:.1%})")
        else:
            out.update(key=default_key, us=med[default_key], spread=out["default_spread"],
                       rule=f"default kept: {best} ({gain:+.1%}) not faster beyond the noise")
    return out


def confirm(worker, w: Workload, candidates: list, db: TuningDB, run_id: int, name: str, seed: int,
            source_hash: str, rounds: int, phase: str = "confirm") -> dict:
    """Re-measure ``candidates`` (Variants) in ``rounds`` interleaved rounds, each in a rotated order; every
    measurement is a ``phase`` trial. Returns variant key -> times (None once a candidate fails)."""
    times: dict = {v.key: [] for v in candidates}
    n = len(candidates)
    for r in range(rounds):
        for v in candidates[r % n:] + candidates[:r % n]:
            if times[v.key] is None:
                continue
            res = worker.measure(v.as_dict(), dataclasses.asdict(w.shape), seed)
            _add_trial(db, run_id, name, v, w, res, phase, seed, source_hash)
            if res["state"] == "ok":
                times[v.key].append(res["us"])
            else:
                times[v.key] = None
    return times


def bucket_check(worker, w: Workload, winner: Variant, default: Variant, db: TuningDB, run_id: int, name: str,
                 seed: int, source_hash: str, rounds: int = BUCKET_ROUNDS,
                 tolerance: float = BUCKET_TOLERANCE) -> Optional[str]:
    """Measure ``winner`` beside ``default`` at the edges of ``w``'s length bucket (``BUCKET_EDGES``), ``rounds``
    interleaved rounds each (``bucket`` trials). Returns None where the winner's median is nowhere more than
    ``tolerance`` above the default's, else the rule text that keeps the default."""
    centre = bucket_seqlen(w.mean_sk)
    for f in BUCKET_EDGES:
        edge = dataclasses.replace(w, mean_sk=max(1, round(centre * f)))
        times = confirm(worker, edge, [winner, default], db, run_id, name, seed, source_hash, rounds, phase="bucket")
        if times[winner.key] is None:
            return f"default kept: {winner.key} failed at s_k = {edge.mean_sk} (same length bucket)"
        if times[default.key] is None:
            continue                                  # no evidence against the winner at this edge
        ratio = statistics.median(times[winner.key]) / statistics.median(times[default.key])
        if ratio > 1.0 + tolerance:
            return (f"default kept: {winner.key} faster at s_k = {w.mean_sk} but {ratio - 1:.1%} slower than the "
                    f"default at s_k = {edge.mean_sk} (same length bucket)")
    return None


def journal_storage(path: str):
    """Optuna's file journal: safe for several processes on one machine."""
    from optuna.storages import JournalStorage
    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna < 4
        from optuna.storages import JournalFileStorage as JournalFileBackend
    return JournalStorage(JournalFileBackend(path))


#: Heartbeat of a running trial in an RDB storage (seconds), and how long a silent one lives before it is failed
#: and retried: a worker killed mid-trial costs at most this delay, never the measurement.
HEARTBEAT_S = 10
GRACE_S = 60


def open_storage(spec: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S):
    """``spec`` is an RDB URL (``sqlite:///...``, ``postgresql+psycopg2://...``: an RDBStorage with a trial
    heartbeat, whose stale trials are failed and re-queued with the same variant) or a journal file path."""
    if "://" not in spec:
        return journal_storage(spec)
    from optuna import storages
    with warnings.catch_warnings():                 # heartbeats and the retry callback are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # optuna >= 4.9 names the retry callback and its keyword after stale heartbeats; older ones after failures
        if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
            retry = {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=3)}
        else:
            retry = {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=3)}
        return storages.RDBStorage(spec, heartbeat_interval=heartbeat_s, grace_period=grace_s, **retry)


def _heartbeat(study, trial):
    """A started heartbeat thread for ``trial`` (a no-op one where the storage has no heartbeat)."""
    try:
        from optuna.storages._heartbeat import get_heartbeat_thread
    except ImportError:                              # pragma: no cover - optuna without heartbeats
        return None
    hb = get_heartbeat_thread(trial._trial_id, study._storage)
    hb.start()
    return hb


def _refresh_known(study, known: dict) -> None:
    """Merge in what any worker of the study has measured since: completed trials (their time) and failed
    ones that were measured (a failed check, a crash). A trial failed by a stale heartbeat was not measured."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    for t in study.get_trials(deepcopy=False, states=states):
        k = t.user_attrs.get("variant_key")
        if not k:
            continue
        if t.state == optuna.trial.TrialState.COMPLETE:
            known[k] = t.value if known.get(k) is None else min(known[k], t.value)
        elif t.user_attrs.get("measured"):
            known.setdefault(k, None)


def _enqueue_unmeasured(study, w: Workload, valid: set, known: dict, claims, name: str) -> None:
    """Queue one valid variant nobody has measured or claimed (in the space's order), so that a sampler that
    keeps proposing measured points near the end of a finite space does not spin."""
    taken = set(known) | (set(claims.holders(name)) if claims is not None else set())
    for v in search_space(w.dtype, w.page_size):
        if v.key in valid and v.key not in taken:
            study.enqueue_trial({k: getattr(v, k) for k in KNOBS})
            return


def nearest_per_value(center: Variant, space: Sequence[Variant]) -> list[Variant]:
    """For every knob value other than ``center``'s, the variant of ``space`` nearest to ``center`` with that value
    (one knob away where that is valid; otherwise the fewest knobs changed, e.g. qk=qreg with its three
    warpgroups; the first in space order among equals), in KNOBS order, without repeats."""
    out = []
    for knob, values in KNOBS.items():
        for value in values:
            with_value = [c for c in space if getattr(c, knob) == value]
            if value == getattr(center, knob) or not with_value:
                continue
            v = min(with_value, key=lambda c: sum(getattr(c, k) != getattr(center, k) for k in KNOBS))
            if v not in out:
                out.append(v)
    return out


def seed_points(w: Workload) -> list[Variant]:
    """The default variant and its :func:`nearest_per_value` points: a new study measures these first. Each knob
    value's effect on this workload is then seen once (the merge path alone moves times by 4-14% at batch >= 8 on
    the H100: bench/results/h100-held-out-evaluation-2026-11-23.txt), which 5 random startup trials of the space
    often miss."""
    d = default_variant(w.dtype, w.page_size)
    return [d] + nearest_per_value(d, search_space(w.dtype, w.page_size))


def first_points(w: Workload, transfer_rows: Sequence[Mapping], gpu_name: str) -> list[Variant]:
    """What a new study of ``w`` measures before its local step: the default, then the stored winners
    :func:`~flash_mla.tuner.transfer.transfer_points` finds nearest in ``transfer_rows``; where it finds none, the
    default's one-knob neighbours (:func:`seed_points`). With stored winners to start from, the local step takes it
    from the best of them and the default (bench/search_replay.py)."""
    seeds = seed_points(w)
    first = [seeds[0], *transfer_points(w, transfer_rows, gpu_name)]
    return first if len(first) > 1 else seeds


def incumbent_neighbours(best: Variant, space: Sequence[Variant], known) -> list[Variant]:
    """The best variant so far's :func:`nearest_per_value` points that nobody has measured: the local step a study
    takes once its queued points are measured. The seeds are nearest to the default; a winner further away (on the
    H100, qk=qreg with the separate merge at h_q >= 64: 2-7% faster than qreg with the wide merge that the seeded
    studies stored, bench/results/h100-merge-paths-2026-11-24.txt) is near the best seed."""
    return [v for v in nearest_per_value(best, space) if v.key not in known]


def stored_winners(out_db: Optional[TuningDB] = None) -> list[dict]:
    """The winner rows a new study can start from (:mod:`flash_mla.tuner.transfer`): the shipped database's, the
    user database's (``$FLASH_MLA_TUNING_DB``) and those already in ``out_db``, every GPU."""
    rows = list(out_db.winners()) if out_db is not None else []
    for path in (shipped_db_path(), user_db_path()):
        if path is None or not path.is_file() or (out_db is not None and path.resolve() == out_db.path.resolve()):
            continue
        with TuningDB(path, readonly=True) as src:
            rows += src.winners()
    return rows


def _dead_without_measuring(study):
    """``holder_is_dead(trial_number)`` for :meth:`Claims.claim`: the holder trial was failed (stale heartbeat)
    before any measurement was recorded for it."""
    def dead(number: int) -> bool:
        for t in study.get_trials(deepcopy=False):
            if t.number == number:
                return t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get("measured")
        return False
    return dead


def study_name(gpu_name: str, w: Workload) -> str:
    """One study per GPU, workload and kernel source: a study resumed after the kernels changed starts
    afresh instead of reusing timings of the old code (the DB's trial rows keep the name, so each
    measurement records the kernel source it timed)."""
    return f"{gpu_name.replace(' ', '_')}:{w.key}:k{kernel_source_digest()}"


def variant_from_trial(trial: optuna.trial.BaseTrial, w: Workload) -> Variant:
    knobs = {k: trial.suggest_categorical(k, list(values)) for k, values in KNOBS.items()}
    return Variant(dtype=w.dtype, page_size=w.page_size, **knobs)


class SpaceBuild(Mapping):
    """The binaries a tuning run may measure, compiled in the background while it measures.

    ``first`` (the variants the studies measure first: each workload's :func:`first_points`) are compiled
    before the rest of ``space``, ``jobs`` compilations at a time, each variant on its own (one ninja run of one
    job), so that a binary is ready, and may be measured, as soon as its own compilation ends rather than when the
    slowest of a batch does; :meth:`prioritise` moves variants a study is about to measure to the front of what
    is not being built yet. As a mapping it is build key -> why the build may not be measured (failed, spilling,
    serialised wgmmas: :meth:`Artifact.rejection`), and a lookup of a key waits until that build has finished: a
    study measures a variant only once its binary exists and is known to be acceptable, and starts measuring after
    its first point's compilation instead of after the whole space (on the H100 machine's 16 cores the 120 bf16 /
    page-64 binaries took ~9.5 min). Keys outside the space are never waited for."""

    def __init__(self, space: Sequence[Variant], first: Sequence[Variant] = (), jobs: Optional[int] = None,
                 build_fn: Callable = None):
        order: dict[str, Variant] = {}
        for v in list(first) + list(space):
            order.setdefault(v.build_key, v)
        self._pending = collections.deque(order.values())
        self._known = set(order)
        self._why: dict[str, str] = {}
        self._finished: set[str] = set()
        self._unbuilt: set[str] = set()             # left when the build was stopped
        self._build = build_fn or build
        self._stop = False
        self._cv = threading.Condition()
        self._threads = [threading.Thread(target=self._run, name=f"flash-mla-space-build-{i}", daemon=True)
                         for i in range(max(1, min(jobs or os.cpu_count() or 1, len(order))))]
        for t in self._threads:
            t.start()

    def prioritise(self, variants: Sequence[Variant]) -> None:
        """Build these next (those not built or being built), in this order."""
        with self._cv:
            keys = [v.build_key for v in variants]
            front = [v for v in self._pending if v.build_key in keys]
            front.sort(key=lambda v: keys.index(v.build_key))
            rest = [v for v in self._pending if v.build_key not in keys]
            self._pending = collections.deque(front + rest)

    def _run(self) -> None:
        while True:
            with self._cv:
                if self._stop or not self._pending:
                    break
                v = self._pending.popleft()
            try:
                (artifact,) = self._build([v], jobs=1)
                why = artifact.rejection()
            except Exception as e:                # never leave a waiting study hanging: such a build is rejected
                why = f"compilation failed: the build raised {type(e).__name__}: {e}"
            with self._cv:
                if why:
                    self._why[v.build_key] = why
                self._finished.add(v.build_key)
                self._cv.notify_all()
        with self._cv:
            self._stop = True
            for v in self._pending:               # stopped early: what was not built may not be measured
                self._why.setdefault(v.build_key, "not built (the run's background build was stopped)")
                self._unbuilt.add(v.build_key)
                self._finished.add(v.build_key)
            self._pending.clear()
            self._cv.notify_all()

    def _wait(self, key: str) -> None:
        if key in self._known:
            with self._cv:
                self._cv.wait_for(lambda: key in self._finished)

    def __contains__(self, key) -> bool:
        self._wait(key)
        return key in self._why

    def __getitem__(self, key: str) -> str:
        self._wait(key)
        return self._why[key]

    def __iter__(self):                           # the rejections known so far
        with self._cv:
            return iter(dict(self._why))

    def __len__(self) -> int:
        with self._cv:
            return len(self._why)

    def rejected(self) -> dict[str, str]:
        """The builds that finished and may not be measured, with why (not those left unbuilt by :meth:`close`)."""
        with self._cv:
            return {k: why for k, why in self._why.items() if k not in self._unbuilt}

    def close(self) -> None:
        """Stop after the compilations in progress (the rest stays unbuilt) and wait for them."""
        with self._cv:
            self._stop = True
        for t in self._threads:
            t.join()


def start_space_build(workloads: Sequence[Workload], first: Sequence[Variant] = (),
                      jobs: Optional[int] = None) -> SpaceBuild:
    """A :class:`SpaceBuild` of the searched spaces of the workloads' dtypes and page sizes, ``first`` first."""
    keys = dict.fromkeys((w.dtype, w.page_size) for w in workloads)
    return SpaceBuild([v for d, ps in keys for v in search_space(d, ps)], first, jobs=jobs)


def _build_failure(build_failed: Mapping[str, str], v: Variant) -> Optional[dict]:
    """The trial result of a variant whose build was rejected (``build_failed``: build key -> why, a plain mapping
    or a :class:`SpaceBuild`), else None. A :class:`SpaceBuild` compiles ``v`` next and is waited for."""
    if isinstance(build_failed, SpaceBuild):
        build_failed.prioritise([v])
    if v.build_key not in build_failed:
        return None
    return {"state": "build_failed", "error": build_failed[v.build_key]}


@dataclasses.dataclass
class StudyResult:
    workload: Workload
    best: Optional[dict]            # {"variant": Variant, "us": float, "trial_index": int}
    default_us: Optional[float]
    history: list                   # (trial_index, variant_key, state, us) in measurement order
    sweep: Optional[dict] = None    # filled by sweep(): the exhaustive reference of the search
    choice: Optional[dict] = None   # the noise rule's verdict (choose_winner) where confirmation ran
    confirmed: Optional[dict] = None  # variant key -> confirmation times


def tune_workload(w: Workload, storage, db: TuningDB, run_id: int, gpu_name: str, *, n_trials: int,
                  timeout_s: Optional[float] = None, trial_timeout_s: float = 120.0, gpu: Optional[int] = None,
                  seed: int = 0, build_failed: Mapping[str, str] = MappingProxyType({}),
                  on_trial: Optional[Callable[[dict], None]] = None, measurer=None,
                  confirm_top: int = CONFIRM_TOP, confirm_rounds: int = CONFIRM_ROUNDS, claims=None,
                  worker_index: int = 0, bucket_rounds: int = BUCKET_ROUNDS,
                  transfer_rows: Sequence[Mapping] = ()) -> StudyResult:
    """Run (or continue) the study of ``w`` for up to ``n_trials`` new measurements, then confirm its best
    ``confirm_top`` candidates beside the default in ``confirm_rounds`` interleaved rounds (0: no
    confirmation; the winner is then the lowest single time), and a winner other than the default at the edges
    of the length bucket in ``bucket_rounds`` rounds each (0: no bucket check).

    ``measurer`` (default: a :class:`Worker` subprocess on ``gpu``) has ``measure(variant_dict,
    shape_dict, seed) -> {"state", "us", ...}`` and ``stop()``; tests pass a synthetic one.

    A new study measures the default first, then the winners that :func:`~flash_mla.tuner.transfer.transfer_points`
    finds nearest in ``transfer_rows`` (stored winners, any GPU); where it finds none, the rest of
    :func:`seed_points`. Whenever nothing is queued, the best variant so far's unmeasured nearest points per knob
    value (:func:`incumbent_neighbours`) are queued next (once per best variant: with transferred winners, the
    default's neighbours are measured only where the default is still the best); the sampler (TPE) proposes the
    other points. Replayed over the measured times of the whole 240-point H100 space on the 24 held-out workloads
    (``bench/search_replay.py``), this reaches 3% of the space's best within 24 measurements on 23 of 24 (two
    evaluate runs), against 21 and 20 with two transferred winners followed by all of the default's neighbours.

    Several workers may share the study (``worker_index`` 0, 1, ...: each samples with its own seed, and
    TPE's constant liar keeps them off each other's running points). ``claims`` (a
    :class:`~flash_mla.tuner.claims.Claims`) makes each variant measured by one worker only; where the storage
    has a heartbeat, trials of a killed worker are failed and retried by the others.
    """
    name = study_name(gpu_name, w)
    source_hash = kernel_source_digest()
    with warnings.catch_warnings():                # constant_liar is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed + 7919 * worker_index, n_startup_trials=5,
                                             constant_liar=True)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True,
                                sampler=sampler)
    if worker_index == 0 and not study.get_trials(deepcopy=False):
        for v in first_points(w, transfer_rows, gpu_name):
            study.enqueue_trial({k: getattr(v, k) for k in KNOBS})
    by_key = {v.key: v for v in search_space(w.dtype, w.page_size)}
    valid = set(by_key)
    # Results already in the study (a resumed or shared study) are reused, never re-measured.
    known: dict[str, Optional[float]] = {}
    _refresh_known(study, known)
    # The DB row of a measurement is written before Optuna is told; a process killed in between leaves
    # the row without the tell. Rows of this study count as measured too, so nothing is measured twice.
    for t in db.trials(study=name):
        if t.get("phase") == "confirm":
            continue
        if t["state"] == "ok":
            known[t["variant_key"]] = min(t["time_us"], known.get(t["variant_key"]) or float("inf"))
        elif t["state"] in MEASURED_FAILURES:
            known.setdefault(t["variant_key"], None)
    worker = measurer if measurer is not None else Worker(gpu=gpu, timeout_s=trial_timeout_s)
    history, measured, t0 = [], 0, time.time()
    hb, reuses = None, 0
    expanded: set[str] = set()                       # best variants whose neighbours were queued
    try:
        while measured < n_trials and len(known) < len(valid):
            if timeout_s is not None and time.time() - t0 > timeout_s:
                break
            if claims is not None:                    # what the other workers measured meanwhile
                _refresh_known(study, known)
                if len(known) >= len(valid):
                    break
            ok_now = {k: u for k, u in known.items() if u is not None and k in by_key}
            if ok_now and not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
                best = min(ok_now, key=ok_now.get)
                if best not in expanded:              # the local step around the best variant so far
                    expanded.add(best)
                    step = incumbent_neighbours(by_key[best], list(by_key.values()), known)
                    if isinstance(build_failed, SpaceBuild):
                        build_failed.prioritise(step)
                    for v in step:
                        study.enqueue_trial({k: getattr(v, k) for k in KNOBS})
            with warnings.catch_warnings():            # trials of killed workers: failed, then re-queued
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                optuna.storages.fail_stale_trials(study)
                trial = study.ask()
            hb = _heartbeat(study, trial)
            v = variant_from_trial(trial, w)
            trial.set_user_attr("variant_key", v.key)
            if v.key not in valid:
                db.add_trial(run_id, name, v, w.as_dict(), "invalid", error="rejected by Variant.validate()",
                             phase="search", seed=seed, source_hash=source_hash)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                hb = _stop(hb)
                continue
            if v.key in known:                        # sampled again: reuse, costs nothing
                if known[v.key] is None:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, known[v.key])
                hb = _stop(hb)
                reuses += 1
                if reuses >= 3:                       # the sampler keeps to measured points: hand it a new one
                    _enqueue_unmeasured(study, w, valid, known, claims, name)
                    reuses = 0
                continue
            reuses = 0
            if claims is not None and not claims.claim(name, v.key, trial.number, _dead_without_measuring(study)):
                trial.set_user_attr("skipped", "being measured by another worker")
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                hb = _stop(hb)
                time.sleep(0.1)                       # the rest of the space may be in others' hands: back off
                continue
            r = _build_failure(build_failed, v) or worker.measure(v.as_dict(), dataclasses.asdict(w.shape), seed)
            measured += 1
            trial.set_user_attr("measured", True)
            _add_trial(db, run_id, name, v, w, r, "search", seed, source_hash)
            if r["state"] == "ok":
                known[v.key] = r["us"]
                study.tell(trial, r["us"])
            else:
                known[v.key] = None
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            hb = _stop(hb)
            history.append((len(history), v.key, r["state"], r.get("us")))
            if on_trial:
                best = min((x for x in known.values() if x is not None), default=None)
                on_trial({"variant": v.key, "state": r["state"], "us": r.get("us"), "best_us": best})
        d = default_variant(w.dtype, w.page_size)       # always measured: the winner row reports it
        if claims is not None:
            _refresh_known(study, known)
        if d.key not in known and (claims is None or claims.claim(name, d.key, -1 - worker_index,
                                                                   lambda number: False)):
            r = worker.measure(d.as_dict(), dataclasses.asdict(w.shape), seed)
            _add_trial(db, run_id, name, d, w, r, "search", seed, source_hash)
            known[d.key] = r.get("us") if r["state"] == "ok" else None
        confirmed = choice = None
        ranked = sorted((u, k) for k, u in known.items() if u is not None and k in by_key)
        if confirm_rounds > 0 and ranked:
            cands = [by_key[k] for _, k in ranked[:confirm_top]]
            # the default, unless it failed (a worker that did not measure it itself confirms it all the same)
            if d.key not in {c.key for c in cands} and not (d.key in known and known[d.key] is None):
                cands.append(d)
            confirmed = confirm(worker, w, cands, db, run_id, name, seed, source_hash, confirm_rounds)
            choice = choose_winner(confirmed, d.key)
            # A candidate the bucket check rejects gives way to the next confirmed one that beats the default
            # beyond the noise (then to the default); the rejections stay in the rule.
            rejected, whys = set(), []
            while (choice is not None and choice["key"] != d.key and choice["default_us"] is not None
                   and bucket_rounds > 0):
                why = bucket_check(worker, w, by_key[choice["key"]], d, db, run_id, name, seed, source_hash,
                                   bucket_rounds)
                if why is None:
                    break
                rejected.add(choice["key"])
                whys.append(why)
                choice = choose_winner({k: ts for k, ts in confirmed.items() if k not in rejected}, d.key)
            if whys:                                      # (the default stays in confirmed: choice is not None)
                if choice["key"] == d.key:
                    choice["rule"] = "; ".join(whys)
                else:                                     # "default kept: X ..." -> "after X ..."
                    choice["rule"] += " (after " + "; ".join(why.removeprefix("default kept: ") for why in whys) + ")"
    finally:
        _stop(hb)
        worker.stop()
    ok = {k: u for k, u in known.items() if u is not None}
    default_us = known.get(d.key)
    if choice is not None:
        best_key, best_us, default_us = choice["key"], choice["us"], choice["default_us"]
    elif ok:
        best_key = min(ok, key=ok.get)
        best_us = ok[best_key]
    else:
        return StudyResult(w, None, default_us, history, confirmed=confirmed)
    trial_index = next((i for i, k, s, u in history if k == best_key), None)
    return StudyResult(w, {"variant": by_key[best_key], "us": best_us, "trial_index": trial_index},
                       default_us, history, choice=choice, confirmed=confirmed)


def _stop(hb) -> None:
    if hb is not None:
        hb.join()
    return None


def record(db: TuningDB, run_id: int, res: StudyResult, gpu_name: str) -> None:
    """Store the study's winner (an 'ok' trial of this run) in the winners table."""
    if res.best is None:
        return
    name = study_name(gpu_name, res.workload)
    dv = default_variant(res.workload.dtype, res.workload.page_size)
    if res.choice is not None:
        # The confirmation trial of this run nearest the winner's median carries the row's provenance.
        rows = [t for t in db.trials(study=name, variant_key=res.best["variant"].key, state="ok", run_id=run_id)
                if t.get("phase") == "confirm"]
        if rows:
            row = min(rows, key=lambda t: abs(t["time_us"] - res.choice["us"]))
            c = res.choice
            db.record_winner(row["id"], default_variant_key=dv.key, default_time_us=c["default_us"],
                             n_trials=len(res.history), time_us=c["us"],
                             n_repeats=len(res.confirmed[c["key"]]), time_spread=c["spread"],
                             default_time_spread=c["default_spread"], rule=c["rule"])
            return
    rows = [t for t in db.trials(study=name, variant_key=res.best["variant"].key, state="ok")]
    if not rows:                                   # measured in an earlier run of the study
        rows = [{"id": db.add_trial(run_id, name, res.best["variant"], res.workload.as_dict(), "ok",
                                    time_us=res.best["us"])}]
    best_row = min(rows, key=lambda t: t.get("time_us") or float("inf"))
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
          seed: int = 0, build_failed: Mapping[str, str] = MappingProxyType({}), trial_timeout_s: float = 120.0,
          measurer=None) -> dict:
    """Measure every valid variant of the space (the exhaustive answer the search is judged against)."""
    worker = measurer if measurer is not None else Worker(gpu=gpu, timeout_s=trial_timeout_s)
    name = study_name(gpu_name, w) + ":sweep"
    source_hash = kernel_source_digest()
    times = {}
    try:
        for v in search_space(w.dtype, w.page_size):
            r = _build_failure(build_failed, v) or worker.measure(v.as_dict(), dataclasses.asdict(w.shape), seed)
            _add_trial(db, run_id, name, v, w, r, "sweep", seed, source_hash)
            if r["state"] == "ok":
                times[v.key] = r["us"]
    finally:
        worker.stop()
    if not times:
        return {"n": 0, "best_key": None, "best_us": None, "trials_to_3pct": None}
    best_key = min(times, key=times.get)
    return {"n": len(times), "best_key": best_key, "best_us": times[best_key], "times": times,
            "trials_to_3pct": trials_to_within(measured_history(storage, gpu_name, w), times[best_key])}


def best_so_far(times: list) -> list:
    """Running minimum of a sequence of times (None: a failed measurement)."""
    out, best = [], float("inf")
    for t in times:
        if t is not None:
            best = min(best, t)
        out.append(best)
    return out


def random_search_median(space_times: list, n: int, seeds: int = 101) -> list:
    """Median best-so-far of random search without replacement over the measured space (``space_times``: one
    time per valid variant, None for a failure), for the first ``n`` measurements, over ``seeds`` orders."""
    import random
    curves = []
    for s in range(seeds):
        order = list(space_times)
        random.Random(s).shuffle(order)
        curves.append(best_so_far(order[:n]))
    return [statistics.median(c[k] for c in curves) for k in range(min(n, len(space_times)))]


def plot_search(path, res: "StudyResult", storage, gpu_name: str) -> Optional[str]:
    """A PNG of the study's best-so-far against measured trials, relative to the exhaustive best, with random
    search's median curve over 101 orders beside it (both need the sweep: ``res.sweep``). Written by rename.
    Returns the path, or None without a sweep."""
    import os
    from pathlib import Path
    if not res.sweep or not res.sweep.get("times"):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    best = res.sweep["best_us"]
    study = [t / best for t in best_so_far(measured_history(storage, gpu_name, res.workload)) if t != float("inf")]
    space = list(res.sweep["times"].values())
    rand = [t / best for t in random_search_median(space, len(space))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(study) + 1), study, marker="o", label="this study (best so far)")
    ax.plot(range(1, len(rand) + 1), rand, linestyle="--", label="random search, median of 101 orders")
    ax.axhline(1.03, color="grey", linewidth=0.8, linestyle=":", label="within 3% of the exhaustive best")
    ax.set_xlabel("measured trials")
    ax.set_ylabel("best time / exhaustive best")
    ax.set_title(res.workload.key, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)


def _geomean(xs) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _stored_members(key: WorkloadKey, stored_rows: Sequence[Mapping], gpu_name: str, have: set) -> list:
    """Members of ``key``'s group that earlier runs tuned: winner rows of the same GPU and key but the length
    whose length bucket is not in ``have``, as results whose workload is the row's bucket centres and whose best is
    the row's variant (when this package can build it; else only the default is a candidate there)."""
    out, seen = [], set(have)
    for row in stored_rows:
        if row.get("gpu_name") != gpu_name or row.get("seqlen_bucket") == NO_HINT:
            continue
        k = WorkloadKey.from_row(row)
        if k.without_hint() != key or k in seen:
            continue
        seen.add(k)
        w = Workload(k.h_q, k.s_q, k.batch_bucket, k.seqlen_bucket, k.h_kv, k.causal, k.dtype, k.page_size)
        v = stored_variant(row)
        best = None if v is None else {"variant": v, "us": row["time_us"], "trial_index": None}
        out.append(StudyResult(w, best, row.get("default_time_us"), []))
    return out


def no_hint_winners(results: list, db: TuningDB, run_id: int, gpu_name: str, *, gpu: Optional[int] = None,
                    seed: int = 0, trial_timeout_s: float = 120.0, measurer=None,
                    stored_rows: Sequence[Mapping] = (),
                    build_failed: Mapping[str, str] = MappingProxyType({})) -> list[dict]:
    """Winners for calls without a length hint (``seqlen_bucket = NO_HINT``, see flash_mla.workload_key).

    The tuned workloads are grouped by their key without the length. A group also takes the lengths that
    earlier runs tuned for it on this GPU (``stored_rows``: winner rows, e.g. :func:`stored_winners`; their
    bucket centres are measured), so that a run over some lengths does not leave a row chosen over those alone
    to replace one chosen over more when the databases are merged. In each group the candidates are the
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
    for key, members in groups.items():
        members += _stored_members(key, stored_rows, gpu_name, {m.workload.workload_key for m in members})
    out = []
    if not groups:
        return out
    worker = measurer if measurer is not None else Worker(gpu=gpu, timeout_s=trial_timeout_s)
    source_hash = kernel_source_digest()
    try:
        for key, members in groups.items():
            dv = default_variant(key.dtype, key.page_size)
            cands = {dv.key: dv}
            for res in members:
                if res.best is not None:
                    cands.setdefault(res.best["variant"].key, res.best["variant"])
            times: dict = {}                       # (variant key, workload key) -> us or None (failed)
            for res in members:
                w = res.workload
                name = study_name(gpu_name, w)
                confirmed = {}                     # medians of the confirmation repeats, where they exist
                for vk, ts in (res.confirmed or {}).items():
                    if ts:
                        confirmed[(vk, w.key)] = statistics.median(ts)
                for t in db.trials(study=name, state="ok"):
                    k = (t["variant_key"], w.key)
                    times[k] = min(t["time_us"], times.get(k) or float("inf"))
                times.update(confirmed)
                for vk, v in cands.items():
                    if (vk, w.key) in times:
                        continue
                    r = _build_failure(build_failed, v) or worker.measure(v.as_dict(), dataclasses.asdict(w.shape),
                                                                           seed)
                    _add_trial(db, run_id, name, v, w, r, "no_hint", seed, source_hash)
                    times[(vk, w.key)] = r["us"] if r["state"] == "ok" else None
            # a stored length where every candidate failed here leaves the group (a run member has its best)
            members = [res for res in members if any(times.get((vk, res.workload.key)) is not None for vk in cands)]
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
            tid = db.add_trial(run_id, name, cands[vk], wl, "ok", time_us=us, phase="no_hint", seed=seed,
                               source_hash=source_hash)
            db.record_winner(tid, default_variant_key=dv.key, default_time_us=d_us,
                             n_trials=sum(len(res.history) for res in members))
            out.append({"key": key, "variant": cands[vk], "us": us, "default_us": d_us, "score": score,
                        "workloads": [res.workload.key for res in members]})
    finally:
        worker.stop()
    return out
