"""Public API, with FlashMLA's signatures, shapes and dtypes."""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

from . import dispatch, runtime, scheduler
from .codegen.variant import Variant
from .workload_key import mean_seqlen_hint
from .validation import HEAD_DIM_K, check_decode_args, check_metadata_args, check_values, values_check_enabled


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Attribute of the returned tile_scheduler_metadata tensor that carries the length hint to the decode calls.
_HINT_ATTR = "_flash_mla_mean_seqlen"


def get_mla_metadata(cache_seqlens: torch.Tensor, num_heads_per_head_k: int, num_heads_k: int,
                     *, split_overhead: Optional[int] = None, split_min_blocks: Optional[int] = None,
                     seqlens_hint=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split-KV schedule for a decode step.

    Args:
        cache_seqlens: ``(batch_size,)`` int32 CUDA tensor of KV lengths.
        num_heads_per_head_k: ``s_q * h_q // h_kv``, the q rows sharing one KV head.
        num_heads_k: ``h_kv``.
        split_overhead: per-request cost (in 64-token blocks) the scheduler charges.
        split_min_blocks: fewest work units (64-token blocks) one SM partition takes; above 1, short
            requests are cut into fewer, longer splits. Each of the two defaults to the tuned winner's
            policy for this head configuration and length hint, else the default variant's.
        seqlens_hint: the step's KV lengths as the host already knows them (a CPU tensor or list of the
            lengths, or one number: their mean), or None. Not read from ``cache_seqlens`` (that would be a
            host sync). The returned metadata carries it, so every ``flash_mla_with_kvcache`` call of the
            step that gets this metadata selects the kernel tuned for that length
            (:class:`flash_mla.workload_key.WorkloadKey`); without it, the winner tuned for calls of
            unknown length. A copy of the metadata into another tensor (e.g. a CUDA-graph buffer) does
            not carry the hint.

    Returns:
        ``tile_scheduler_metadata`` ``(num_sm_parts, 8)`` int32 and ``num_splits`` ``(batch_size + 1,)``
        int32, both on the device of ``cache_seqlens``. Computed with GPU ops: no host sync.
    """
    check_metadata_args(cache_seqlens, num_heads_per_head_k, num_heads_k, split_overhead, split_min_blocks)
    if not cache_seqlens.is_cuda:
        raise ValueError(f"cache_seqlens must be a CUDA tensor, got device {cache_seqlens.device}")
    mean_seqlen = mean_seqlen_hint(seqlens_hint)
    parts = scheduler.num_sm_parts(_num_sms(cache_seqlens.device.index or 0), num_heads_per_head_k, num_heads_k)
    policy = dispatch.split_policy_for(cache_seqlens.device.index or 0, num_heads_per_head_k, num_heads_k,
                                       cache_seqlens.shape[0], mean_seqlen)
    meta, splits = scheduler.schedule(
        cache_seqlens, parts, overhead=split_overhead if split_overhead is not None else policy.overhead,
        min_payload=split_min_blocks if split_min_blocks is not None else policy.min_blocks)
    setattr(meta, _HINT_ATTR, mean_seqlen)
    return meta, splits


def _check_kernel_layout(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor) -> None:
    # The kernel moves q rows with 16-byte loads and reads k_cache through a TMA descriptor, whose
    # strides must be multiples of 16 bytes.
    for name, t in (("q", q), ("k_cache", k_cache)):
        if any(s % 8 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            raise ValueError(f"{name} must be 16-byte aligned with strides that are multiples of 8 elements, "
                             f"got strides {tuple(t.stride())}")
    if block_table.stride(1) != 1:
        raise ValueError("block_table must be contiguous in its last dimension")


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int, tile_scheduler_metadata: torch.Tensor,
                           num_splits: torch.Tensor, softmax_scale: Optional[float] = None,
                           causal: bool = False, *, variant: Optional[Variant] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decoding attention.

    Args:
        q: ``(batch_size, seqlen_q, num_heads_q, 576)`` bf16/fp16.
        k_cache: ``(num_blocks, page_block_size, num_heads_k, 576)``; V is its first ``head_dim_v`` channels.
        block_table: ``(batch_size, max_num_blocks_per_seq)`` int32.
        cache_seqlens: ``(batch_size,)`` int32.
        head_dim_v: 512.
        tile_scheduler_metadata, num_splits: from :func:`get_mla_metadata` (the metadata carries its
            length hint, which picks the tuned kernel).
        softmax_scale: defaults to ``1 / sqrt(576)``.
        causal: causal mask aligned to the end of each sequence (matters when ``seqlen_q > 1``).
        variant: run this kernel variant instead of the selected one (benchmarks, tuning).

    Returns:
        ``out`` ``(batch_size, seqlen_q, num_heads_q, 512)`` in q's dtype and ``lse``
        ``(batch_size, num_heads_q, seqlen_q)`` float32.
    """
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(HEAD_DIM_K)
    check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                      softmax_scale, causal, supported_page_sizes=dispatch.SUPPORTED_PAGE_SIZES, require_cuda=True)
    _check_kernel_layout(q, k_cache, block_table)
    if values_check_enabled():
        check_values(k_cache, block_table, cache_seqlens)
    if variant is None:
        variant = dispatch.select_variant(q, k_cache, causal and q.shape[1] > 1,
                                          getattr(tile_scheduler_metadata, _HINT_ATTR, None))
    elif (variant.dtype, variant.page_size) != (dispatch.dtype_name(q.dtype), k_cache.shape[1]):
        raise ValueError(f"variant {variant.key} is built for {variant.dtype} with page size {variant.page_size}, "
                         f"got {q.dtype} with page size {k_cache.shape[1]}")
    lib = dispatch.library_for(variant)
    with torch.cuda.device(q.device):
        return runtime.run_decode(lib, q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata,
                                  num_splits, softmax_scale, causal)
