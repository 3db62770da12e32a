"""Winners transferred to workloads and GPUs never measured: the stored winners nearest to a workload, by the
features a call shows on the host, become a new study's first points after the default.

The distance between a workload and a stored winner row (same dtype and page size; rows for calls without a length
hint are left out) adds, in log2 units: the batch buckets' difference, the length buckets' difference, twice the
difference in q rows per KV head (s_q * h_q / h_kv, which decides the schedule: 16 rows take the swapped
schedules, 128 and more the three-warpgroup qreg one), 1 where the causal flags differ, and 0.5 where the row was
tuned on another GPU. The winners of the nearest rows are proposed in order of distance (ties by variant key),
each once, the default and variants outside the searched space left out.

This is a nearest-neighbour rule over the DB, not a fitted model: it needs no training and stays deterministic.
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Mapping, Optional

from flash_mla.codegen.variant import Variant, default_variant, search_space

from .workloads import Workload

TRANSFER_POINTS = 4      # winners a new study measures after the default (bench/search_replay.py: 4 over 2)
ROWS_WEIGHT = 2.0        # q rows per KV head: what picks the schedule
CAUSAL_WEIGHT = 1.0
OTHER_GPU_WEIGHT = 0.5


def _rows_per_kv_head(s_q: int, h_q: int, h_kv: int) -> float:
    return s_q * h_q / h_kv


def distance(w: Workload, row: Mapping, gpu_name: str) -> float:
    """How far a stored winner ``row`` (a winners row of flash_mla.db) is from ``w`` tuned on ``gpu_name``."""
    k = w.workload_key
    d = abs(math.log2(k.batch_bucket) - math.log2(row["batch_bucket"]))
    d += abs(math.log2(k.seqlen_bucket) - math.log2(row["seqlen_bucket"]))
    d += ROWS_WEIGHT * abs(math.log2(_rows_per_kv_head(k.s_q, k.h_q, k.h_kv))
                           - math.log2(_rows_per_kv_head(row["s_q"], row["h_q"], row["h_kv"])))
    d += CAUSAL_WEIGHT * (bool(row["causal"]) != bool(k.causal))
    d += OTHER_GPU_WEIGHT * (row["gpu_name"] != gpu_name)
    return d


def stored_variant(row: Mapping) -> Optional[Variant]:
    """The variant a stored winner row names, or None where this package cannot build it (a row of a newer or
    older variant space)."""
    try:
        v = Variant.from_dict(json.loads(row["variant_json"]))
    except (ValueError, TypeError, KeyError):
        return None
    return v if v.is_valid() else None


def transfer_points(w: Workload, rows: Iterable[Mapping], gpu_name: str, n: int = TRANSFER_POINTS) -> list[Variant]:
    """Up to ``n`` variants, other than the default, that won on the stored workloads nearest to ``w``."""
    k = w.workload_key
    valid = {v.key for v in search_space(w.dtype, w.page_size)}
    default_key = default_variant(w.dtype, w.page_size).key
    ranked = []
    for row in rows:
        if row["dtype"] != k.dtype or row["page_size"] != k.page_size or not row["seqlen_bucket"]:
            continue
        ranked.append((distance(w, row, gpu_name), row["variant_key"], row))
    ranked.sort(key=lambda t: (t[0], t[1]))
    out: list[Variant] = []
    for _, _, row in ranked:
        v = stored_variant(row)
        if v is None or v.key == default_key or v.key not in valid or v in out:
            continue
        out.append(v)
        if len(out) == n:
            break
    return out
