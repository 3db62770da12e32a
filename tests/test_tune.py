"""Search plumbing of the tuner, driven by a deterministic SYNTHETIC objective (no GPU).

The real objective (a CUDA-graph-timed, reference-checked kernel in a worker process) runs on the GPU;
here a closed-form cost stands in for it so the Optuna study, resume, DB records and winner selection
can be tested on any machine.
"""

from __future__ import annotations

import pytest

optuna = pytest.importorskip("optuna")

from flash_mla.codegen.variant import Variant, default_variant, search_space
from flash_mla.db import TuningDB
from flash_mla.tuner import tune
from flash_mla.tuner.workloads import SUITES, Workload, suite

GPU = "Synthetic GPU"
HW = {"gpu_name": GPU, "sm_count": 132, "cuda_version": "13.0", "driver_version": None, "torch_version": "x",
      "package_version": "0", "hostname": "test"}


class SyntheticMeasurer:
    """Cost = a fixed function of the knobs; one chosen variant fails its reference check."""

    def __init__(self, failing_key=None):
        self.calls = []
        self.failing_key = failing_key

    def measure(self, variant, shape, seed=0):
        v = Variant.from_dict(variant)
        self.calls.append(v.key)
        if v.key == self.failing_key:
            return {"state": "failed_check", "error": "synthetic mismatch"}
        us = 100.0 + 7 * abs(v.block_n - 64) / 32 + 3 * abs(v.stages - 2) + 5 * (v.num_warpgroups - 2) \
            + 0.5 * v.split_overhead + 0.25 * abs(v.split_min_blocks - 4) / 4 \
            + (0.0 if v.merge == "wide_pdl" else 2.0) + {"nsplit": 1.0, "full_wg": 0.0, "full_wg_ahead": 1.5}[v.qk]
        return {"state": "ok", "us": us, "gbs": 1.0, "tflops": 1.0}

    def stop(self):
        pass


def synthetic_best(w):
    m = SyntheticMeasurer()
    return min(search_space(w.dtype, w.page_size), key=lambda v: m.measure(v.as_dict(), {})["us"])


@pytest.fixture
def env(tmp_path):
    storage = tune.journal_storage(str(tmp_path / "studies.journal"))
    db = TuningDB(tmp_path / "t.sqlite")
    run_id = db.add_run(HW)
    yield storage, db, run_id, tmp_path
    db.close()


def test_suites_cover_the_deepseek_shapes():
    assert {w.h_q for w in suite("dsv3-tp1")} == {128} and {w.h_q for w in suite("dsv3-tp8")} == {16}
    assert all(w.s_q == 2 and w.causal for w in suite("dsv3-mtp"))
    for ws in SUITES.values():
        assert len({w.key for w in ws}) == len(ws) >= 4          # several batch and seqlen buckets
    with pytest.raises(ValueError, match="unknown suite"):
        suite("nope")


def test_study_finds_the_synthetic_optimum_and_records_it(env):
    storage, db, run_id, _ = env
    w = Workload(128, 1, 32, 4096)
    m = SyntheticMeasurer()
    space = search_space(w.dtype, w.page_size)
    res = tune.tune_workload(w, storage, db, run_id, GPU, n_trials=len(space) + 10, measurer=m)
    assert len(set(m.calls)) == len(m.calls) == len(space)      # no variant measured twice, space exhausted
    assert res.best["variant"] == synthetic_best(w)
    assert res.default_us is not None
    tune.record(db, run_id, res, GPU)
    (row,) = db.winners()
    assert row["variant_key"] == res.best["variant"].key and row["time_us"] == res.best["us"]
    assert row["default_variant_key"] == default_variant().key
    assert row["h_q"] == 128 and row["batch_bucket"] == 32 and row["seqlen_bucket"] == 4096
    states = {t["state"] for t in db.trials()}
    assert "ok" in states


def test_invalid_variants_never_measured(env):
    storage, db, run_id, _ = env
    w = Workload(16, 1, 4, 2048)
    m = SyntheticMeasurer()
    tune.tune_workload(w, storage, db, run_id, GPU, n_trials=100, measurer=m)
    valid = {v.key for v in search_space(w.dtype, w.page_size)}
    assert set(m.calls) <= valid
    invalid = db.trials(state="invalid")
    assert all(t["variant_key"] not in valid for t in invalid)


def test_failed_check_can_never_win(env):
    storage, db, run_id, _ = env
    w = Workload(128, 1, 32, 4096)
    best = synthetic_best(w)
    res = tune.tune_workload(w, storage, db, run_id, GPU, n_trials=100, measurer=SyntheticMeasurer(best.key))
    assert res.best["variant"] != best
    assert db.trials(variant_key=best.key, state="failed_check")
    tune.record(db, run_id, res, GPU)
    assert db.winners()[0]["variant_key"] != best.key


def test_study_resumes_without_remeasuring(env):
    storage, db, run_id, tmp_path = env
    w = Workload(128, 2, 128, 8192, causal=True)
    first = SyntheticMeasurer()
    tune.tune_workload(w, storage, db, run_id, GPU, n_trials=5, measurer=first)
    assert len(first.calls) in (5, 6)          # 5 trials, + the default variant when the study missed it
    # a new process: storage reopened from the same journal file
    storage2 = tune.journal_storage(str(tmp_path / "studies.journal"))
    second = SyntheticMeasurer()
    res = tune.tune_workload(w, storage2, db, run_id, GPU, n_trials=100, measurer=second)
    assert not set(first.calls) & set(second.calls)        # the default too: its DB row counts as measured
    assert res.best["variant"] == synthetic_best(w)
    measured = [t["variant_key"] for t in db.trials(study=tune.study_name(GPU, w)) if t["state"] != "invalid"]
    assert sorted(measured) == sorted(v.key for v in search_space())   # each variant measured exactly once
    assert len(tune.measured_history(storage2, GPU, w)) >= len(search_space()) - 1


def test_trials_to_within():
    assert tune.trials_to_within([None, 120.0, 104.0, 101.0], 100.0) == 4
    assert tune.trials_to_within([100.0], 100.0) == 1
    assert tune.trials_to_within([150.0, None], 100.0) is None


def test_sweep_reports_trials_to_3pct(env):
    storage, db, run_id, _ = env
    w = Workload(16, 1, 128, 8192)
    tune.tune_workload(w, storage, db, run_id, GPU, n_trials=100, measurer=SyntheticMeasurer())
    sw = tune.sweep(w, storage, db, run_id, GPU, measurer=SyntheticMeasurer())
    assert sw["n"] == len(search_space()) and sw["best_key"] == synthetic_best(w).key
    assert 1 <= sw["trials_to_3pct"] <= len(search_space())


def test_a_kill_between_the_db_row_and_the_tell_measures_nothing_twice(env, monkeypatch):
    storage, db, run_id, tmp_path = env
    w = Workload(16, 1, 4, 2048)
    real_add = db.add_trial
    calls = {"n": 0}

    def killed_after_third_row(*a, **k):
        tid = real_add(*a, **k)                       # the row is written ...
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")         # ... and the process dies before study.tell
        return tid
    monkeypatch.setattr(db, "add_trial", killed_after_third_row)
    first = SyntheticMeasurer()
    with pytest.raises(KeyboardInterrupt):
        tune.tune_workload(w, storage, db, run_id, GPU, n_trials=10, measurer=first)
    monkeypatch.setattr(db, "add_trial", real_add)
    storage2 = tune.journal_storage(str(tmp_path / "studies.journal"))   # a new process resumes
    second = SyntheticMeasurer()
    tune.tune_workload(w, storage2, db, run_id, GPU, n_trials=100, measurer=second)
    assert not set(first.calls) & set(second.calls)
    measured = [t["variant_key"] for t in db.trials(study=tune.study_name(GPU, w)) if t["state"] != "invalid"]
    assert len(measured) == len(set(measured)) == len(search_space())


def test_a_kernel_change_starts_a_new_study(env, monkeypatch):
    storage, db, run_id, _ = env
    w = Workload(16, 1, 4, 2048)
    first = SyntheticMeasurer()
    tune.tune_workload(w, storage, db, run_id, GPU, n_trials=3, measurer=first)
    old = tune.study_name(GPU, w)
    from flash_mla.codegen import render
    monkeypatch.setattr(tune, "kernel_source_digest", lambda: "changed000")
    assert tune.study_name(GPU, w) != old and tune.study_name(GPU, w).endswith(":kchanged000")
    second = SyntheticMeasurer()
    tune.tune_workload(w, storage, db, run_id, GPU, n_trials=3, measurer=second)
    assert set(first.calls) & set(second.calls)           # measured again: old timings are not reused
    assert render.kernel_source_digest() in old
