"""Offline, no GPU: leave-one-out score of the selection rule over the tuned workloads of a tuning database.

Usage: python bench/selection_loo.py [DB] [--gpu "NVIDIA H100 80GB HBM3"] [--dtype bf16] [--page-size 64]
For every winner row tuned for a length (the suites' workloads), a copy of the database without that row becomes
the user database and the runtime's own rule (flash_mla.selection.select) picks a variant for the row's key, as it
would for a call of that shape that no suite tuned. The pick is scored with the trials of the run that tuned the row
(the median time of each variant measured there, at that workload): pick / best measured. A pick that run did not
measure is counted apart. This scores a selection rule on the suites' workloads, so that a new rule can be designed
and compared without looking at the held-out workloads (flash-mla evaluate keeps those for the confirmation).
"""

import math
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

from flash_mla import db as db_module
from flash_mla import selection
from flash_mla.codegen.variant import default_variant
from flash_mla.tuner.evaluate import WITHIN
from flash_mla.workload_key import NO_HINT, WorkloadKey

args = sys.argv[1:]
opts = {"--gpu": "NVIDIA H100 80GB HBM3", "--dtype": "bf16", "--page-size": "64"}
for flag in list(opts):
    if flag in args:
        i = args.index(flag)
        opts[flag], args = args[i + 1], args[:i] + args[i + 2:]
src = Path(args[0]) if args else db_module.shipped_db_path()
with db_module.TuningDB(src, readonly=True) as handle:
    rows = [r for r in handle.winners() if r["gpu_name"] == opts["--gpu"] and r["dtype"] == opts["--dtype"]
            and r["page_size"] == int(opts["--page-size"]) and r["seqlen_bucket"] != NO_HINT]
    measured = [selection._trial_medians(handle, r) for r in rows]

cols = ("gpu_name", "sm_count", "cuda_version", "dtype", "h_q", "h_kv", "s_q", "page_size", "causal", "batch_bucket",
        "seqlen_bucket")                          # a winner row's key
print(f"{'left out':44} {'pick':40} {'ratio':>6}")
ratios, unmeasured = [], 0
with tempfile.TemporaryDirectory() as tmp:
    for i, row in enumerate(rows):
        copy = Path(tmp) / "loo.sqlite"
        shutil.copyfile(src, copy)
        con = sqlite3.connect(copy)
        con.execute(f"delete from winners where {' and '.join(f'{c} = ?' for c in cols)}", [row[c] for c in cols])
        con.commit()
        con.close()
        db_module.set_user_db(copy)
        selection.clear_cache()
        key = WorkloadKey.from_row(row)
        pick = selection.select(row["gpu_name"], row["sm_count"], row["cuda_version"], key)
        variant = (pick.variant or default_variant(key.dtype, key.page_size)).key
        times = measured[i]
        ratio = times[variant] / min(times.values()) if variant in times and times else None
        if ratio is None:
            unmeasured += 1
        else:
            ratios.append(ratio)
        print(f"{key.canonical:44} {variant:40} {'-' if ratio is None else f'{ratio:6.3f}':>6}")
    db_module.set_user_db(None)
n = len(ratios)
print(f"\n{len(rows)} rows left out one at a time: the rule's pick within {WITHIN:.0%} of the best measured on "
      f"{sum(r <= 1 + WITHIN for r in ratios)}/{n} scored (geomean "
      f"{math.exp(sum(map(math.log, ratios)) / n) if n else float('nan'):.3f}, worst "
      f"{max(ratios) if ratios else float('nan'):.3f}); {unmeasured} picks not measured in the left-out row's run")
