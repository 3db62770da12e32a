"""The decode step as registered torch operators, so that ``torch.compile(fullgraph=True)`` traces it without a
graph break.

``torch.ops.flash_mla.mla_decode(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
softmax_scale=None, causal=False, seqlen_hint=None, k_scale=None, k_scale_value=1.0) -> (out, lse)``
    FlashMLA's classic call on the tensors ``get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)``
    returns. ``seqlen_hint`` is the mean KV length the tuned selection keys on (``get_mla_metadata`` keeps it
    on its metadata tensor, which an operator cannot see): pass the same value given there, or None.
    ``k_scale`` (a one-element float32 tensor) and ``k_scale_value``: a float8_e4m3fn cache's dequantisation
    scale, their product (value = stored value * k_scale_value * k_scale[0]).
``torch.ops.flash_mla.mla_decode_out(..., out, lse, softmax_scale=None, causal=False, seqlen_hint=None,
k_scale=None, k_scale_value=1.0)``
    the same into caller-owned ``out`` ``(b, s_q, h_q, 512)`` (q's dtype) and ``lse`` ``(b, h_q, s_q)``
    float32, both contiguous; returns nothing.

Where the C++ launcher is built (:mod:`flash_mla.launcher`, the default) the schemas and the CUDA kernels are
defined in C++, so a call reaches the launch without a Python frame once its signature has been validated.
Otherwise (``FLASH_MLA_LAUNCHER=python``, or no C++ compiler) the same schemas are defined here as Python
custom operators whose body is :func:`flash_mla.api.decode`. Either way this module registers the fake (meta)
implementations giving the output shapes and dtypes, so the operators trace under FakeTensor,
``torch.export`` and ``torch.compile``. The kernels are registered for CUDA only.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import launcher
from .constants import HEAD_DIM_V

NAMESPACE = "flash_mla"
# "cpp" when the C++ launcher defines the operators, "python" when this module does
IMPLEMENTATION = "cpp" if launcher.module() is not None else "python"

if IMPLEMENTATION == "python":
    @torch.library.custom_op(f"{NAMESPACE}::mla_decode", mutates_args=(), device_types="cuda")
    def mla_decode(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                   tile_scheduler_metadata: torch.Tensor, num_splits: torch.Tensor,
                   softmax_scale: Optional[float] = None, causal: bool = False,
                   seqlen_hint: Optional[float] = None, k_scale: Optional[torch.Tensor] = None,
                   k_scale_value: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        from .api import decode
        return decode(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, tile_scheduler_metadata, num_splits,
                      softmax_scale, causal, seqlen_hint=seqlen_hint, k_scale=k_scale, k_scale_value=k_scale_value)

    @torch.library.custom_op(f"{NAMESPACE}::mla_decode_out", mutates_args=("out", "lse"), device_types="cuda")
    def mla_decode_out(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                       cache_seqlens: torch.Tensor, tile_scheduler_metadata: torch.Tensor, num_splits: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, softmax_scale: Optional[float] = None,
                       causal: bool = False, seqlen_hint: Optional[float] = None,
                       k_scale: Optional[torch.Tensor] = None, k_scale_value: float = 1.0) -> None:
        from .api import decode
        decode(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, tile_scheduler_metadata, num_splits,
               softmax_scale, causal, seqlen_hint=seqlen_hint, out=out, lse=lse, k_scale=k_scale,
               k_scale_value=k_scale_value)


@torch.library.register_fake(f"{NAMESPACE}::mla_decode")
def _mla_decode_fake(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                     softmax_scale=None, causal=False, seqlen_hint=None, k_scale=None, k_scale_value=1.0):
    b, s_q, h_q, _ = _fake_check(q)
    return q.new_empty((b, s_q, h_q, HEAD_DIM_V)), q.new_empty((b, h_q, s_q), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::mla_decode_out")
def _mla_decode_out_fake(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, out, lse,
                         softmax_scale=None, causal=False, seqlen_hint=None, k_scale=None, k_scale_value=1.0):
    b, s_q, h_q, _ = _fake_check(q)
    if tuple(out.shape) != (b, s_q, h_q, HEAD_DIM_V) or tuple(lse.shape) != (b, h_q, s_q):
        raise ValueError(f"out must be {(b, s_q, h_q, HEAD_DIM_V)} and lse {(b, h_q, s_q)}, got "
                         f"{tuple(out.shape)} and {tuple(lse.shape)}")
    return None


def _fake_check(q):
    if q.dim() != 4:
        raise ValueError(f"q must be (batch_size, seqlen_q, num_heads_q, head_dim), got shape {tuple(q.shape)}")
    return q.shape
