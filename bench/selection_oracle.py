"""Offline: how much of the held-out gap is the selection rule and how much is coverage (no GPU).

Usage: python bench/selection_oracle.py EVALUATE_JSON [DB] [--gpu "NVIDIA H100 80GB HBM3"]
For each held-out workload of a ``flash-mla evaluate`` run (its evaluate.json keeps every variant's time), prints
the API call's ratio to the exhaustive best (with the length hint), and the ratio the best of the DB's winners would
reach: the fastest, in that run's own times, of the winner variants stored for the same GPU, dtype, page size, h_q,
h_kv, s_q and causal flag (any batch or length bucket). A workload where that oracle is within 3% but the call is not
is a miss of the rule that picks among the rows; one where even the oracle is not needs new rows (coverage) or new
variants. Also the ratio of the variant the runtime's rule (flash_mla.selection.select, this checkout's code, with the
hint) picks from DB, looked up in the run's times: an offline estimate for a changed rule or DB before a device run
(the call's own time is measured apart and differs from the looked-up one by up to ~1.5%). DB defaults to the
shipped tuning database.
"""

import json
import sys

from flash_mla import db as db_module
from flash_mla import selection
from flash_mla.codegen.variant import default_variant
from flash_mla.db import TuningDB, shipped_db_path
from flash_mla.tuner.evaluate import HELD_OUT, WITHIN

args = sys.argv[1:]
gpu = "NVIDIA H100 80GB HBM3"
if "--gpu" in args:
    i = args.index("--gpu")
    gpu, args = args[i + 1], args[:i] + args[i + 2:]
if not args:
    sys.exit(__doc__)
rows = json.loads(open(args[0]).read())["rows"]
db_path = args[1] if len(args) > 1 else shipped_db_path()
with TuningDB(db_path, readonly=True) as db:
    winners = [w for w in db.winners() if w["gpu_name"] == gpu]
    sms, cuda = winners[0]["sm_count"], winners[0]["cuda_version"]
db_module.set_user_db(db_path)                    # the rule reads DB (as the user DB) and nothing else


print(f"{'shape':30} {'call':>6} {'rule':>6} {'oracle':>6} {'rows':>4}  oracle's variant")
counts = {"call": 0, "offline": 0, "oracle": 0, "rule": 0, "coverage": 0}
held_out = {w.key: w for w in HELD_OUT}
for r in rows:
    k = held_out[r["workload"]].workload_key
    cands = {w["variant_key"] for w in winners
             if (w["dtype"], w["page_size"], w["h_q"], w["h_kv"], w["s_q"], bool(w["causal"])) ==
             (k.dtype, k.page_size, k.h_q, k.h_kv, k.s_q, bool(k.causal))}
    timed = sorted((r["times"][v], v) for v in cands if r["times"].get(v))
    oracle = timed[0][0] / r["best_us"] if timed else None
    call = r.get("hint_ratio")
    pick = (selection.select(gpu, sms, cuda, k).variant or default_variant(k.dtype, k.page_size)).key
    offline = r["times"][pick] / r["best_us"] if r["times"].get(pick) else None
    counts["offline"] += offline is not None and offline <= 1 + WITHIN
    ok_call, ok_oracle = call is not None and call <= 1 + WITHIN, oracle is not None and oracle <= 1 + WITHIN
    counts["call"] += ok_call
    counts["oracle"] += ok_oracle
    counts["rule"] += ok_oracle and not ok_call
    counts["coverage"] += not ok_oracle
    print(f"{r['shape']:30} {call if call is not None else float('nan'):6.3f} "
          f"{offline if offline is not None else float('nan'):6.3f} "
          f"{oracle if oracle is not None else float('nan'):6.3f} {len(cands):4}  {timed[0][1] if timed else '-'}")
n = len(rows)
db_module.set_user_db(None)
print(f"\nwithin {WITHIN:.0%} of the best: the call {counts['call']}/{n} (measured), the rule's pick from this DB "
      f"{counts['offline']}/{n} (looked up), the best stored winner {counts['oracle']}/{n}; misses of the rule (call) "
      f"{counts['rule']}, workloads no stored winner serves {counts['coverage']}")
