"""Choose the variant for a call and hand back its loaded library.

The tuning databases (user DB over shipped DB) pick the winner for the current GPU and the call's
workload key (shape and, when the caller gave one, length hint) by the rule of
:mod:`flash_mla.selection`; with no entry the documented default
variant runs and one warning says so. Lookups are cached per shape and read no tensor values, so the
CUDA-graph path stays a dict lookup.
"""

from __future__ import annotations

import functools
from typing import Optional

from . import runtime, selection
from .codegen.build import BuildError, build_one, cache_dir, find_built
from .codegen.variant import PAGE_SIZES, Variant, default_variant
from .scheduler import SplitPolicy
from .workload_key import NO_HINT, TORCH_DTYPE_NAMES, WorkloadKey, bucket_seqlen, problem_dtype

SUPPORTED_PAGE_SIZES = PAGE_SIZES


def dtype_name(dtype, kv_dtype=None) -> str:
    """The dtype name of variants and keys for q's dtype and the KV cache's (default: q's)."""
    return problem_dtype(dtype, kv_dtype)


@functools.lru_cache(maxsize=None)
def library_for(variant: Variant) -> runtime.Library:
    """Load the variant's library; cached per process. A library built from the variant's current source
    is taken from the disk cache without a compiler; only a missing one is built (nvcc and CUTLASS)."""
    art = find_built(variant)
    if art is None:
        if _capturing():
            raise BuildError(f"variant {variant.key} is not built and this call is inside CUDA-graph capture, where "
                             "a build (minutes of nvcc) cannot run: call flash_mla.warm_up(...) with the captured "
                             "calls' shapes before capturing, or build it first (flash-mla build --variants "
                             f"{variant.key})")
        try:
            art = build_one(variant)
        except BuildError as e:
            raise BuildError(f"variant {variant.key} has no built library in {cache_dir()} and cannot be built "
                             f"here ({e}); build it where nvcc is (flash-mla build --from-db, or "
                             f"--variants {variant.key}) and ship that cache") from e
    return runtime.load(art.library)


@functools.lru_cache(maxsize=1)
def schedule_variant() -> Variant:
    """The variant whose library's schedule kernel ``get_mla_metadata`` launches: the bf16 / page-64 default (every
    variant library carries the same kernel; the metadata call knows neither dtype nor page size). Cached: building
    and validating it took ~10 us of every get_mla_metadata call."""
    return default_variant("bf16", 64)


def schedule_library() -> runtime.Library:
    return library_for(schedule_variant())


def _capturing() -> bool:
    import torch
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def variant_for_key(device_index: int, key: WorkloadKey) -> Variant:
    """The tuned winner for a workload key on this device, else the default variant (no tensors needed)."""
    gpu, sms, cuda = selection.device_info(device_index)
    sel = selection.select(gpu, sms, cuda, key)
    return sel.variant if sel.variant is not None else default_variant(key.dtype, key.page_size)


def select_variant(q, k_cache, causal: bool, mean_seqlen: Optional[float] = None) -> Variant:
    """The tuned winner for this call's GPU, shape and length hint, else the default variant."""
    return variant_for_key(q.device.index or 0, selection.key_for_tensors(q, k_cache, causal, mean_seqlen))


def split_policy_for(device_index: int, num_heads_per_head_k: int, num_heads_k: int, batch: int,
                     mean_seqlen: Optional[float] = None) -> SplitPolicy:
    """The scheduler policy of the tuned winner for this head configuration, else the default's."""
    gpu, sms, cuda = selection.device_info(device_index)
    sk = NO_HINT if mean_seqlen is None else bucket_seqlen(mean_seqlen)
    tuned = selection.split_policy(gpu, sms, cuda, num_heads_per_head_k, num_heads_k, batch, sk)
    return tuned if tuned is not None else Variant().split_policy
