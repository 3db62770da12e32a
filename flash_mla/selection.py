"""Runtime choice of the kernel variant for a decode call, from the tuning databases.

Selection rule
--------------
1. **Exact key.** A winner row of a tuning database is a candidate only if it matches the call exactly
   on GPU name, SM count, CUDA version (major.minor), dtype, h_q, h_kv, s_q, head dims (576 / 512),
   page size and causal flag. A winner is never borrowed from another GPU, CUDA version, dtype or shape.
2. **User before shipped.** If the user database (``$FLASH_MLA_TUNING_DB`` or
   :func:`flash_mla.db.set_user_db`) has any candidate row, only its rows are considered; otherwise the
   rows of the database shipped with the package.
3. **The call's workload key** (:class:`flash_mla.workload_key.WorkloadKey`, the same key the tuner
   stores winners under). *With a length hint* (``seqlens_hint`` of :func:`flash_mla.get_mla_metadata`,
   carried by its result to every layer of the step) the candidates are the rows tuned for a known
   length, and the row with the smallest
   ``|log2(batch_bucket) - log2(call batch bucket)| + |log2(seqlen_bucket) - log2(call seqlen bucket)|``
   wins; at equal distance, the row whose batch bucket is nearer (a row of the call's own batch bucket before
   one of its own length bucket: the batch sets how the requests are split over the SMs, and with it the merge
   path and split policy that win; H100, leave-one-out over the suites' rows, ``bench/selection_loo.py``: 69 of
   83 picks measured by the left-out run within 3% of its best and 3 not measured, against 55 of 69 and 17).
   *Without a hint* the candidates are the rows stored for calls without one (``seqlen_bucket = NO_HINT``: the
   variant with the best geometric-mean time over the tuned lengths of that batch bucket), nearest batch bucket
   first. The block table's width is not used: in serving engines it is ``max_model_len / page_size`` whatever
   the lengths.
   **Ties** (rows at the same distance and batch distance with different winners; a call between two tuned
   batch buckets) are
   broken by the trials stored beside the winners: each tied winner's time relative to the row's own
   winner, in the run that tuned the row, over the reference workloads (with a hint: the tied rows; without:
   every row tuned for a length in the tied batch buckets) where every tied winner was measured; the smallest
   geometric mean wins. (H100: at b2 h_q = 128 the b4 row's separate merge is 1.33x the b1 row's wide merge at
   b1, the wide merge 1.03x the separate one at b4.) Where no reference workload measured them all, the larger
   sequence-length bucket wins, then the larger batch bucket.
4. **Default.** Without a candidate the call runs the default variant
   (:func:`flash_mla.codegen.variant.default_variant` for its dtype and page size), and one WARNING
   record of the ``flash_mla`` logger (``logging``, as serving engines collect it) says so once per (GPU,
   CUDA version, dtype, h_q, h_kv, s_q, page size, causal, with or without a hint).

Cost. Every input is a host-side integer or string (tensor shapes and device properties), so selection
never synchronises with the GPU. Results are cached in a dict keyed by the arguments after bucketing:
a repeated call is one dict lookup. The database files are opened read-only on first use and kept open;
:func:`clear_cache` (also run by :func:`flash_mla.db.set_user_db`) forgets the cached results, the open
files and the warnings already given, so the next call looks again.

:func:`split_policy` picks the scheduler's policy (``split_overhead``, ``split_min_blocks``) for
``get_mla_metadata``, which sees only the head configuration, the batch size and the length hint, from
one row of the same winners.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import statistics
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from . import db
from .db import cuda_major_minor, set_user_db
from .scheduler import SplitPolicy
from .workload_key import (HEAD_DIM, HEAD_DIM_V, NO_HINT, WorkloadKey, bucket_batch, problem_dtype,
                           bucket_seqlen)

if TYPE_CHECKING:                          # codegen is imported on first use (selection is on the serving path)
    from .codegen.variant import Variant

SOURCES = ("user", "shipped")


#: Where the fallback to the default variant is reported (WARNING, once per kind of call).
log = logging.getLogger("flash_mla")


@dataclass(frozen=True)
class Selection:
    """Outcome of :func:`select`.

    Attributes:
        variant: the winning :class:`~flash_mla.codegen.variant.Variant` (validated; frozen, so every cached
            caller can share it), or ``None`` for the default variant.
        source: ``'user'``, ``'shipped'`` or ``'default'``.
        reason: one line saying why (which database and bucket, or what was missing).
    """
    variant: Optional["Variant"]
    source: str
    reason: str


_lock = threading.RLock()
_cache: dict[tuple, Selection] = {}
_split_cache: dict[tuple, Optional[int]] = {}
_warned: set[tuple] = set()
_dbs: dict[str, Optional[db.TuningDB]] = {}      # source -> open handle, None when that DB is absent


def clear_cache() -> None:
    """Forget cached selections, open database handles and given warnings."""
    with _lock:
        _cache.clear()
        _split_cache.clear()
        _warned.clear()
        for handle in _dbs.values():
            if handle is not None:
                handle.close()
        _dbs.clear()


db.on_user_db_change(clear_cache)          # db.set_user_db forgets what this module cached


def _db(source: str) -> Optional[db.TuningDB]:
    """The database of ``source`` opened read-only once, or None when it does not exist."""
    if source in _dbs:
        return _dbs[source]
    if source == "user":
        path = db.user_db_path()
        handle = db.open_user_db(path) if path is not None else None
    else:
        path = db.shipped_db_path()
        handle = db.TuningDB(path, readonly=True) if path is not None and path.is_file() else None
    _dbs[source] = handle
    return handle


def db_path(source: str) -> Optional[str]:
    handle = _db(source)
    return None if handle is None else str(handle.path)


def _usable(row: dict) -> Optional["Variant"]:
    """The row's variant (validated) if this package can build it for the row's problem, else None."""
    from .codegen.variant import InvalidVariant, Variant
    try:
        fields = json.loads(row["variant_json"])
        v = Variant.from_dict(fields).validate()
    except (ValueError, TypeError, InvalidVariant):
        return None
    if (v.dtype, v.page_size) != (row["dtype"], row["page_size"]):
        return None
    return v


def _matching_rows(source: str, where: dict) -> list[tuple[dict, "Variant"]]:
    """(winner row, variant) of ``source`` whose columns equal ``where``; unusable rows dropped."""
    handle = _db(source)
    if handle is None:
        return []
    out = []
    for row in handle.winners(**where):
        v = _usable(row)
        if v is not None:
            out.append((row, v))
    return out


def select(gpu_name: Optional[str], sm_count: Optional[int], cuda_version: Optional[str],
           key: WorkloadKey) -> Selection:
    """The variant for one decode call (see the module docstring for the rule).

    Args:
        gpu_name, sm_count: as ``torch.cuda.get_device_properties`` reports them.
        cuda_version: ``torch.version.cuda`` (compared as major.minor).
        key: the call's :class:`WorkloadKey` (:meth:`WorkloadKey.for_call`).
    """
    ckey = (gpu_name, sm_count, cuda_version, key)
    hit = _cache.get(ckey)
    if hit is not None:
        return hit
    with _lock:
        hit = _cache.get(ckey)
        if hit is None:
            hit = _select_uncached(gpu_name, sm_count, cuda_version, key)
            _cache[ckey] = hit
    return hit


#: How many leading fields of :func:`_rank` make two rows equally near (the rest only orders them).
_NEAR_FIELDS = 2


def _rank(row: dict, key: WorkloadKey) -> tuple:
    batch = abs(math.log2(row["batch_bucket"]) - math.log2(key.batch_bucket))
    if not key.has_hint:
        return (batch, 0.0, -row["batch_bucket"])
    dist = batch + abs(math.log2(row["seqlen_bucket"]) - math.log2(key.seqlen_bucket))
    return (dist, batch, -row["seqlen_bucket"], -row["batch_bucket"])


#: Trial columns that name the workload and run of a winner row (its trials are those with the same values).
_TRIAL_KEY = ("gpu_name", "sm_count", "cuda_version", "dtype", "h_q", "h_kv", "s_q", "head_dim", "head_dim_v",
              "page_size", "causal", "batch_bucket", "seqlen_bucket", "run_id")


#: Trial phases measured at lengths other than the tuned workload's own: the bucket check (other lengths of the
#: bucket). The no-hint step's measurements of a workload are at its own lengths and count; its aggregate trial
#: carries the no-hint key and never matches a row tuned for a length.
_OTHER_LENGTH_PHASES = ("bucket",)


def _trial_medians(handle: db.TuningDB, row: dict) -> dict[str, float]:
    """Median time of every variant measured in the run that tuned the winner ``row``, at its workload."""
    times: dict[str, list[float]] = {}
    for t in handle.trials(**{c: row[c] for c in _TRIAL_KEY}, state="ok"):
        if t["time_us"] and t["phase"] not in _OTHER_LENGTH_PHASES:
            times.setdefault(t["variant_key"], []).append(float(t["time_us"]))
    return {k: statistics.median(v) for k, v in times.items()}


_SHAPE_COLUMNS = ("dtype", "h_q", "h_kv", "s_q", "page_size", "causal")


def _break_tie(source: str, tied: list, pool: list, hinted: bool) -> tuple[tuple[dict, "Variant"], str]:
    """The (row, variant) of the equally near rows ``tied`` (in rank order) whose winner is fastest, relative to
    each reference workload's own winner, over the reference workloads where every tied winner was measured
    (module docstring); the first of ``tied`` where they agree or no such workload exists. The reference
    workloads: with a length hint (``hinted``) the tied rows, without one the rows of ``pool`` ((row, variant)
    pairs) tuned for a length, of the tied rows' shape and batch buckets. Also a note for the reason."""
    candidates: dict[str, tuple[dict, "Variant"]] = {}
    for rf in tied:
        candidates.setdefault(rf[0]["variant_key"], rf)
    if len(candidates) == 1:
        return tied[0], ""
    handle = _db(source)
    if hinted:
        refs = [r for r, _ in tied]
    else:
        buckets = {r["batch_bucket"] for r, _ in tied}
        shape = {c: tied[0][0][c] for c in _SHAPE_COLUMNS}
        refs = [r for r, _ in pool if r["seqlen_bucket"] != NO_HINT and r["batch_bucket"] in buckets
                and all(r[c] == v for c, v in shape.items())]
    logs = {k: 0.0 for k in candidates}
    used = 0
    for ref in refs:
        medians = _trial_medians(handle, ref)
        base = medians.get(ref["variant_key"])
        if not base or any(k not in medians for k in candidates):
            continue
        used += 1
        for k in candidates:
            logs[k] += math.log(medians[k] / base)
    if not used:
        return tied[0], ""
    order = list(candidates)
    best = min(order, key=lambda k: (logs[k], order.index(k)))
    ratios = ", ".join(f"{k} {math.exp(logs[k] / used):.3f}" for k in order)
    return candidates[best], (f"; {len(tied)} rows equally near, decided by their trials on {used} workloads "
                              f"(time / each workload's winner, geometric mean: {ratios})")


def _select_uncached(gpu_name, sm_count, cuda_version, key: WorkloadKey) -> Selection:
    cuda = cuda_major_minor(cuda_version)
    where = {k: v for k, v in key.db_fields().items() if k not in ("batch_bucket", "seqlen_bucket")}
    where.update(gpu_name=gpu_name, sm_count=sm_count, cuda_version=cuda)
    if gpu_name is not None and sm_count is not None and cuda is not None:
        for source in SOURCES:
            pool = _matching_rows(source, where)
            rows = [(r, f) for r, f in pool if (r["seqlen_bucket"] != NO_HINT) == key.has_hint]
            if rows:
                rows.sort(key=lambda rf: _rank(rf[0], key))
                nearest = _rank(rows[0][0], key)[:_NEAR_FIELDS]
                tied = [rf for rf in rows if _rank(rf[0], key)[:_NEAR_FIELDS] == nearest]
                (row, variant), tie_note = _break_tie(source, tied, pool, key.has_hint)
                tuned = WorkloadKey.from_row(row).canonical
                reason = (f"{source} DB {db_path(source)}: {row['variant_key']} tuned for {tuned} "
                          f"(call: {key.canonical}){tie_note}")
                return Selection(variant, source, reason)
    shape = (f"dtype={key.dtype}, h_q={key.h_q}, h_kv={key.h_kv}, s_q={key.s_q}, page_size={key.page_size}, "
             f"causal={key.causal}, {'with' if key.has_hint else 'without'} a length hint")
    reason = (f"no tuning DB entry for GPU {gpu_name!r} ({sm_count} SMs) with CUDA {cuda} and {shape}; "
              f"default variant")
    wkey = (gpu_name, cuda, key.dtype, key.h_q, key.h_kv, key.s_q, key.page_size, key.causal, key.has_hint)
    if wkey not in _warned:
        _warned.add(wkey)
        hint = ("" if key.has_hint else " Calls that pass seqlens_hint= to get_mla_metadata use the winners "
                "tuned for their length.")
        log.warning(
            f"flash_mla: the tuning database has no entry for GPU {gpu_name!r} ({sm_count} SMs) with "
            f"CUDA {cuda} for {shape}; using the default variant {_default_key(key.dtype, key.page_size)}. "
            f"Tune this GPU and CUDA version with `flash-mla tune` and point {db.ENV_USER_DB} at the "
            f"resulting database (or call flash_mla.db.set_user_db).{hint}")
    return Selection(None, "default", reason)


def _default_key(dtype: str, page_size: int) -> str:
    from .codegen.variant import InvalidVariant, default_variant
    try:
        return default_variant(dtype, page_size).key
    except InvalidVariant:
        return f"(none for dtype {dtype}, page size {page_size})"


def split_policy(gpu_name: Optional[str], sm_count: Optional[int], cuda_version: Optional[str],
                 num_heads_per_head_k: int, num_heads_k: int, batch: int,
                 seqlen_bucket: int = NO_HINT) -> Optional[SplitPolicy]:
    """The scheduler's :class:`SplitPolicy` (``split_overhead``, ``split_min_blocks``) for
    :func:`flash_mla.get_mla_metadata`, taken from one winner row, or None when no winner fits.

    Candidates: winners for this GPU, SM count and CUDA version (major.minor) with ``h_kv == num_heads_k``
    and ``h_q * s_q / h_kv == num_heads_per_head_k`` (user DB rows if it has any, else shipped rows).
    The metadata does not know dtype, page size or causality, so the preference is bf16, then page
    size 64, then rows of the same kind as the call (tuned for a length, or for calls without a length
    hint, ``seqlen_bucket`` as in :class:`WorkloadKey`), then the distance of :func:`select`; equally near rows
    are decided by their trials as in :func:`select`, then go to the larger seqlen bucket, then the larger batch
    bucket. Cached per arguments after bucketing ``batch``.
    """
    key = (gpu_name, sm_count, cuda_version, num_heads_per_head_k, num_heads_k, bucket_batch(batch),
           int(seqlen_bucket))
    try:
        return _split_cache[key]
    except KeyError:
        pass
    with _lock:
        if key not in _split_cache:
            _split_cache[key] = _split_policy_uncached(*key)
        return _split_cache[key]


def _split_policy_uncached(gpu_name, sm_count, cuda_version, nhphk, nhk, batch_bucket,
                           seqlen_bucket) -> Optional[SplitPolicy]:
    cuda = cuda_major_minor(cuda_version)
    if gpu_name is None or sm_count is None or cuda is None:
        return None
    where = dict(gpu_name=gpu_name, sm_count=sm_count, cuda_version=cuda, h_kv=int(nhk),
                 head_dim=HEAD_DIM, head_dim_v=HEAD_DIM_V)
    for source in SOURCES:
        rows = [(r, v) for r, v in _matching_rows(source, where) if r["h_q"] * r["s_q"] == nhphk * r["h_kv"]]
        if rows:
            hinted = seqlen_bucket != NO_HINT

            def rank(rf):
                r = rf[0]
                sk = (abs(math.log2(r["seqlen_bucket"]) - math.log2(seqlen_bucket))
                      if hinted and r["seqlen_bucket"] != NO_HINT else 0.0)
                batch = abs(math.log2(r["batch_bucket"]) - math.log2(batch_bucket))
                return (r["dtype"] != "bf16", r["page_size"] != 64, (r["seqlen_bucket"] != NO_HINT) != hinted,
                        batch + sk, batch, -r["seqlen_bucket"], -r["batch_bucket"], r["causal"], r["s_q"],
                        r["variant_key"])
            rows.sort(key=rank)
            # Equally near rows (select()'s distance, then its batch distance) are decided by their trials, as
            # select() decides them.
            tied = [rf for rf in rows if rank(rf)[:5] == rank(rows[0])[:5]]
            return _break_tie(source, tied, rows, hinted)[0][1].split_policy
    return None


@functools.lru_cache(maxsize=None)
def device_info(device_index: int) -> tuple[str, int, Optional[str]]:
    """(GPU name, SM count, CUDA version) of a CUDA device; cached, so no driver call after the first."""
    import torch
    props = torch.cuda.get_device_properties(device_index)
    return props.name, int(props.multi_processor_count), torch.version.cuda


@functools.lru_cache(maxsize=4096)
def _call_key(dtype: str, h_q: int, h_kv: int, s_q: int, page_size: int, causal: bool, batch_bucket: int,
              seqlen_bucket: int) -> WorkloadKey:
    return WorkloadKey(dtype, h_q, h_kv, s_q, page_size, causal, batch_bucket, seqlen_bucket)


def key_for_tensors(q: Any, k_cache: Any, causal: bool, mean_seqlen: Optional[float] = None) -> WorkloadKey:
    """The :class:`WorkloadKey` of ``flash_mla_with_kvcache``'s tensors, from their shapes (no host sync).

    The same key as :meth:`WorkloadKey.for_call`, built once per bucketed shape: a repeated call costs a
    cache lookup, not a validated dataclass."""
    b, s_q, h_q, _ = q.shape
    page_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    return _call_key(problem_dtype(q.dtype, k_cache.dtype), int(h_q), int(h_kv), int(s_q), int(page_size),
                     bool(causal) and int(s_q) > 1, bucket_batch(b),
                     NO_HINT if mean_seqlen is None else bucket_seqlen(mean_seqlen))


def select_for_tensors(q: Any, k_cache: Any, causal: bool, mean_seqlen: Optional[float] = None) -> Selection:
    """:func:`select` for ``flash_mla_with_kvcache``'s tensors and the length hint of its metadata."""
    gpu_name, sm_count, cuda = device_info(q.device.index or 0)
    return select(gpu_name, sm_count, cuda, key_for_tensors(q, k_cache, causal, mean_seqlen))


__all__ = ["Selection", "log", "select", "split_policy", "clear_cache", "set_user_db",
           "select_for_tensors", "key_for_tensors", "device_info"]
