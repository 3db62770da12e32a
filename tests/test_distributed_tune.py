"""Distributed tuning on a real PostgreSQL server (CPU): four worker processes share one Optuna study (RDB
storage with a trial heartbeat) and one claims table, on the synthetic objective; one worker is killed in
the middle of a measurement. No variant may be measured twice, none may be lost, and the study completes.

The server comes from the ``pgserver`` package (it ships PostgreSQL's binaries); where it cannot start, the
test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from flash_mla.codegen.variant import search_space
from test_tune import bookkeeping_knobs
from flash_mla.tuner import tune
from flash_mla.tuner.claims import Claims

WORKER = textwrap.dedent('''
    import json, os, sys, time
    sys.path.insert(0, {tests!r})
    from test_tune import GPU, HW, SyntheticMeasurer, bookkeeping_knobs
    from flash_mla.codegen import variant
    from flash_mla.db import TuningDB
    from flash_mla.tuner import tune
    # the bookkeeping space (test_tune.py): what is checked here does not depend on the space's size
    variant.KNOBS = tune.KNOBS = bookkeeping_knobs()
    from flash_mla.tuner.claims import Claims
    from flash_mla.tuner.workloads import Workload

    url, db_path, index, log, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]

    class Slow(SyntheticMeasurer):
        """The synthetic objective, 0.1 s per measurement; worker 0 hangs in its third (and is killed there)."""
        def measure(self, variant, shape, seed=0):
            if index == 0 and len(self.calls) == 2:
                open(marker, "w").write(variant["block_n"].__str__())
                time.sleep(3600)
            time.sleep(0.1)
            r = super().measure(variant, shape, seed)
            with open(log, "a") as f:
                f.write(json.dumps({{"worker": index, "key": self.calls[-1]}}) + "\\n")
            return r

    w = Workload(16, 1, 4, 2048)
    storage = tune.open_storage(url, heartbeat_s=1, grace_s=6)
    with TuningDB(db_path) as db:
        run_id = db.add_run(HW)
        tune.tune_workload(w, storage, db, run_id, GPU, n_trials=10_000, measurer=Slow(), claims=Claims(url),
                           worker_index=index, confirm_rounds=0)
''')


@pytest.fixture
def postgres(tmp_path):
    pgserver = pytest.importorskip("pgserver")
    pytest.importorskip("psycopg2")
    try:
        srv = pgserver.get_server(str(tmp_path / "pg"), cleanup_mode="stop")
        uri = srv.get_uri()
    except Exception as e:                       # pragma: no cover - depends on the machine
        pytest.skip(f"PostgreSQL (pgserver) could not start here: {e}")
    yield uri.replace("postgresql://", "postgresql+psycopg2://", 1)
    srv.cleanup()


def test_four_workers_one_killed_mid_trial_measure_each_variant_once(postgres, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    log, marker, db_path = tmp_path / "measured.jsonl", tmp_path / "hung", tmp_path / "t.sqlite"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # The coordinator creates the storage's tables once, as `flash-mla tune --gpus` does before its workers.
    tune.open_storage(postgres, heartbeat_s=1, grace_s=6)
    Claims(postgres).close()
    procs = [subprocess.Popen([sys.executable, str(script), postgres, str(db_path), str(i), str(log), str(marker)],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(4)]
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert time.time() < deadline, "worker 0 never reached its third measurement"
            assert procs[0].poll() is None, procs[0].stderr.read()
            time.sleep(0.1)
        procs[0].send_signal(signal.SIGKILL)         # killed in the middle of a measurement
        for p in procs[1:]:
            p.wait(timeout=300)
            assert p.returncode == 0, p.stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

    space = {v.key for v in search_space(knobs=bookkeeping_knobs())}
    done = [json.loads(line)["key"] for line in log.read_text().splitlines()]
    assert len(done) == len(set(done)), "a variant was measured twice"
    assert set(done) == space, "a variant was never measured"
    assert {json.loads(line)["worker"] for line in log.read_text().splitlines()} >= {1, 2, 3}

    study = optuna.load_study(study_name=tune.study_name("Synthetic GPU", _workload()),
                              storage=tune.open_storage(postgres, heartbeat_s=1, grace_s=6))
    trials = study.get_trials(deepcopy=False)
    killed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get("measured")]
    assert len(killed) == 1                          # the killed worker's trial, failed by its stale heartbeat
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert retried, "the killed worker's trial was not re-queued"
    key = killed[0].user_attrs["variant_key"]
    by = [t for t in trials if t.user_attrs.get("measured") and t.user_attrs.get("variant_key") == key]
    assert len(by) == 1 and by[0].state == optuna.trial.TrialState.COMPLETE   # measured once, by a live worker
    # The retry measured it itself, or it was pruned because another worker's trial had claimed the variant
    # first (the claim of a dead worker may be taken over by whichever live worker asks first).
    if retried[0].state == optuna.trial.TrialState.COMPLETE:
        assert by[0].number == retried[0].number
    else:
        assert retried[0].state == optuna.trial.TrialState.PRUNED and by[0].number != retried[0].number
    measured = [t.user_attrs["variant_key"] for t in trials if t.user_attrs.get("measured")]
    assert sorted(measured) == sorted(done)          # every Optuna trial that measured is one logged measurement


def _workload():
    from flash_mla.tuner.workloads import Workload
    return Workload(16, 1, 4, 2048)
