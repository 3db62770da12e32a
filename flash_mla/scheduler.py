"""Tile scheduler: which (request, KV-block range) each SM partition of the decode kernel processes.

This module is the single source of truth for the split-KV schedule. It is written with integer torch
ops only, so the same function runs on the CPU (tests) and on the GPU (``get_mla_metadata``: no host
sync, CUDA-graph safe) and gives bit-identical results on both.

Model. Request ``i`` has ``nb_i = ceil(seqlen_i / BLOCK_N)`` KV blocks and costs ``nb_i + overhead``
work units (the fixed per-request cost of loading Q, the epilogue and a possible combine). Requests are
laid end to end on one work line; request ``i`` starts at ``C_i`` (exclusive prefix sum), its first
``overhead`` units are its fixed cost and unit ``C_i + overhead + k`` is its block ``k``. Partition ``p``
owns the half-open work interval ``[p * payload, (p + 1) * payload)`` with
``payload = max(ceil(W / P), min_payload)``: a minimum payload above 1 leaves partitions idle so that
short requests are cut into fewer, longer splits (fewer partials to merge).
It processes, of request ``i``, the blocks whose units fall in its interval. A zero-length request
(no blocks) is owned by the partition whose interval holds ``C_i``, which writes its empty output.

Metadata row of partition ``p`` (int32, ``METADATA_SIZE`` columns):
    0 begin_req    first request the partition touches
    1 begin_block  first block of ``begin_req`` it processes
    2 end_req      last request it touches (``end_req < begin_req``: the partition is idle)
    3 end_block    one past the last block of ``end_req`` it processes
    4 begin_split  index of this partition among the partitions touching ``begin_req``
    5 begin_len    ``max(cache_seqlens[begin_req], 0)``
    6 begin_slot0  ``num_splits[begin_req]``
    7 begin_splits ``num_splits[begin_req + 1] - num_splits[begin_req]``
    (all zero but ``end_req`` = -1 for an idle partition). Columns 5..7 repeat what the kernel could read from
    ``cache_seqlens`` and ``num_splits``, so that a CTA starts its first request without a second dependent
    round trip to memory.
Blocks of a request ``i`` strictly between ``begin_req`` and ``end_req`` are processed whole.

``num_splits`` has ``b + 1`` entries: ``num_splits[i + 1] - num_splits[i]`` partitions touch request
``i``; when that is more than one, each writes a partial result at accumulator row
``num_splits[i] + split`` and the combine kernel merges them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .constants import BLOCK_M, METADATA_SIZE, SCHED_BLOCK_N  # noqa: F401  (METADATA_SIZE: re-exported)

BLOCK_N = SCHED_BLOCK_N  # scheduling unit in KV tokens; independent of page size and of a variant's stage size
FIXED_OVERHEAD_BLOCKS = 5


class SplitPolicy(NamedTuple):
    """The scheduler's two launch-time knobs, as a variant (and its tuning DB row) carries them."""
    overhead: int = FIXED_OVERHEAD_BLOCKS   # fixed cost of a request in work units (blocks)
    min_blocks: int = 1                     # fewest work units a partition takes (the minimum payload)


def num_sm_parts(num_sms: int, num_heads_per_head_k: int, num_heads_k: int) -> int:
    """How many partitions the KV work is cut into so that the grid (parts, h_kv, m_blocks) fills the GPU."""
    m_blocks = -(-num_heads_per_head_k // BLOCK_M)
    return max(1, num_sms // num_heads_k // m_blocks)


def max_total_splits(batch_size: int, num_parts: int) -> int:
    """Upper bound of ``num_splits[-1]``: every partition boundary adds at most one split."""
    return batch_size + num_parts


def schedule(cache_seqlens: torch.Tensor, num_parts: int, *,
             block_n: int = BLOCK_N, overhead: int = FIXED_OVERHEAD_BLOCKS, min_payload: int = 1):
    """Return ``(tile_scheduler_metadata (num_parts, 8) int32, num_splits (b + 1,) int32)``.

    ``cache_seqlens`` is an int32 tensor of shape ``(b,)`` on any device; results live on the same device.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if min_payload < 1:
        raise ValueError(f"min_payload must be >= 1, got {min_payload}")
    dev = cache_seqlens.device
    lens = cache_seqlens.to(torch.int64).clamp_min(0)
    b = lens.numel()
    nb = (lens + block_n - 1) // block_n                                  # (b,)
    work = nb + overhead
    start = torch.cumsum(work, 0) - work                                  # C_i, (b,)
    total = work.sum()
    payload = ((total + num_parts - 1) // num_parts).clamp_min(min_payload)   # 0-dim tensor, no host sync
    p = torch.arange(num_parts, device=dev, dtype=torch.int64)
    s = (p * payload).unsqueeze(1)                                        # (P, 1)
    e = torch.minimum((p + 1) * payload, total).unsqueeze(1)
    lo = torch.maximum(s, (start + overhead).unsqueeze(0))                # (P, b) block-unit range in interval
    hi = torch.minimum(e, (start + work).unsqueeze(0))
    owns_empty = (nb == 0).unsqueeze(0) & (s <= start.unsqueeze(0)) & (start.unsqueeze(0) < e)
    touch = (lo < hi) | owns_empty                                        # (P, b)

    idx = torch.arange(b, device=dev, dtype=torch.int64).unsqueeze(0)
    begin_req = torch.where(touch, idx, b).amin(1) if b else torch.zeros(num_parts, dtype=torch.int64, device=dev)
    end_req = torch.where(touch, idx, -1).amax(1) if b else torch.full((num_parts,), -1, dtype=torch.int64, device=dev)
    busy = end_req >= 0
    bq = torch.where(busy, begin_req, 0)
    eq = torch.where(busy, end_req, 0)
    if b:
        begin_block = (s.squeeze(1) - start[bq] - overhead).clamp(min=0)
        begin_block = torch.minimum(begin_block, nb[bq])
        end_block = (e.squeeze(1) - start[eq] - overhead).clamp(min=0)
        end_block = torch.minimum(end_block, nb[eq])
        prior = torch.cumsum(touch.to(torch.int64), 0) - touch.to(torch.int64)   # partitions before p touching i
        begin_split = prior.gather(1, bq.unsqueeze(1)).squeeze(1)
        splits_per_req = touch.to(torch.int64).sum(0)
    else:
        begin_block = end_block = begin_split = torch.zeros(num_parts, dtype=torch.int64, device=dev)
        splits_per_req = torch.zeros(0, dtype=torch.int64, device=dev)

    num_splits = torch.zeros(b + 1, dtype=torch.int64, device=dev)
    num_splits[1:] = torch.cumsum(splits_per_req, 0)
    if b:
        begin_len, slot0 = lens[bq], num_splits[bq]
        n_begin = num_splits[bq + 1] - slot0
    else:
        begin_len = slot0 = n_begin = torch.zeros(num_parts, dtype=torch.int64, device=dev)
    meta = torch.stack([
        torch.where(busy, begin_req, 0), torch.where(busy, begin_block, 0),
        end_req, torch.where(busy, end_block, 0), torch.where(busy, begin_split, 0),
        torch.where(busy, begin_len, 0), torch.where(busy, slot0, 0), torch.where(busy, n_begin, 0),
    ], dim=1).to(torch.int32)
    return meta.contiguous(), num_splits.to(torch.int32)


def partition_work(meta_row, num_splits, cache_seqlens, block_n: int = BLOCK_N):
    """Expand one metadata row into ``[(req, first_block, end_block, split_slot, is_split), ...]``.

    Plain-Python mirror of the loop the decode kernel runs; used by tests and debugging tools.
    """
    begin_req, begin_block, end_req, end_block, begin_split = (int(x) for x in meta_row[:5])
    out = []
    for i in range(begin_req, end_req + 1):
        nb = -(-max(int(cache_seqlens[i]), 0) // block_n)
        lo = begin_block if i == begin_req else 0
        hi = end_block if i == end_req else nb
        split = begin_split if i == begin_req else 0
        n = int(num_splits[i + 1]) - int(num_splits[i])
        out.append((i, lo, hi, int(num_splits[i]) + split, n > 1))
    return out
