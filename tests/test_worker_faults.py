"""Fault injection on the tuner's measuring process (CPU): a variant that kills its worker with SIGSEGV, makes it
exit or hang costs that one trial; the study goes on with a fresh worker, and the variant is recorded and never wins.

The faults are injected by ``$FLASH_MLA_TUNER_FAULT`` into a real worker subprocess; they fire before the worker
touches a GPU, so this runs anywhere. The same setting drives a tuner run on a GPU (see the README).
"""

from __future__ import annotations

import pytest

optuna = pytest.importorskip("optuna")

from flash_mla.codegen.variant import Variant, default_variant, search_space
from flash_mla.db import TuningDB
from flash_mla.tuner import tune
from flash_mla.tuner.worker import FAULT_ENV, Worker, injected_faults
from flash_mla.tuner.workloads import Workload

from test_tune import GPU, HW, SyntheticMeasurer, searched, synthetic_best

SHAPE = {"batch": 1, "s_q": 1, "h_q": 16, "h_kv": 1, "sk": 1024, "varlen": False, "causal": False}


def test_fault_setting_is_parsed_strictly():
    assert injected_faults("") == {}
    assert injected_faults("segv:a_key, hang:b") == {"a_key": "segv", "b": "hang"}
    for bad in ("segv", "boom:a_key", "segv:", ":a_key"):
        with pytest.raises(ValueError, match=FAULT_ENV):
            injected_faults(bad)


@pytest.mark.parametrize("kind, state, error", [("segv", "crashed", "code -11"), ("exit", "crashed", "code 7"),
                                                ("hang", "timeout", "no answer")])
def test_each_fault_costs_one_trial_and_the_next_request_gets_a_fresh_worker(monkeypatch, kind, state, error):
    v = default_variant()
    monkeypatch.setenv(FAULT_ENV, f"{kind}:{v.key}")
    w = Worker(timeout_s=20.0 if kind != "hang" else 3.0)
    try:
        r = w.measure(v.as_dict(), SHAPE)
        assert r["state"] == state and error in r["error"], r
        first = w.proc
        r2 = w.measure(v.as_dict(), SHAPE)           # the same fault again, from a new process
        assert r2["state"] == state and error in r2["error"], r2
        assert w.proc is None or w.proc is not first
    finally:
        w.stop()


class FaultingMeasurer:
    """The synthetic objective, except that the faulted variants go to a real worker process, which dies on them."""

    def __init__(self, worker: Worker, faulted: set[str]):
        self.worker, self.faulted, self.synthetic = worker, faulted, SyntheticMeasurer()

    def measure(self, variant, shape, seed=0):
        if Variant.from_dict(variant).key in self.faulted:
            return self.worker.measure(variant, SHAPE, seed)
        return self.synthetic.measure(variant, shape, seed)

    def stop(self):
        self.worker.stop()


def test_a_study_with_a_crashing_variant_completes_and_the_crash_never_wins(tmp_path, monkeypatch):
    w = Workload(16, 1, 4, 2048)
    best = synthetic_best(w)                             # the variant that would win: make it crash its worker
    monkeypatch.setenv(FAULT_ENV, f"segv:{best.key}")
    storage = tune.journal_storage(str(tmp_path / "studies.journal"))
    with TuningDB(tmp_path / "t.sqlite") as db:
        run_id = db.add_run(HW)
        n = len(search_space(w.dtype, w.page_size))
        res = tune.tune_workload(w, storage, db, run_id, GPU, n_trials=n + 5,
                                 measurer=FaultingMeasurer(Worker(timeout_s=60.0), {best.key}))
        crashed = db.trials(variant_key=best.key, state="crashed")
        assert len(crashed) == 1 and "code -11" in crashed[0]["error"]       # measured once, recorded
        assert sorted(searched(db, w)) == sorted(v.key for v in search_space(w.dtype, w.page_size))  # the rest ran
        assert best.key not in res.confirmed          # failed in the search: never confirmed
        tune.record(db, run_id, res, GPU)
        assert res.best["variant"] != best and db.winners()[0]["variant_key"] != best.key
