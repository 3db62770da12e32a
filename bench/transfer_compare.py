#!/usr/bin/env python3
"""Usage: python bench/transfer_compare.py WITH.sqlite WITHOUT.sqlite

Two tuning DBs of the same workloads, tuned with and without transfer (``flash-mla tune --no-transfer``): per
study, the search trial at which each first measured a variant within 1% of the best search time either of
them measured, and the best time each found.
"""
import sqlite3
import sys
from collections import defaultdict

TOL = 0.01


def search_history(path: str) -> dict:
    """study -> [(variant key, time or None)] in measurement order (search phase only)."""
    h = defaultdict(list)
    with sqlite3.connect(path) as c:
        for study, key, state, t in c.execute(
                "select study, variant_key, state, time_us from trials where phase = 'search' order by id"):
            h[study].append((key, t if state == "ok" else None))
    return h


def main(with_path: str, without_path: str) -> None:
    a, b = search_history(with_path), search_history(without_path)
    print(f"{'workload':40} {'best us':>8}  {'transfer: trial / best us':>26}  {'no transfer: trial / best us':>29}")
    totals = [0, 0]
    for study in sorted(set(a) & set(b)):
        best = min(t for h in (a[study], b[study]) for _, t in h if t)
        cells = []
        for i, h in enumerate((a[study], b[study])):
            n = next((j + 1 for j, (_, t) in enumerate(h) if t and t <= best * (1 + TOL)), None)
            found = min((t for _, t in h if t), default=float("nan"))
            cells.append(f"{n if n else '>' + str(len(h)):>5} / {found:7.1f}")
            totals[i] += n if n else len(h) + 1
        print(f"{study.split(':')[1][:40]:40} {best:8.1f}  {cells[0]:>26}  {cells[1]:>29}")
    print(f"sum of trials to within {TOL:.0%} (a miss counts as its trials + 1): transfer {totals[0]}, "
          f"no transfer {totals[1]}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[0])
    main(sys.argv[1], sys.argv[2])
