"""Public API, with FlashMLA's signatures, shapes and dtypes."""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from typing import Optional, Tuple, Union

import torch

from . import dispatch, launcher, runtime, scheduler
from .constants import HEAD_DIM_V
from .codegen.variant import Variant
from .workload_key import mean_seqlen_hint
from .validation import (HEAD_DIM_K, _require_rank, _require_tensor, check_decode_args, check_k_scale,
                         check_metadata_args, check_split_policy_args, check_values, values_check_enabled)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# A schedule object's keep() for the C++ launcher's resolver, which runs prepare() in this thread.
_pending = threading.local()

# Attribute of the returned tile_scheduler_metadata tensor that carries the length hint to the decode calls.
_HINT_ATTR = "_flash_mla_mean_seqlen"


@dataclasses.dataclass
class FlashMLASchedMeta:
    """The schedule object of FlashMLA's current interface: ``get_mla_metadata()`` (no arguments) returns an
    empty one, and the first ``flash_mla_with_kvcache`` call given it computes the split-KV schedule from
    that call's ``cache_seqlens`` and shapes (one kernel launch, no host sync) and stores it here.

    Later calls with the same object reuse that schedule, so one object serves every layer of a decode
    step. Their shapes and flags must equal the first call's (checked: a mismatch is a ValueError naming
    the field); their lengths are not checked (that would be a host sync), so make a new object whenever
    ``cache_seqlens`` changes, as with FlashMLA.
    """

    @dataclasses.dataclass(frozen=True)
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool

    have_initialized: bool = False
    config: Optional[Config] = None
    tile_scheduler_metadata: Optional[torch.Tensor] = None   # (num_sm_parts, 8) int32
    num_splits: Optional[torch.Tensor] = None                # (batch_size + 1,) int32
    # get_mla_metadata's keyword arguments, applied when the schedule is computed.
    split_overhead: Optional[int] = None
    split_min_blocks: Optional[int] = None
    seqlens_hint: object = None
    # (cache_seqlens, tile_scheduler_metadata, num_splits) computed by the classic call whose metadata tensor
    # carries this object (see get_mla_metadata): taken as the schedule by a first call outside CUDA-graph
    # capture with the same cache_seqlens tensor, instead of computing it again.
    precomputed: Optional[tuple] = dataclasses.field(default=None, repr=False, compare=False)


# Attribute of the classic tile_scheduler_metadata tensor holding a FlashMLASchedMeta for callers that pass the
# tensor alone (num_splits=None), as engines written for FlashMLA's current interface do.
_SCHED_ATTR = "_flash_mla_sched"


def get_mla_metadata(cache_seqlens: Optional[torch.Tensor] = None, num_heads_per_head_k: Optional[int] = None,
                     num_heads_k: Optional[int] = None, num_heads_q: Optional[int] = None,
                     is_fp8_kvcache: bool = False, topk: Optional[int] = None, *,
                     split_overhead: Optional[int] = None, split_min_blocks: Optional[int] = None, seqlens_hint=None
                     ) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[FlashMLASchedMeta, None]]:
    """Split-KV schedule for a decode step.

    Two forms, as FlashMLA has had them:

    - ``get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)`` (the classic interface)
      computes the schedule now and returns ``(tile_scheduler_metadata, num_splits)``.
    - ``get_mla_metadata()`` (FlashMLA's current interface) returns ``(FlashMLASchedMeta(), None)``; the
      first decode call given that object computes the schedule (the keyword arguments below are kept
      in the object and apply then).

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

        num_heads_q, is_fp8_kvcache, topk: FlashMLA's arguments of the same names. ``num_heads_q`` and
            ``is_fp8_kvcache`` are not needed for dense decoding (the schedule is the same for a float8 cache);
            ``topk`` (sparse attention) raises NotImplementedError.

    Returns:
        ``tile_scheduler_metadata`` ``(num_sm_parts, 8)`` int32 and ``num_splits`` ``(batch_size + 1,)``
        int32, both on the device of ``cache_seqlens``. Computed by one kernel launch (templates/kernels/
        schedule.cuh, in every variant library; the bf16 / page-64 default's is used): no host sync.

        Engines written for FlashMLA's current interface call this form too but keep only the first element
        and pass it with ``num_splits=None`` (vLLM's FlashMLA backend does). The metadata tensor therefore
        carries a :class:`FlashMLASchedMeta`, and a decode call given the tensor alone uses it: the first such
        call takes these tensors as the schedule when it runs eagerly on the same ``cache_seqlens`` tensor,
        and computes the schedule again inside CUDA-graph capture (so that a replayed graph schedules from
        the lengths of its replay, not from those seen here); later calls reuse it.
    """
    if not isinstance(is_fp8_kvcache, bool):
        raise TypeError(f"is_fp8_kvcache must be a bool, got {type(is_fp8_kvcache).__name__}")
    if topk is not None:
        raise NotImplementedError("topk is not supported: it belongs to sparse attention")
    if num_heads_q is not None:
        from .validation import _require_int
        _require_int("num_heads_q", num_heads_q)
    given = [n for n, v in (("cache_seqlens", cache_seqlens), ("num_heads_per_head_k", num_heads_per_head_k),
                            ("num_heads_k", num_heads_k)) if v is not None]
    if not given:
        check_split_policy_args(split_overhead, split_min_blocks)
        mean_seqlen_hint(seqlens_hint)                      # a bad hint fails here, not at the first call
        return FlashMLASchedMeta(split_overhead=split_overhead, split_min_blocks=split_min_blocks,
                                 seqlens_hint=seqlens_hint), None
    if len(given) != 3:
        missing = [n for n in ("cache_seqlens", "num_heads_per_head_k", "num_heads_k") if n not in given]
        raise TypeError(f"get_mla_metadata: {', '.join(missing)} missing; pass cache_seqlens, num_heads_per_head_k "
                        "and num_heads_k (classic interface) or none of them (schedule object)")
    check_metadata_args(cache_seqlens, num_heads_per_head_k, num_heads_k, split_overhead, split_min_blocks)
    if not cache_seqlens.is_cuda:
        raise ValueError(f"cache_seqlens must be a CUDA tensor, got device {cache_seqlens.device}")
    mean_seqlen = mean_seqlen_hint(seqlens_hint)
    parts = scheduler.num_sm_parts(_num_sms(cache_seqlens.device.index or 0), num_heads_per_head_k, num_heads_k)
    if split_overhead is None or split_min_blocks is None:     # the tuned policy fills what the caller left
        policy = dispatch.split_policy_for(cache_seqlens.device.index or 0, num_heads_per_head_k, num_heads_k,
                                           cache_seqlens.shape[0], mean_seqlen)
        split_overhead = policy.overhead if split_overhead is None else split_overhead
        split_min_blocks = policy.min_blocks if split_min_blocks is None else split_min_blocks
    # One kernel (templates/kernels/schedule.cuh), bit-identical to scheduler.schedule, the specification.
    meta, splits = dispatch.schedule_library().schedule(cache_seqlens, parts, split_overhead, split_min_blocks)
    setattr(meta, _HINT_ATTR, mean_seqlen)
    setattr(meta, _SCHED_ATTR, FlashMLASchedMeta(split_overhead=split_overhead, split_min_blocks=split_min_blocks,
                                                 seqlens_hint=seqlens_hint,
                                                 precomputed=(cache_seqlens, meta, splits)))
    return meta, splits


def warm_up(*, num_heads_q: int, num_heads_k: int = 1, seqlen_q: int = 1, dtype: torch.dtype = torch.bfloat16,
            page_block_size: int = 64, causal: bool = False, batch_sizes=(1,), seqlens_hint=None,
            device=None, kv_dtype: Optional[torch.dtype] = None) -> list:
    """Select, build if needed and load the kernels that decode calls of these shapes will run, before
    CUDA-graph capture (so that no selection, build or library load happens inside it; an engine
    capturing one graph per batch size passes them all).

    Args:
        num_heads_q, num_heads_k, seqlen_q, dtype, page_block_size, causal: the calls' q heads, KV heads,
            query tokens per request, dtype, page size and causality.
        batch_sizes: the batch sizes the calls will have.
        seqlens_hint: the length hint the calls' metadata will carry (as for :func:`get_mla_metadata`),
            or None; calls without a hint are prepared in either case.
        device: the CUDA device (default: the current one).
        kv_dtype: the KV cache's dtype where it differs from ``dtype`` (``torch.float8_e4m3fn``), else None.

    Returns:
        The keys of the variants loaded, one per distinct variant (the first: the variant whose library runs
        get_mla_metadata's schedule kernel).
    """
    from .validation import _require_int
    from .workload_key import WorkloadKey
    for name, v in (("num_heads_q", num_heads_q), ("num_heads_k", num_heads_k), ("seqlen_q", seqlen_q),
                    ("page_block_size", page_block_size)):
        _require_int(name, v)
    if num_heads_q % num_heads_k:
        raise ValueError(f"num_heads_q ({num_heads_q}) must be a multiple of num_heads_k ({num_heads_k})")
    if str(dtype) not in dispatch.TORCH_DTYPE_NAMES:
        raise TypeError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    if kv_dtype is not None and kv_dtype not in (dtype, torch.float8_e4m3fn):
        raise TypeError(f"kv_dtype must be None (q's dtype) or torch.float8_e4m3fn, got {kv_dtype}")
    if kv_dtype == torch.float8_e4m3fn and dtype != torch.bfloat16:
        raise TypeError(f"dtype must be torch.bfloat16 with a float8_e4m3fn KV cache, got {dtype}")
    if page_block_size not in dispatch.SUPPORTED_PAGE_SIZES:
        raise ValueError(f"page_block_size must be one of {dispatch.SUPPORTED_PAGE_SIZES}, got {page_block_size}")
    sizes = [_require_int("batch_sizes", b) for b in batch_sizes]
    means = [None] + ([mean_seqlen_hint(seqlens_hint)] if seqlens_hint is not None else [])
    index = torch.device(device if device is not None else "cuda").index
    index = torch.cuda.current_device() if index is None else index
    loaded = {}
    sv = dispatch.schedule_variant()                # the library of get_mla_metadata's schedule kernel
    loaded[sv.key] = dispatch.library_for(sv)
    for b in sizes:
        for mean in means:
            key = WorkloadKey.for_call(dtype=dispatch.dtype_name(dtype, kv_dtype), h_q=num_heads_q, h_kv=num_heads_k,
                                       s_q=seqlen_q, page_size=page_block_size, causal=causal, batch=b,
                                       mean_seqlen=mean)
            v = dispatch.variant_for_key(index, key)
            if v.key not in loaded:
                loaded[v.key] = dispatch.library_for(v)
            dispatch.split_policy_for(index, seqlen_q * num_heads_q // num_heads_k, num_heads_k, b, mean)
    return list(loaded)


def _check_kernel_layout(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    # The kernel moves q rows with 16-byte loads and reads k_cache through a TMA descriptor, whose
    # strides must be multiples of 16 bytes.
    for name, t in (("q", q), ("k_cache", k_cache)):
        per16 = 16 // t.element_size()
        if any(s % per16 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            raise ValueError(f"{name} must be 16-byte aligned with strides that are multiples of {per16} elements, "
                             f"got strides {tuple(t.stride())}")


# FlashMLA's sparse / attention-sink / batch-invariant arguments: accepted by name so that a caller of its
# current interface gets one clear error per argument it actually uses, not a TypeError on the signature.
_NOT_SUPPORTED = {
    "indices": "sparse attention (indices) is not supported: this package decodes dense MLA",
    "attn_sink": "attention sinks (attn_sink) are not supported",
    "extra_k_cache": "an extra KV cache (extra_k_cache) is not supported: it belongs to sparse attention",
    "extra_indices_in_kvcache": "extra_indices_in_kvcache is not supported: it belongs to sparse attention",
    "topk_length": "topk_length is not supported: it belongs to sparse attention",
    "extra_topk_length": "extra_topk_length is not supported: it belongs to sparse attention",
}


def _reject_unsupported(enable_batch_invariant, **optional) -> None:
    for name, value in optional.items():
        if value is not None:
            raise NotImplementedError(f"{name}: {_NOT_SUPPORTED[name]}")
    if enable_batch_invariant:
        raise NotImplementedError("enable_batch_invariant=True is not supported: requests are split across SMs "
                                  "by batch-dependent schedules")


def _schedule_from(sched: FlashMLASchedMeta, q, k_cache, cache_seqlens, causal: bool):
    """``(tile_scheduler_metadata, num_splits, keep)`` for a schedule object: its tensors when it is filled
    (the call's configuration must equal the one that filled it), else a schedule computed now; ``keep()``
    stores that in the object, called once the whole call has passed validation."""
    _require_rank("q", _require_tensor("q", q), 4, "(batch_size, seqlen_q, num_heads_q, head_dim)")
    _require_rank("k_cache", _require_tensor("k_cache", k_cache), 4,
                  "(num_blocks, page_block_size, num_heads_k, head_dim)")
    cfg = FlashMLASchedMeta.Config(b=q.shape[0], s_q=q.shape[1], h_q=q.shape[2], page_block_size=k_cache.shape[1],
                                   h_k=k_cache.shape[2], causal=bool(causal),
                                   is_fp8_kvcache=k_cache.dtype == torch.float8_e4m3fn)
    if sched.have_initialized:
        if sched.config != cfg:
            diff = [f"{f.name} {getattr(sched.config, f.name)} -> {getattr(cfg, f.name)}"
                    for f in dataclasses.fields(cfg) if getattr(sched.config, f.name) != getattr(cfg, f.name)]
            raise ValueError("tile_scheduler_metadata: this FlashMLASchedMeta was filled by a call with another "
                             f"configuration ({', '.join(diff)}); use a new get_mla_metadata() object for it")
        return sched.tile_scheduler_metadata, sched.num_splits, lambda: None
    if cache_seqlens is None:
        raise ValueError("cache_seqlens must be the (batch_size,) int32 KV lengths: dense decoding schedules "
                         "from them at the first call of a FlashMLASchedMeta")
    if cfg.h_k < 1 or cfg.h_q % cfg.h_k:
        raise ValueError(f"q: num_heads_q ({cfg.h_q}) must be a multiple of k_cache's num_heads_k ({cfg.h_k})")
    pre = sched.precomputed
    rows = cfg.s_q * cfg.h_q // cfg.h_k
    if (pre is not None and pre[0] is cache_seqlens and pre[1].shape[0] == scheduler.num_sm_parts(
            _num_sms(cache_seqlens.device.index or 0), rows, cfg.h_k) and not dispatch._capturing()):
        meta, splits = pre[1], pre[2]           # computed by get_mla_metadata from these very lengths
    else:
        meta, splits = get_mla_metadata(cache_seqlens, rows, cfg.h_k, split_overhead=sched.split_overhead,
                                        split_min_blocks=sched.split_min_blocks, seqlens_hint=sched.seqlens_hint)

    def keep():
        sched.tile_scheduler_metadata, sched.num_splits, sched.config = meta, splits, cfg
        sched.have_initialized = True
        sched.precomputed = None
    return meta, splits, keep


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int,
                           tile_scheduler_metadata: Union[torch.Tensor, FlashMLASchedMeta],
                           num_splits: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
                           causal: bool = False, is_fp8_kvcache: bool = False, indices=None, attn_sink=None,
                           extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None,
                           extra_topk_length=None, enable_batch_invariant: bool = False,
                           *, k_scale: Union[float, torch.Tensor, None] = None,
                           variant: Optional[Variant] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decoding attention.

    Args:
        q: ``(batch_size, seqlen_q, num_heads_q, 576)`` bf16/fp16.
        k_cache: ``(num_blocks, page_block_size, num_heads_k, 576)`` in q's dtype, or float8_e4m3fn with bf16
            q (dequantised as stored value * ``k_scale``); V is its first ``head_dim_v`` channels.
        block_table: ``(batch_size, max_num_blocks_per_seq)`` int32.
        cache_seqlens: ``(batch_size,)`` int32.
        head_dim_v: 512.
        tile_scheduler_metadata, num_splits: from :func:`get_mla_metadata`: the classic pair of tensors
            (the metadata carries its length hint, which picks the tuned kernel), or a
            :class:`FlashMLASchedMeta` with ``num_splits=None`` (filled by its first call, see there).
        softmax_scale: defaults to ``1 / sqrt(576)``.
        causal: causal mask aligned to the end of each sequence (matters when ``seqlen_q > 1``).
        is_fp8_kvcache: True is accepted with a float8_e4m3fn ``k_cache`` (the dtype says it already); with any
            other cache (FlashMLA's packed 656-byte FP8 layout of sparse decoding among them) it raises
            NotImplementedError.
        indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length,
            enable_batch_invariant: FlashMLA's arguments for sparse decoding; each raises NotImplementedError
            naming itself when used (not None / True).
        k_scale: a float8 cache's per-tensor dequantisation scale (vLLM's convention: value = stored value *
            k_scale): a float, or a one-element float32 tensor on q's device (read by the kernel, so a
            CUDA graph sees later changes to it); None means 1. Only with a float8_e4m3fn ``k_cache``.
        variant: run this kernel variant instead of the selected one (benchmarks, tuning).

    Returns:
        ``out`` ``(batch_size, seqlen_q, num_heads_q, 512)`` in q's dtype and ``lse``
        ``(batch_size, num_heads_q, seqlen_q)`` float32.
    """
    if is_fp8_kvcache and getattr(k_cache, "dtype", None) != torch.float8_e4m3fn:
        raise NotImplementedError(
            "is_fp8_kvcache=True: k_cache must be a float8_e4m3fn tensor (b, page, h_kv, 576) with a per-tensor "
            f"k_scale; got {getattr(k_cache, 'dtype', type(k_cache).__name__)} (FlashMLA's packed 656-byte FP8 "
            "layout of sparse decoding is not supported)")
    if isinstance(k_scale, torch.Tensor):
        k_scale_value = 1.0
    else:
        k_scale, k_scale_value = None, (1.0 if k_scale is None else k_scale)
    if (enable_batch_invariant or indices is not None or attn_sink is not None
            or extra_k_cache is not None or extra_indices_in_kvcache is not None or topk_length is not None
            or extra_topk_length is not None):
        _reject_unsupported(enable_batch_invariant, indices=indices, attn_sink=attn_sink,
                            extra_k_cache=extra_k_cache, extra_indices_in_kvcache=extra_indices_in_kvcache,
                            topk_length=topk_length, extra_topk_length=extra_topk_length)
    if isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        if num_splits is not None:
            raise ValueError("num_splits must be None when tile_scheduler_metadata is a FlashMLASchedMeta "
                             "(the object holds the split counts)")
        tile_scheduler_metadata, num_splits, keep = _schedule_from(tile_scheduler_metadata, q, k_cache,
                                                                   cache_seqlens, causal)
    elif num_splits is None:
        sched = getattr(tile_scheduler_metadata, _SCHED_ATTR, None)
        if sched is None:
            raise TypeError("num_splits must be the tensor returned with tile_scheduler_metadata by "
                            "get_mla_metadata(cache_seqlens, ...); None goes with a FlashMLASchedMeta or with the "
                            "metadata tensor get_mla_metadata returned (not a copy of it)")
        # FlashMLA's current interface called with the classic arguments: the tensor's schedule object
        tile_scheduler_metadata, num_splits, keep = _schedule_from(sched, q, k_cache, cache_seqlens, causal)
    else:
        keep = None
    hint = getattr(tile_scheduler_metadata, _HINT_ATTR, None)
    fast = launcher.module() if variant is None else None
    if not (fast is not None and head_dim_v == HEAD_DIM_V and (causal is True or causal is False)
            and (softmax_scale is None or type(softmax_scale) is float) and type(k_scale_value) in (float, int)
            and (k_scale is None or type(k_scale) is torch.Tensor)
            and all(type(t) is torch.Tensor for t in (q, k_cache, block_table, cache_seqlens,
                                                      tile_scheduler_metadata, num_splits))):
        # anything the C++ entry does not take goes the Python way
        return decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                      softmax_scale, causal, variant=variant, seqlen_hint=hint, on_valid=keep, k_scale=k_scale,
                      k_scale_value=k_scale_value)
    _pending.keep = keep                        # run by prepare() if this signature is new (see there)
    try:
        out, lse = fast.decode(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                               softmax_scale, causal, hint, k_scale=k_scale, k_scale_value=float(k_scale_value))
    finally:
        keep, _pending.keep = _pending.keep, None
    if keep is not None:                        # a known signature: validated when it was first seen
        keep()
    return out, lse


def _check_out(name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    _require_tensor(name, t)
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {shape} on {device}, got "
                         f"{'a contiguous' if t.is_contiguous() else 'a non-contiguous'} {t.dtype} tensor of shape "
                         f"{tuple(t.shape)} on {t.device}")


def prepare(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, softmax_scale=None,
            causal=False, *, head_dim_v: int = HEAD_DIM_V, variant: Optional[Variant] = None, seqlen_hint=None,
            out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None, on_valid=None,
            k_scale: Optional[torch.Tensor] = None, k_scale_value: float = 1.0):
    """Validate a decode call, select its variant and load that variant's library: everything but the launch.
    Returns ``(library, softmax_scale)``. The Python path runs this on every call; the C++ launcher
    (:mod:`flash_mla.launcher`) once per call signature. ``on_valid()`` (default: the one
    :func:`flash_mla_with_kvcache` left for this thread's C++ call) runs once every argument has passed
    validation."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(HEAD_DIM_K)
    check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                      softmax_scale, causal, supported_page_sizes=dispatch.SUPPORTED_PAGE_SIZES, require_cuda=True)
    _check_kernel_layout(q, k_cache)
    check_k_scale(k_cache, q, k_scale, k_scale_value)
    b, s_q, h_q, _ = q.shape
    if out is not None:
        _check_out("out", out, (b, s_q, h_q, head_dim_v), q.dtype, q.device)
    if lse is not None:
        _check_out("lse", lse, (b, h_q, s_q), torch.float32, q.device)
    if on_valid is None:
        on_valid, _pending.keep = getattr(_pending, "keep", None), None
    if on_valid is not None:                    # e.g. a schedule object keeps its schedule once the call is valid
        on_valid()
    if values_check_enabled():
        check_values(k_cache, block_table, cache_seqlens)
    if variant is None:
        variant = dispatch.select_variant(q, k_cache, causal and q.shape[1] > 1, seqlen_hint)
    elif (variant.dtype, variant.page_size) != (dispatch.dtype_name(q.dtype, k_cache.dtype), k_cache.shape[1]):
        raise ValueError(f"variant {variant.key} is built for {variant.dtype} with page size {variant.page_size}, "
                         f"got q {q.dtype} and k_cache {k_cache.dtype} with page size {k_cache.shape[1]}")
    return dispatch.library_for(variant), softmax_scale


def decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
           softmax_scale=None, causal=False, *, variant: Optional[Variant] = None, seqlen_hint=None,
           out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None, on_valid=None,
           k_scale: Optional[torch.Tensor] = None, k_scale_value: float = 1.0):
    """Validate, select and launch in Python (the body of the registered ops where the C++ launcher is not
    built, and of :func:`flash_mla_with_kvcache` with ``variant=``): classic metadata tensors, an optional
    length hint, optional output buffers (``out`` ``(b, s_q, h_q, 512)`` in q's dtype, ``lse``
    ``(b, h_q, s_q)`` float32, both contiguous)."""
    lib, softmax_scale = prepare(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                                 softmax_scale, causal, head_dim_v=head_dim_v, variant=variant,
                                 seqlen_hint=seqlen_hint, out=out, lse=lse, on_valid=on_valid, k_scale=k_scale,
                                 k_scale_value=k_scale_value)
    with torch.cuda.device(q.device):
        return runtime.run_decode(lib, q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata,
                                  num_splits, softmax_scale, causal, out=out, lse=lse, k_scale=k_scale,
                                  k_scale_value=k_scale_value)
