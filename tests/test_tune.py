"""Search plumbing of the tuner, driven by a deterministic SYNTHETIC objective (no GPU).

The real objective (a CUDA-graph-timed, reference-checked kernel in a worker process) runs on the GPU;
here a closed-form cost stands in for it so the Optuna study, resume, DB records and winner selection
can be tested on any machine.
"""

from __future__ import annotations

import statistics
import threading
import time
import zlib

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
            + (0.0 if v.merge == "wide_pdl" else 2.0) + {"nsplit": 1.0, "full_wg": 0.0, "full_wg_ahead": 1.5, "swap16": 2.5, "swap32": 3.0, "qreg": 2.0}[v.qk]
        return {"state": "ok", "us": us, "gbs": 1.0, "tflops": 1.0}

    def stop(self):
        pass


def searched(db, w) -> list:
    """Variant keys the search phase measured for ``w``, in order (confirmation repeats are not searches)."""
    return [t["variant_key"] for t in db.trials(study=tune.study_name(GPU, w))
            if t["phase"] == "search" and t["state"] != "invalid"]


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


#: knobs the bookkeeping space holds at fewer values than the searched space
HELD = {"cluster": 1, "pv": 1, "release": 1, "tma": 2}


def bookkeeping_knobs() -> dict:
    """The searched knobs with `cluster`, `pv` and `release` held at their first value and `tma` at its first two."""
    from flash_mla.codegen import variant as V
    return {**V.KNOBS, **{k: V.KNOBS[k][:n] for k, n in HELD.items()}}


@pytest.fixture
def bookkeeping_space(monkeypatch):
    """The searched space of :func:`bookkeeping_knobs`, for the tests that run a study over the whole space: what they
    check (nothing measured twice, a resumed study skips what it measured, the sweep's count, the optimum or a real
    gain found by an exhaustive study, a winner's length-bucket check) does not depend on the space's size, and TPE's
    cost per trial grows with it."""
    from flash_mla.codegen import variant as V
    small = bookkeeping_knobs()
    monkeypatch.setattr(V, "KNOBS", small)
    monkeypatch.setattr(tune, "KNOBS", small)
    assert 0 < len(search_space()) < len(search_space(knobs={**small, **{k: V.ALL_KNOBS[k] for k in HELD}}))


def test_suites_cover_the_deepseek_shapes():
    assert {w.h_q for w in suite("dsv3-tp1")} == {128} and {w.h_q for w in suite("dsv3-tp8")} == {16}
    assert all(w.s_q == 2 and w.causal for w in suite("dsv3-mtp"))
    assert all(w.s_q == 2 and not w.causal for w in suite("dsv3-mtp-nc"))
    assert [{w.h_q for w in suite(f"dsv3-tp{n}")} for n in (16, 4, 2)] == [{8}, {32}, {64}]
    assert [{(w.h_q, w.dtype) for w in suite(f"dsv3-tp{n}-fp16")} for n in (8, 1)] == [{(16, "fp16")}, {(128, "fp16")}]
    assert [{(w.h_q, w.page_size) for w in suite(f"dsv3-tp{n}-p32")} for n in (8, 1)] == [{(16, 32)}, {(128, 32)}]
    assert {(w.h_q, w.s_q, w.causal) for w in suite("dsv3-tp8-mtp")} == {(16, 2, True), (16, 4, True)}
    mid = suite("dsv3-mid")
    assert {w.h_q for w in mid} == {16, 32, 64, 128} and {(w.batch, w.mean_sk) for w in mid} == {
        (b, sk) for b in (16, 64) for sk in (1024, 4096)} and len(mid) == 13
    for ws in SUITES.values():
        assert len({w.key for w in ws}) == len(ws) >= 4          # several batch and seqlen buckets
    with pytest.raises(ValueError, match="unknown suite"):
        suite("nope")


def test_study_finds_the_synthetic_optimum_and_records_it(env, bookkeeping_space):
    storage, db, run_id, _ = env
    w = Workload(128, 1, 32, 4096)
    m = SyntheticMeasurer()
    space = search_space(w.dtype, w.page_size)
    res = tune.tune_workload(w, storage, db, run_id, GPU, n_trials=len(space) + 10, measurer=m)
    s = searched(db, w)
    assert len(set(s)) == len(s) == len(space)                  # no variant searched twice, space exhausted
    # confirmation: the top candidates and the default (unless among them), each in every round
    assert default_variant().key in res.confirmed and len(res.confirmed) in (tune.CONFIRM_TOP, tune.CONFIRM_TOP + 1)
    # + the bucket check of a winner other than the default: it and the default at each edge, every round
    bucket = 2 * len(tune.BUCKET_EDGES) * tune.BUCKET_ROUNDS if res.best["variant"] != default_variant() else 0
    assert len(m.calls) == len(space) + tune.CONFIRM_ROUNDS * len(res.confirmed) + bucket
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


class _FakeArtifact:
    def __init__(self, why: str = ""):
        self.why = why

    def rejection(self) -> str:
        return self.why


def _fake_build(rejected: dict, log: list = None, holds: dict = None):
    """A build function for tune.SpaceBuild: records the build keys it was asked for; the build of a key in ``holds``
    waits for that event."""
    def build_fn(variants, jobs=None):
        for v in variants:
            if log is not None:
                log.append(v.build_key)
            if holds and v.build_key in holds:
                assert holds[v.build_key].wait(10)
        return [_FakeArtifact(rejected.get(v.build_key, "")) for v in variants]
    return build_fn


def _wait_until(cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.01)
    assert cond()


@pytest.mark.parametrize("background", [False, True])
def test_a_rejected_build_is_never_measured_and_never_wins(env, background):
    storage, db, run_id, _ = env
    w = Workload(128, 1, 32, 4096)
    best = synthetic_best(w)
    m = SyntheticMeasurer()
    why = "the decode kernel spills (44 B stored, 44 B loaded; 168 registers)"
    failed = {best.build_key: why}
    if background:      # the same verdict reached through a build compiling in the background
        failed = tune.SpaceBuild(search_space(w.dtype, w.page_size), tune.seed_points(w), jobs=8,
                                 build_fn=_fake_build(failed))
    res = tune.tune_workload(w, storage, db, run_id, GPU, n_trials=100, measurer=m, build_failed=failed)
    assert best.key not in m.calls and res.best["variant"] != best
    (t,) = db.trials(variant_key=best.key, state="build_failed")
    assert t["error"] == why
    tune.record(db, run_id, res, GPU)
    assert db.winners()[0]["variant_key"] != best.key


def test_study_resumes_without_remeasuring(env, bookkeeping_space):
    storage, db, run_id, tmp_path = env
    w = Workload(128, 2, 128, 8192, causal=True)
    tune.tune_workload(w, storage, db, run_id, GPU, n_trials=5, measurer=SyntheticMeasurer())
    first = searched(db, w)
    assert len(first) in (5, 6)                # 5 trials, + the default variant when the study missed it
    # a new process: storage reopened from the same journal file
    storage2 = tune.journal_storage(str(tmp_path / "studies.journal"))
    res = tune.tune_workload(w, storage2, db, run_id, GPU, n_trials=len(search_space()) + 10,
                             measurer=SyntheticMeasurer())
    second = searched(db, w)[len(first):]
    assert not set(first) & set(second)        # the default too: its DB row counts as measured
    assert res.best["variant"] == synthetic_best(w)
    assert sorted(first + second) == sorted(v.key for v in search_space())   # each variant searched exactly once
    assert len(tune.measured_history(storage2, GPU, w)) >= len(search_space()) - 1


def test_trials_to_within():
    assert tune.trials_to_within([None, 120.0, 104.0, 101.0], 100.0) == 4
    assert tune.trials_to_within([100.0], 100.0) == 1
    assert tune.trials_to_within([150.0, None], 100.0) is None


def test_sweep_reports_trials_to_3pct(env, bookkeeping_space):
    storage, db, run_id, _ = env
    w = Workload(16, 1, 128, 8192)
    tune.tune_workload(w, storage, db, run_id, GPU, n_trials=100, measurer=SyntheticMeasurer())
    sw = tune.sweep(w, storage, db, run_id, GPU, measurer=SyntheticMeasurer())
    assert sw["n"] == len(search_space()) and sw["best_key"] == synthetic_best(w).key
    assert 1 <= sw["trials_to_3pct"] <= len(search_space())


def test_a_kill_between_the_db_row_and_the_tell_measures_nothing_twice(env, monkeypatch, bookkeeping_space):
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
    assert searched(db, w) == first.calls              # killed in the search, after the third row
    storage2 = tune.journal_storage(str(tmp_path / "studies.journal"))   # a new process resumes
    tune.tune_workload(w, storage2, db, run_id, GPU, n_trials=len(search_space()) + 10, measurer=SyntheticMeasurer())
    measured = searched(db, w)
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


# -- noise-aware winners ----------------------------------------------------------------------------

def test_noise_rule():
    d = "default"
    # 0.5% faster but repeats spread 2%: the default stays
    c = tune.choose_winner({"a": [99.0, 100.0, 101.0], d: [100.0, 100.5, 101.0]}, d)
    assert c["key"] == d and c["rule"].startswith("default kept") and c["us"] == 100.5
    # 10% faster, tight repeats: the candidate wins, with its median and both spreads
    c = tune.choose_winner({"a": [90.0, 90.5, 91.0], d: [100.0, 100.5, 101.0]}, d)
    assert (c["key"], c["us"], c["default_us"]) == ("a", 90.5, 100.5)
    assert c["spread"] == pytest.approx(1.0 / 90.5) and c["default_spread"] == pytest.approx(1.0 / 100.5)
    # within the minimum margin even with no spread at all
    assert tune.choose_winner({"a": [99.5] * 3, d: [100.0] * 3}, d)["key"] == d
    # the default failed during confirmation: the fastest median wins
    c = tune.choose_winner({"a": [90.0, 95.0, 91.0], "b": [92.0] * 3, d: None}, d)
    assert c["key"] == "a" and c["default_us"] is None and "default failed" in c["rule"]
    assert tune.choose_winner({"a": None, d: None}, d) is None
    assert tune.choose_winner({d: [5.0, 6.0, 7.0]}, d)["rule"] == "the default has the fastest median"


class NoisyMeasurer(SyntheticMeasurer):
    """Every variant within 0.5% of 100 us, each measurement off by up to +-2% (seeded): nothing truly wins,
    except ``fast_key`` (15% faster) where given."""

    def __init__(self, fast_key=None, seed=0):
        super().__init__()
        import random
        self.rng, self.fast_key = random.Random(seed), fast_key

    def measure(self, variant, shape, seed=0):
        v = Variant.from_dict(variant)
        self.calls.append(v.key)
        base = 85.0 if v.key == self.fast_key else 100.0 + (zlib.crc32(v.key.encode()) % 5) / 10
        return {"state": "ok", "us": base * (1 + self.rng.uniform(-0.02, 0.02)), "gbs": 1.0, "tflops": 1.0}


@pytest.mark.parametrize("seed", range(4))
def test_noise_alone_never_replaces_the_default(env, seed):
    storage, db, run_id, _ = env
    w = Workload(16, 1, 4, 2048)
    res = tune.tune_workload(w, storage, db, run_id, GPU, n_trials=12, measurer=NoisyMeasurer(seed=seed), seed=seed)
    tune.record(db, run_id, res, GPU)
    (row,) = db.winners()
    assert row["variant_key"] == default_variant().key, row["rule"]
    assert row["n_repeats"] == tune.CONFIRM_ROUNDS and row["time_spread"] is not None
    confirms = [t for t in db.trials() if t["phase"] == "confirm"]
    assert len(confirms) == tune.CONFIRM_ROUNDS * len(res.confirmed)
    assert {t["source_hash"] for t in db.trials()} == {tune.kernel_source_digest()}


def test_a_real_gain_beats_the_noise_and_is_recorded_with_its_spread(env, bookkeeping_space):
    storage, db, run_id, _ = env
    w = Workload(16, 1, 4, 2048)
    fast = next(v for v in search_space() if v.block_n == 32 and v.stages == 3)
    space = search_space(w.dtype, w.page_size)
    res = tune.tune_workload(w, storage, db, run_id, GPU, n_trials=len(space), measurer=NoisyMeasurer(fast.key))
    tune.record(db, run_id, res, GPU)
    (row,) = db.winners()
    assert row["variant_key"] == fast.key and row["rule"].startswith("faster than the default")
    assert row["time_us"] == pytest.approx(statistics.median(res.confirmed[fast.key]))
    assert 0 < row["time_spread"] <= 0.05 and row["n_repeats"] == tune.CONFIRM_ROUNDS
    assert row["default_time_us"] == pytest.approx(statistics.median(res.confirmed[default_variant().key]))


def test_best_so_far_and_random_search_median():
    assert tune.best_so_far([5.0, None, 7.0, 3.0]) == [5.0, 5.0, 5.0, 3.0]
    space = [float(x) for x in range(1, 21)]
    rand = tune.random_search_median(space, len(space))
    assert len(rand) == 20 and rand[-1] == 1.0 and all(a >= b for a, b in zip(rand, rand[1:]))
    assert 8.0 <= rand[0] <= 13.0                     # one random pick: about the median of the space


def test_sweep_writes_the_search_plot_beside_random_search(env):
    storage, db, run_id, tmp_path = env
    w = Workload(16, 1, 4, 2048)
    res = tune.tune_workload(w, storage, db, run_id, GPU, n_trials=12, measurer=SyntheticMeasurer(), confirm_rounds=0)
    res.sweep = tune.sweep(w, storage, db, run_id, GPU, measurer=SyntheticMeasurer())
    assert len(res.sweep["times"]) == len(search_space())
    path = tune.plot_search(tmp_path / "plots" / "s.png", res, storage, GPU)
    assert path and (tmp_path / "plots" / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "plots").glob("*.tmp.png"))           # written by rename
    res.sweep = None
    assert tune.plot_search(tmp_path / "p2.png", res, storage, GPU) is None


def test_space_build_compiles_the_first_points_first_and_a_lookup_waits_for_its_build():
    space = search_space()
    keys = list(dict.fromkeys(v.build_key for v in space))
    by_key = {v.build_key: v for v in space}
    first = [by_key[keys[-1]], by_key[keys[-2]]]
    log = []
    holds = {k: threading.Event() for k in (keys[-2], keys[0], keys[1], keys[2])}
    sb = tune.SpaceBuild(space, first, jobs=2, build_fn=_fake_build({keys[-2]: "spills"}, log, holds))
    # a binary may be measured once its own compilation ends, while the other one started with it still runs
    assert keys[-1] not in sb
    _wait_until(lambda: keys[-2] in log)
    assert keys[-2] not in sb._finished
    holds[keys[-2]].set()
    assert keys[-2] in sb and sb[keys[-2]] == "spills"   # waits for its build
    _wait_until(lambda: {keys[0], keys[1]} <= set(log))   # both compilers busy again (held)
    sb.prioritise([by_key[keys[50]], by_key[keys[40]]])   # a study is about to measure these: next
    holds[keys[0]].set()
    assert keys[40] not in sb
    _wait_until(lambda: keys[2] in log)                   # then the space in order (held)
    assert log.index(keys[50]) < log.index(keys[40]) < log.index(keys[2])
    assert "not_a_build_key" not in sb                    # never waited for
    closer = threading.Thread(target=sb.close)            # stops after the compilations in progress
    closer.start()
    _wait_until(lambda: sb._stop)
    holds[keys[1]].set()
    holds[keys[2]].set()
    closer.join(10)
    assert not closer.is_alive()
    assert set(log) == {keys[-1], keys[-2], keys[0], keys[1], keys[50], keys[40], keys[2]}
    assert keys[3] in sb and "not built" in sb[keys[3]]   # what was not built is never measured
    assert sb.rejected() == {keys[-2]: "spills"}


def test_space_build_rejects_a_variant_whose_build_raised():
    space = search_space()[:6]
    def boom(variants, jobs=None):
        raise RuntimeError("ninja: not found")
    sb = tune.SpaceBuild(space, jobs=2, build_fn=boom)
    assert space[0].build_key in sb and "ninja: not found" in sb[space[0].build_key]
    sb.close()
    assert set(sb.rejected()) == {v.build_key for v in space}


def test_held_out_workloads_are_24_and_in_no_suite():
    from flash_mla.tuner import evaluate
    from flash_mla.tuner.workloads import SUITES
    ws = evaluate.held_out()
    assert len(ws) >= 24 and len(set(ws)) == len(ws)
    tuned_keys = {w.key for s in SUITES.values() for w in s}
    assert not {w.key for w in ws} & tuned_keys            # not even a suite workload's key
    assert {w.h_q for w in ws} >= {16, 32, 64, 128} and {w.s_q for w in ws} >= {1, 2, 4}


def test_held_out_refuses_a_suite_workload_with_its_key(monkeypatch):
    from flash_mla.tuner import evaluate
    # b64 s_k 1200 and s_k 1024 share the length bucket 1024: a row tuned for one would serve the other's call
    monkeypatch.setitem(evaluate.SUITES, "clash", [Workload(32, 1, 64, 1024)])
    with pytest.raises(ValueError, match="held-out workloads also in a suite"):
        evaluate.held_out()


def test_held_out_summary_counts_within_three_percent():
    from flash_mla.tuner import evaluate
    rows = [{"shape": f"s{i}", "best": "v", "best_us": 100.0, "default_us": d, "hint_variant": "v", "hint_us": h,
             "hint_ratio": h / 100.0, "nohint_variant": "v", "nohint_us": n, "nohint_ratio": n / 100.0}
            for i, (d, h, n) in enumerate([(100.0, 102.9, 110.0), (105.0, 103.1, 100.0), (100.0, 100.0, 100.0)])]
    s = evaluate.summary(rows)
    assert (s["hint"]["within_3pct"], s["nohint"]["within_3pct"], s["default"]["within_3pct"]) == (2, 2, 2)
    assert s["hint"]["worst"] == pytest.approx(1.031)
    assert "within 3% of the best on 2/3 workloads" in evaluate.format_table(rows)


def test_engine_block_table_is_as_wide_as_max_model_len():
    import torch
    from flash_mla.tuner.evaluate import engine_block_table
    bt = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    wide = engine_block_table(bt, 64, max_model_len=64 * 10)
    assert wide.shape == (2, 10) and torch.equal(wide[:, :3], bt) and not wide[:, 3:].any()


def test_a_new_study_measures_the_default_and_its_nearest_neighbour_per_knob_value_first():
    w = Workload(16, 1, 32, 2048)
    seeds = tune.seed_points(w)
    d = default_variant()
    assert seeds[0] == d and len(seeds) == len({v.key for v in seeds}) >= 4
    changed = [sum(getattr(v, k) != getattr(d, k) for k in tune.KNOBS) for v in seeds[1:]]
    assert any(v.merge != d.merge for v in seeds)
    # every searched value of every knob is seen once, one knob away where that is valid
    for knob, values in tune.KNOBS.items():
        assert {getattr(v, knob) for v in seeds} == set(values), knob
    # qk=qreg needs three warpgroups: its seed changes exactly those two knobs; cluster=2 and pv=regs need qreg or
    # full_wg (pv: full_wg only): their seeds are the default with qk=full_wg and that knob (two warpgroups stay)
    (qreg,) = [v for v in seeds if v.qk == "qreg" and v.cluster == 1]
    assert qreg.num_warpgroups == 3 and sum(getattr(qreg, k) != getattr(d, k) for k in tune.KNOBS) == 2
    (x2,) = [v for v in seeds if v.cluster == 2]
    assert x2.qk == "full_wg" and sum(getattr(x2, k) != getattr(d, k) for k in tune.KNOBS) == 2
    (pr,) = [v for v in seeds if v.pv == "regs"]
    assert pr.qk == "full_wg" and sum(getattr(pr, k) != getattr(d, k) for k in tune.KNOBS) == 2
    assert max(changed) <= 2


class LengthSensitiveMeasurer(NoisyMeasurer):
    """``fast_key`` is 15% faster than everything at the workload's own length; at other lengths it is
    ``elsewhere`` times the others' time. Noise as in NoisyMeasurer at the workload's own length; at the bucket's
    edges +-0.2% only, so that the bucket check's verdict depends on ``elsewhere`` and not on where the seeded draws
    fall (they shift whenever the searched space changes size)."""

    def __init__(self, fast_key, own_sk, elsewhere, seed=0):
        super().__init__(fast_key, seed)
        self.own_sk, self.elsewhere = own_sk, elsewhere

    def measure(self, variant, shape, seed=0):
        r = super().measure(variant, shape, seed)
        if shape["mean_sk"] != self.own_sk:
            key = Variant.from_dict(variant).key
            base = 100.0 + (zlib.crc32(key.encode()) % 5) / 10
            if key == self.fast_key:
                base = 85.0 * self.elsewhere / 0.85
            r["us"] = base * (1 + self.rng.uniform(-0.002, 0.002))
        return r


# 1.05: 5% slower at the bucket's edges (rejected); 0.9: faster there too; 1.003: 0.3% slower there, within the
# bucket check's tolerance (MIN_MARGIN, 1%; the default's own time is 100.0-100.4 us by its key)
@pytest.mark.parametrize("elsewhere,wins", [(1.05, False), (0.9, True), (1.003, True)])
def test_a_winner_must_hold_across_its_length_bucket(env, elsewhere, wins, bookkeeping_space):
    storage, db, run_id, _ = env
    w = Workload(16, 1, 4, 2048)
    fast = next(v for v in search_space() if v.block_n == 32 and v.stages == 3)
    space = search_space(w.dtype, w.page_size)
    m = LengthSensitiveMeasurer(fast.key, w.mean_sk, elsewhere)
    res = tune.tune_workload(w, storage, db, run_id, GPU, n_trials=len(space), measurer=m)
    tune.record(db, run_id, res, GPU)
    (row,) = db.winners()
    bucket = [t for t in db.trials() if t["phase"] == "bucket"]
    # the edges of the 2048 bucket (1536, then 2724), each with the winner and the default, in interleaved rounds
    assert sorted({t["mean_sk"] for t in bucket}) == ([1536, 2724] if wins else [1536])
    assert {t["variant_key"] for t in bucket} == {fast.key, default_variant().key}
    if wins:
        assert row["variant_key"] == fast.key and row["rule"].startswith("faster than the default")
        assert len(bucket) == 2 * 2 * tune.BUCKET_ROUNDS
    else:
        assert row["variant_key"] == default_variant().key
        assert "slower than the default at s_k = 1536 (same length bucket)" in row["rule"]
        assert len(bucket) == 2 * tune.BUCKET_ROUNDS          # stopped at the first edge it loses


class TwoWinnersMeasurer(LengthSensitiveMeasurer):
    """As LengthSensitiveMeasurer (``fast_key`` 15% faster at its own length, 5% slower at the bucket's edges), and
    ``second_key`` 10% faster than everything at every length."""

    def __init__(self, fast_key, second_key, own_sk, seed=0):
        super().__init__(fast_key, own_sk, 1.05, seed)
        self.second_key = second_key

    def measure(self, variant, shape, seed=0):
        r = super().measure(variant, shape, seed)
        if Variant.from_dict(variant).key == self.second_key:
            r["us"] = 90.0 * (1 + self.rng.uniform(-0.002, 0.002))
        return r


def test_a_candidate_that_fails_its_bucket_gives_way_to_the_next(env, bookkeeping_space):
    # (H100, s_q = 2 causal b128 s_k 4096: the best candidate was turned down at a bucket edge and the default was
    # stored, 15% slower than the second candidate)
    storage, db, run_id, _ = env
    w = Workload(16, 1, 4, 2048)
    space = search_space(w.dtype, w.page_size)
    fast = next(v for v in space if v.block_n == 32 and v.stages == 3)
    second = next(v for v in space if v.block_n == 32 and v.stages == 2)
    m = TwoWinnersMeasurer(fast.key, second.key, w.mean_sk)
    res = tune.tune_workload(w, storage, db, run_id, GPU, n_trials=len(space), measurer=m)
    tune.record(db, run_id, res, GPU)
    (row,) = db.winners()
    assert row["variant_key"] == second.key, row["rule"]
    assert row["rule"].startswith("faster than the default")
    assert f"(after {fast.key} faster at s_k = 2048 but " in row["rule"]
    assert "slower than the default at s_k = 1536 (same length bucket))" in row["rule"]
    bucket = [t for t in db.trials() if t["phase"] == "bucket"]
    # the first candidate lost at the first edge; the second was checked at both
    assert len([t for t in bucket if t["variant_key"] == fast.key]) == tune.BUCKET_ROUNDS
    assert len([t for t in bucket if t["variant_key"] == second.key]) == 2 * tune.BUCKET_ROUNDS


def test_optuna_dashboard_opens_the_journal(env):
    # The studies the tuner writes open in optuna-dashboard by the journal's path (README); skipped where the
    # dashboard is not installed (it is not a dependency).
    pytest.importorskip("optuna_dashboard")
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path
    storage, db, run_id, tmp = env
    w = Workload(16, 1, 4, 2048)
    tune.tune_workload(w, storage, db, run_id, GPU, n_trials=3, measurer=SyntheticMeasurer(), confirm_rounds=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("optuna-dashboard")
    proc = subprocess.Popen([str(exe), str(tmp / "studies.journal"), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, body = time.time() + 60, None
        while body is None and time.time() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read()
            except OSError:
                time.sleep(0.3)
        assert body is not None, "optuna-dashboard did not answer"
        names = [st["study_name"] for st in json.loads(body)["study_summaries"]]
        assert names == [tune.study_name(GPU, w)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _winner_row(gpu, h_q, s_q, batch_bucket, seqlen_bucket, v: Variant, causal=False, dtype="bf16", page_size=64):
    import json
    return {"gpu_name": gpu, "dtype": dtype, "page_size": page_size, "h_q": h_q, "h_kv": 1, "s_q": s_q,
            "causal": int(causal), "batch_bucket": batch_bucket, "seqlen_bucket": seqlen_bucket,
            "variant_key": v.key, "variant_json": json.dumps(v.as_dict(), sort_keys=True)}


def test_transfer_points_are_the_winners_of_the_nearest_stored_workloads():
    from flash_mla.tuner.transfer import distance, transfer_points
    w = Workload(128, 1, 64, 8192)
    qreg = Variant(block_n=64, stages=2, num_warpgroups=3, qk="qreg", merge="wide_pdl").validate()
    msep = Variant(block_n=64, stages=2, merge="separate").validate()
    swap = Variant(block_n=64, stages=2, qk="swap16", merge="wide_pdl").validate()
    rows = [
        _winner_row("GPU A", 16, 1, 64, 8192, swap),       # 16 rows per kv head: 2 x 3 = 6 + 0.5 away
        _winner_row("GPU A", 128, 1, 32, 8192, qreg),      # one batch bucket, other GPU: 1.5
        _winner_row("GPU B", 128, 1, 128, 2048, msep),     # one batch bucket + two length buckets: 3
        _winner_row("GPU B", 128, 1, 64, 8192, default_variant()),   # the default: never proposed
        _winner_row("GPU B", 128, 1, 64, 0, swap),         # a row for calls without a hint: left out
        _winner_row("GPU B", 128, 1, 64, 8192, qreg, dtype="fp16"),  # other dtype: left out
        {**_winner_row("GPU B", 128, 1, 64, 8192, msep), "variant_json": '{"no_such_knob": 1}'},  # newer space
    ]
    assert distance(w, rows[1], "GPU B") == 1.5 and distance(w, rows[2], "GPU B") == 3.0
    assert distance(w, rows[0], "GPU B") == 6.5
    assert transfer_points(w, rows, "GPU B", n=2) == [qreg, msep]
    assert transfer_points(w, rows, "GPU B") == [qreg, msep, swap]           # all there are, up to four
    assert transfer_points(w, [], "GPU B") == []


def test_a_new_study_measures_the_transferred_winners_right_after_the_default(env):
    storage, db, run_id, _ = env
    w = Workload(128, 1, 32, 4096)
    qreg = Variant(block_n=64, stages=2, num_warpgroups=3, qk="qreg", merge="wide_pdl").validate()
    rows = [_winner_row("Other GPU", 128, 1, 32, 4096, qreg)]
    tune.tune_workload(w, storage, db, run_id, GPU, n_trials=3, measurer=SyntheticMeasurer(), confirm_rounds=0,
                       transfer_rows=rows)
    assert searched(db, w)[:2] == [default_variant().key, qreg.key]


def _qreg_two_knobs_from_the_default():
    """h_q = 64 s_q = 4: the seeds, the qreg seed, TwoKnobMeasurer's optimum (that seed with the separate merge),
    the space."""
    w = Workload(64, 4, 64, 2048, causal=True)
    seeds = tune.seed_points(w)
    qreg = next(v for v in seeds if v.qk == "qreg")
    target = Variant(**{**qreg.as_dict(), "merge": "separate"}).validate()
    return w, seeds, qreg, target, search_space(w.dtype, w.page_size)


def test_after_the_transferred_winners_the_study_steps_from_the_best_of_them(env):
    # a transferred winner beats the default: its nearest points come next, not the default's neighbours
    storage, db, run_id, _ = env
    w, seeds, qreg, target, space = _qreg_two_knobs_from_the_default()
    step = tune.incumbent_neighbours(qreg, space, known={seeds[0].key: 1.0, qreg.key: 1.0})
    assert target in step and set(step) != set(seeds[1:])
    rows = [_winner_row("Other GPU", 64, 4, 64, 2048, qreg, causal=True)]
    res = tune.tune_workload(w, storage, db, run_id, GPU, n_trials=2 + len(step), measurer=TwoKnobMeasurer(),
                             confirm_rounds=0, transfer_rows=rows)
    assert searched(db, w) == [seeds[0].key, qreg.key] + [v.key for v in step]
    assert res.best["variant"] == target


def test_stored_winners_include_the_output_db_and_the_shipped_one(env, monkeypatch):
    storage, db, run_id, _ = env
    monkeypatch.delenv("FLASH_MLA_TUNING_DB", raising=False)
    w = Workload(16, 1, 4, 2048)
    res = tune.tune_workload(w, storage, db, run_id, GPU, n_trials=2, measurer=SyntheticMeasurer(), confirm_rounds=0)
    tune.record(db, run_id, res, GPU)
    rows = tune.stored_winners(db)
    assert any(r["gpu_name"] == GPU for r in rows)
    from flash_mla import db as db_module
    shipped = db_module.shipped_db_path()
    if shipped is not None:
        with TuningDB(shipped, readonly=True) as s:
            assert len(rows) == 1 + len(s.winners())


@pytest.mark.parametrize("flag,expect_rows", [([], True), (["--no-transfer"], False)])
def test_tune_command_transfers_stored_winners_unless_told_not_to(flag, expect_rows, monkeypatch, tmp_path):
    from flash_mla import cli
    seen = []
    rows = [{"variant_key": "stored"}]
    monkeypatch.setattr(cli, "_require_sm90", lambda: None)
    builds = []
    monkeypatch.setattr(tune, "start_space_build", lambda ws, first, jobs=None: builds.append(first) or tune.SpaceBuild(
        [v for w in ws for v in search_space(w.dtype, w.page_size)], first, jobs=jobs, build_fn=_fake_build({})))
    monkeypatch.setattr(tune, "run_info", lambda: dict(HW))
    monkeypatch.setattr(tune, "stored_winners", lambda db: rows)
    monkeypatch.setattr(tune, "transfer_points", lambda w, rows, gpu: [])   # the fake rows name no variant
    monkeypatch.setattr(tune, "record", lambda *a, **k: None)
    monkeypatch.setattr(tune, "no_hint_winners", lambda *a, **k: [])

    def fake_study(w, *a, transfer_rows=(), **k):
        seen.append(transfer_rows)
        return tune.StudyResult(w, None, None, [])
    monkeypatch.setattr(tune, "tune_workload", fake_study)
    argv = ["tune", "--workload", "h_q=16,s_q=1,batch=4,mean_sk=2048", "--trials", "1", "--gpus", "0",
            "--db", str(tmp_path / "t.sqlite"), "--storage", str(tmp_path / "s.journal"), *flag]
    assert cli.main(argv) == 0
    assert seen == [rows if expect_rows else ()]
    # the studies' first points (the default first) head the background build
    assert builds and builds[0][0] == default_variant()


class TwoKnobMeasurer(SyntheticMeasurer):
    """The optimum is two knobs from the default (qk=qreg with its three warpgroups, and the separate merge): one
    knob from the qreg seed, as on the H100 at h_q >= 64."""

    def measure(self, variant, shape, seed=0):
        v = Variant.from_dict(variant)
        self.calls.append(v.key)
        us = 100.0 + 3 * abs(v.stages - 2) + 2 * abs(v.block_n - 64) / 32 + 0.1 * v.split_overhead
        if v.qk == "qreg":
            us -= 5.0 + (4.0 if v.merge == "separate" else 0.0)
        return {"state": "ok", "us": us, "gbs": 1.0, "tflops": 1.0}


def test_the_best_variants_nearest_points_are_measured_next(env):
    storage, db, run_id, _ = env
    w, seeds, qreg_seed, target, space = _qreg_two_knobs_from_the_default()
    assert target not in seeds                       # two knobs from the default: no seed
    neighbours = tune.incumbent_neighbours(qreg_seed, space, known={})
    assert neighbours == tune.nearest_per_value(qreg_seed, space) and target in neighbours
    assert sum(getattr(target, k) != getattr(qreg_seed, k) for k in tune.KNOBS) == 1
    assert tune.incumbent_neighbours(qreg_seed, space, known={target.key: 1.0}) == [n for n in neighbours
                                                                                    if n != target]
    fresh = [v.key for v in neighbours if v not in seeds]
    res = tune.tune_workload(w, storage, db, run_id, GPU, n_trials=len(seeds) + len(fresh),
                             measurer=TwoKnobMeasurer(), confirm_rounds=0)
    order = searched(db, w)
    assert order[:len(seeds)] == [v.key for v in seeds]
    # the seeds' best is the qreg seed: its unmeasured nearest points per knob value come next, in KNOBS order
    assert order[len(seeds):] == fresh
    assert res.best["variant"] == target


def test_search_replay_runs_the_study_over_measured_times(tmp_path):
    # bench/search_replay.py: the tuner's study answered from an evaluate.json's times (here synthetic: the best of
    # the space is one knob from the default, a failed measurement among them)
    import dataclasses
    import json
    import subprocess
    import sys
    from pathlib import Path
    from flash_mla.tuner.evaluate import HELD_OUT
    rows = []
    for w in HELD_OUT[:2]:
        space = search_space(w.dtype, w.page_size)
        times = {v.key: 100.0 + (zlib.crc32(v.key.encode()) % 50) for v in space}
        best = dataclasses.replace(default_variant(w.dtype, w.page_size), merge="separate")
        assert best in space
        times[best.key], times[space[-1].key] = 60.0, None
        rows.append({"workload": w.key, "shape": f"shape{len(rows)}", "times": times, "best_us": 60.0})
    path = tmp_path / "evaluate.json"
    path.write_text(json.dumps({"rows": rows, "summary": {}}))
    script = Path(__file__).resolve().parents[1] / "bench" / "search_replay.py"
    out = subprocess.run([sys.executable, str(script), str(path), "--seeds", "1", "--no-transfer"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("shape")]
    assert len(lines) == 2 and all(line.split()[1] == str(len(search_space()) - 1) for line in lines)
    assert all(line.split()[2] != "-" and line.split()[-1] == "1.000" for line in lines)   # found within 24
    assert "on 2/2 workloads" in out.stdout and "transfer from stored winners: off" in out.stdout
