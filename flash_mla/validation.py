"""Argument checks of the public API.

Each check looks only at tensor metadata (dtype, shape, strides, device), never at tensor values, so
validating costs no host-device synchronisation and is safe inside CUDA-graph capture. Errors are
``TypeError`` for a wrong kind of object or dtype and ``ValueError`` for a wrong shape, layout, device or
value, and every message starts with the name of the offending argument.

:func:`check_values` is the one exception, and opt-in: with ``FLASH_MLA_CHECK_VALUES=1`` the decode call
also reads the lengths and block indices (a host sync, not allowed inside CUDA-graph capture) so that a
length past the block table's capacity or a block index outside the cache is a clear error instead of an
out-of-bounds read. A debugging aid, off by default.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Iterable, Optional

import torch

__all__ = ["HEAD_DIM_K", "HEAD_DIM_V", "METADATA_COLUMNS", "check_metadata_args", "check_split_policy_args",
           "check_decode_args", "check_k_scale",
           "check_values", "values_check_enabled", "ENV_CHECK_VALUES"]

ENV_CHECK_VALUES = "FLASH_MLA_CHECK_VALUES"

from .constants import HEAD_DIM as HEAD_DIM_K, HEAD_DIM_V, METADATA_SIZE as METADATA_COLUMNS
_INPUT_DTYPES = (torch.bfloat16, torch.float16)
_FP8_KV = torch.float8_e4m3fn


def _require_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _require_dtype(name: str, x: torch.Tensor, dtypes: tuple, what: str) -> None:
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be {what}, got {x.dtype}")


def _require_int32(name: str, x: torch.Tensor) -> None:
    _require_dtype(name, x, (torch.int32,), "int32")


def _require_rank(name: str, x: torch.Tensor, rank: int, layout: str) -> None:
    if x.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(x.shape)}")


def _require_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def check_metadata_args(cache_seqlens, num_heads_per_head_k, num_heads_k, split_overhead=None,
                        split_min_blocks=None) -> None:
    """Checks of ``get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k, split_overhead=...,
    split_min_blocks=...)``.

    ``split_overhead`` (None: the tuned policy) must be an int >= 1: the scheduler lays each request's
    fixed cost before its blocks, and a value below 1 would drop blocks from the schedule.
    ``split_min_blocks`` (None: the tuned policy) must be an int >= 1: a partition's payload.
    """
    _require_tensor("cache_seqlens", cache_seqlens)
    _require_int32("cache_seqlens", cache_seqlens)
    _require_rank("cache_seqlens", cache_seqlens, 1, "(batch_size,)")
    _require_int("num_heads_per_head_k", num_heads_per_head_k)
    _require_int("num_heads_k", num_heads_k)
    check_split_policy_args(split_overhead, split_min_blocks)


def check_split_policy_args(split_overhead=None, split_min_blocks=None) -> None:
    """``split_overhead`` and ``split_min_blocks`` of ``get_mla_metadata``: each None (the tuned policy) or
    an int >= 1 (see :func:`check_metadata_args`)."""
    if split_overhead is not None:
        _require_int("split_overhead", split_overhead)
    if split_min_blocks is not None:
        _require_int("split_min_blocks", split_min_blocks)


def check_decode_args(
    q,
    k_cache,
    block_table,
    cache_seqlens,
    head_dim_v,
    tile_scheduler_metadata,
    num_splits,
    softmax_scale: Optional[float],
    causal,
    *,
    supported_page_sizes: Iterable[int],
    require_cuda: bool,
) -> dict:
    """Checks of ``flash_mla_with_kvcache``; returns the problem traits.

    Returns ``{"b", "s_q", "h_q", "h_kv", "d", "dv", "page_size", "dtype", "num_parts"}``.
    """
    named = {
        "q": q, "k_cache": k_cache, "block_table": block_table, "cache_seqlens": cache_seqlens,
        "tile_scheduler_metadata": tile_scheduler_metadata, "num_splits": num_splits,
    }
    for name, x in named.items():
        _require_tensor(name, x)

    # dtypes
    _require_dtype("q", q, _INPUT_DTYPES, "bfloat16 or float16")
    _require_dtype("k_cache", k_cache, _INPUT_DTYPES + (_FP8_KV,), "bfloat16, float16 or float8_e4m3fn")
    if k_cache.dtype == _FP8_KV:
        if q.dtype != torch.bfloat16:
            raise TypeError(f"q must be bfloat16 with a float8_e4m3fn k_cache, got {q.dtype}")
    elif k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache must have the dtype of q ({q.dtype}) or be float8_e4m3fn, got {k_cache.dtype}")
    for name in ("block_table", "cache_seqlens", "tile_scheduler_metadata", "num_splits"):
        _require_int32(name, named[name])

    # ranks
    _require_rank("q", q, 4, "(batch_size, seqlen_q, num_heads_q, head_dim)")
    _require_rank("k_cache", k_cache, 4, "(num_blocks, page_block_size, num_heads_k, head_dim)")
    _require_rank("block_table", block_table, 2, "(batch_size, max_num_blocks_per_seq)")
    _require_rank("cache_seqlens", cache_seqlens, 1, "(batch_size,)")
    _require_rank("tile_scheduler_metadata", tile_scheduler_metadata, 2,
                  f"(num_sm_parts, {METADATA_COLUMNS})")
    _require_rank("num_splits", num_splits, 1, "(batch_size + 1,)")

    b, s_q, h_q, d = q.shape
    num_blocks, page_size, h_kv, d_k = k_cache.shape

    # head dims
    if d != HEAD_DIM_K:
        raise ValueError(f"q head dim (q.shape[-1]) must be {HEAD_DIM_K}, got {d}")
    if d_k != HEAD_DIM_K:
        raise ValueError(f"k_cache head dim (k_cache.shape[-1]) must be {HEAD_DIM_K}, got {d_k}")
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, numbers.Integral):
        raise TypeError(f"head_dim_v must be an int, got {type(head_dim_v).__name__}")
    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {HEAD_DIM_V}, got {head_dim_v}")

    # heads and sizes
    if s_q < 1:
        raise ValueError(f"q seqlen_q (q.shape[1]) must be >= 1, got {s_q}")
    if h_q < 1:
        raise ValueError(f"q num_heads_q (q.shape[2]) must be >= 1, got {h_q}")
    if h_kv < 1:
        raise ValueError(f"k_cache num_heads_k (k_cache.shape[2]) must be >= 1, got {h_kv}")
    if h_q % h_kv != 0:
        raise ValueError(f"q num_heads_q ({h_q}) must be a multiple of k_cache num_heads_k ({h_kv})")
    if page_size < 1:
        raise ValueError(f"k_cache page_block_size (k_cache.shape[1]) must be >= 1, got {page_size}")
    if num_blocks < 1:
        raise ValueError(f"k_cache must hold at least one block, got shape {tuple(k_cache.shape)}")
    supported = sorted(int(p) for p in supported_page_sizes)
    if page_size not in supported:
        raise ValueError(f"k_cache page_block_size (k_cache.shape[1]) must be one of {supported}, "
                         f"got {page_size}")

    # batch sizes
    if block_table.shape[0] != b:
        raise ValueError(f"block_table batch size ({block_table.shape[0]}) must equal q's ({b})")
    if cache_seqlens.shape[0] != b:
        raise ValueError(f"cache_seqlens batch size ({cache_seqlens.shape[0]}) must equal q's ({b})")
    if num_splits.shape[0] != b + 1:
        raise ValueError(f"num_splits must have batch_size + 1 = {b + 1} entries, got {num_splits.shape[0]} "
                         "(was the metadata computed for another batch?)")
    if tile_scheduler_metadata.shape[1] != METADATA_COLUMNS:
        raise ValueError(f"tile_scheduler_metadata must have {METADATA_COLUMNS} columns, "
                         f"got shape {tuple(tile_scheduler_metadata.shape)}")
    num_parts = tile_scheduler_metadata.shape[0]
    if num_parts < 1:
        raise ValueError("tile_scheduler_metadata must have at least one row (num_sm_parts >= 1)")

    # devices
    device = q.device
    for name, x in named.items():
        if x.device != device:
            raise ValueError(f"{name} must be on the same device as q ({device}), got {x.device}")
    if require_cuda:
        for name, x in named.items():
            if x.device.type != "cuda":
                raise ValueError(f"{name} must be a CUDA tensor, got device {x.device}")

    # layouts
    for name in ("q", "k_cache"):
        x = named[name]
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (stride(-1) == 1), "
                             f"got strides {tuple(x.stride())}")
    # The block table may be a row slice of a wider buffer (engines keep one sized for the longest context
    # and pass [:batch, :pages]): the kernels take its row stride; its entries must be adjacent.
    bt = named["block_table"]
    if bt.stride(1) != 1:
        raise ValueError(f"block_table must be contiguous in its last dimension (stride(-1) == 1), got strides "
                         f"{tuple(bt.stride())}")
    for name in ("cache_seqlens", "tile_scheduler_metadata", "num_splits"):
        if not named[name].is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {tuple(named[name].stride())}")

    # scalars
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not (math.isfinite(float(softmax_scale)) and float(softmax_scale) > 0):
            raise ValueError(f"softmax_scale must be a finite positive number, got {softmax_scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")

    return {
        "b": int(b), "s_q": int(s_q), "h_q": int(h_q), "h_kv": int(h_kv), "d": int(d),
        "dv": int(head_dim_v), "page_size": int(page_size), "dtype": q.dtype, "num_parts": int(num_parts),
    }


def check_k_scale(k_cache: torch.Tensor, q: torch.Tensor, k_scale, k_scale_value) -> None:
    """The dequantisation scale of a float8 KV cache (value = stored value * ``k_scale_value`` * ``k_scale[0]``):
    ``k_scale`` a one-element float32 tensor on q's device or None, ``k_scale_value`` a finite positive float.
    Neither may differ from its default for a bf16 / fp16 cache."""
    if isinstance(k_scale_value, bool) or not isinstance(k_scale_value, numbers.Real):
        raise TypeError(f"k_scale must be a float or a one-element float32 tensor, got "
                        f"{type(k_scale_value).__name__}")
    if k_cache.dtype != _FP8_KV:
        if k_scale is not None or float(k_scale_value) != 1.0:
            raise ValueError(f"k_scale applies to a float8_e4m3fn k_cache only, got a {k_cache.dtype} k_cache")
        return
    if not (math.isfinite(float(k_scale_value)) and float(k_scale_value) > 0):
        raise ValueError(f"k_scale must be a finite positive number, got {k_scale_value}")
    if k_scale is not None:
        _require_tensor("k_scale", k_scale)
        if k_scale.dtype != torch.float32 or k_scale.numel() != 1:
            raise ValueError(f"k_scale must be a one-element float32 tensor, got {k_scale.dtype} of shape "
                             f"{tuple(k_scale.shape)}")
        if k_scale.device != q.device:
            raise ValueError(f"k_scale must be on the same device as q ({q.device}), got {k_scale.device}")


def values_check_enabled() -> bool:
    return os.environ.get(ENV_CHECK_VALUES, "") not in ("", "0")


def check_values(k_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor) -> None:
    """Lengths within the block table's capacity and every block index a request uses inside ``k_cache``.

    Reads tensor values (a host sync); called by ``flash_mla_with_kvcache`` only with ``FLASH_MLA_CHECK_VALUES=1``.
    """
    if torch.cuda.is_available() and cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{ENV_CHECK_VALUES}=1 reads tensor values, which cannot happen inside CUDA-graph "
                           "capture: unset it while capturing")
    page, num_blocks, width = k_cache.shape[1], k_cache.shape[0], block_table.shape[1]
    lens = cache_seqlens.to(torch.int64).cpu()
    capacity = width * page
    over = torch.nonzero(lens > capacity)
    if over.numel():
        i = int(over[0])
        raise ValueError(f"cache_seqlens[{i}] = {int(lens[i])} exceeds the block table's capacity {capacity} "
                         f"(block_table.shape[1] = {width} pages of {page} tokens)")
    pages = (lens.clamp_min(0) + page - 1) // page
    used = torch.arange(width)[None, :] < pages[:, None]
    bt = block_table.cpu().to(torch.int64)
    bad = torch.nonzero(used & ((bt < 0) | (bt >= num_blocks)))
    if bad.numel():
        i, j = (int(x) for x in bad[0])
        raise ValueError(f"block_table[{i}, {j}] = {int(bt[i, j])} is outside k_cache's {num_blocks} blocks "
                         f"(request {i} has length {int(lens[i])})")
