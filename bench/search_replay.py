"""Offline, no GPU: the tuner's search replayed over measured times of the whole space.

Usage: python bench/search_replay.py EVALUATE_JSON [--trials N] [--seeds K] [--no-transfer]

A ``flash-mla evaluate`` run times every point of the searched space on each held-out workload (its evaluate.json
keeps them all). Here the tuner's own study (:func:`flash_mla.tuner.tune.tune_workload`: the default, the stored
winners nearest to the workload, the one-knob neighbours, the local step around the incumbent, then TPE) runs on
each workload with a measurer that answers from those times instead of the GPU, once per seed, for ``--trials``
measurements (default 24, 10% of the 240-point bf16 / page-64 space); no confirmation rounds, no bucket check. For
each workload it prints the measurements the study needed before its best was within 3% of the space's best
(median over the seeds; '-' when it never was) beside random search without replacement over the same times (the
median over 101 orders). Stored winners come from the shipped and user databases, as in a real run; none of the
held-out workloads has a suite workload's key, so none finds its own row. A replayed time is one measurement: the
real study sees run-to-run noise of ~1% on top, which can reorder variants within it.
"""

import json
import statistics
import sys
import tempfile
from pathlib import Path

import optuna

from flash_mla.db import TuningDB
from flash_mla.tuner import tune
from flash_mla.tuner.evaluate import HELD_OUT, WITHIN

GPU = "NVIDIA H100 80GB HBM3"


class ReplayMeasurer:
    """A measurer for :func:`tune.tune_workload` that returns a variant's time from a measured table."""

    def __init__(self, times: dict):
        self.times = times

    def measure(self, variant: dict, shape: dict, seed: int = 0) -> dict:
        from flash_mla.codegen.variant import Variant
        us = self.times.get(Variant.from_dict(variant).key)
        return {"state": "ok", "us": us} if us else {"state": "error", "error": "not measured in the replayed run"}

    def stop(self) -> None:
        pass


def trials_to(history: list, target: float, tol: float = WITHIN):
    return tune.trials_to_within([us for _, _, state, us in history if state != "invalid"], target, tol)


def main(argv: list) -> int:
    opts = {"--trials": "24", "--seeds": "10"}
    transfer = "--no-transfer" not in argv
    argv = [a for a in argv if a != "--no-transfer"]
    for flag in list(opts):
        if flag in argv:
            i = argv.index(flag)
            opts[flag], argv = argv[i + 1], argv[:i] + argv[i + 2:]
    if len(argv) != 1:
        sys.exit(__doc__)
    rows = json.loads(Path(argv[0]).read_text())["rows"]
    n_trials, seeds = int(opts["--trials"]), int(opts["--seeds"])
    held_out = {w.key: w for w in HELD_OUT}
    transfer_rows = tune.stored_winners() if transfer else ()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"{'workload':30} {'space':>5} {'study (median of ' + str(seeds) + ')':>22} {'random (median)':>16}  "
          f"study's best / space's best")
    wins = ties = 0
    study_all, random_all = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            w = held_out[r["workload"]]
            times = {k: us for k, us in r["times"].items() if us}
            best = min(times.values())
            needed, ratios = [], []
            for seed in range(seeds):
                # a new study and DB per run: a study reuses what its DB already holds for it, never re-measuring
                with TuningDB(Path(tmp) / f"replay-{len(study_all)}-{seed}.sqlite") as db:
                    run_id = db.add_run({"gpu_name": GPU, "sm_count": 132, "cuda_version": "13.0",
                                         "hostname": "replay"})
                    res = tune.tune_workload(w, optuna.storages.InMemoryStorage(), db, run_id, GPU,
                                             n_trials=n_trials, seed=seed, measurer=ReplayMeasurer(times),
                                             confirm_rounds=0, bucket_rounds=0, transfer_rows=transfer_rows)
                needed.append(trials_to(res.history, best) or n_trials + 1)
                ratios.append(res.best["us"] / best if res.best else float("nan"))
            # random search's median best-so-far over 101 orders of the whole space: where it first comes within 3% is
            # the median of the orders' measurements to 3% (each curve falls monotonically; 101 is odd)
            space_times = list(r["times"].values())
            rand = tune.trials_to_within(tune.random_search_median(space_times, len(space_times)), best)
            study = statistics.median(needed)
            study_all.append(study)
            random_all.append(rand)
            wins += study < rand
            ties += study == rand
            shown = "-" if study > n_trials else f"{study:g}"
            print(f"{r['shape']:30} {len(times):5} {shown:>22} {rand:16g}  {statistics.median(ratios):.3f}")
    n = len(rows)
    within = sum(s <= n_trials for s in study_all)
    print(f"\nstudy within {WITHIN:.0%} of the space's best in <= {n_trials} measurements on {within}/{n} workloads "
          f"(median of {seeds} seeds each; transfer from stored winners: {'on' if transfer else 'off'}); fewer "
          f"measurements than random search's median on {wins}/{n}, as many on {ties}/{n}; median over workloads: "
          f"study {statistics.median(study_all):g}, random {statistics.median(random_all):g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
