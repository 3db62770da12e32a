"""Reference implementation of paged MLA decoding attention (plain torch, CPU or GPU).

This is the ground truth the generated kernels are checked against. It favours clarity and numerical
safety over speed: every request is handled on its own, its pages are gathered through the block table,
and only the first ``seqlen`` tokens ever take part in the computation, so whatever lies in unused pages
or in the tail of a request's last page (NaN in the tests) can never reach the result.

Semantics (identical to the FlashMLA decode API):

* ``q``: ``(b, s_q, h_q, d)``; ``k_cache``: ``(num_blocks, page_size, h_kv, d)``; V is the first
  ``head_dim_v`` channels of K. A float8 cache is dequantised first: value = stored value * ``k_scale``.
* query head ``h`` reads kv head ``h // (h_q // h_kv)``.
* ``softmax_scale`` defaults to ``1 / sqrt(d)`` with ``d = q.shape[-1]``.
* causal (only meaningful for ``s_q > 1``): query position ``s`` sees keys ``k < seqlen - (s_q - 1 - s)``,
  i.e. the mask is aligned to the end of the sequence.
* a row with no visible key (zero-length request, or a causal row that sees nothing) gives
  ``out = 0`` and ``lse = +inf``.
* ``out``: ``(b, s_q, h_q, head_dim_v)`` in ``q.dtype``; ``lse``: ``(b, h_q, s_q)`` float32, the natural log
  of the softmax denominator with the scale applied: ``lse = logsumexp(scale * q . k)``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch

__all__ = ["mla_decode_reference", "causal_visible_lengths"]


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Make float32 matmuls on CUDA use full IEEE precision (no TF32) for the duration of the block."""
    if device.type != "cuda":
        yield
        return
    backend = torch.backends.cuda.matmul
    if hasattr(backend, "fp32_precision"):
        saved = backend.fp32_precision
        backend.fp32_precision = "ieee"
        try:
            yield
        finally:
            backend.fp32_precision = saved
    else:  # older torch
        saved = backend.allow_tf32
        backend.allow_tf32 = False
        try:
            yield
        finally:
            backend.allow_tf32 = saved


def causal_visible_lengths(seqlen: int, s_q: int, causal: bool) -> list[int]:
    """Number of keys query position ``s`` (0-based) may attend to, for every ``s`` in ``range(s_q)``.

    Non-causal (or ``s_q == 1``): every position sees the whole sequence. Causal: position ``s`` sees
    ``max(0, seqlen - (s_q - 1 - s))`` keys.
    """
    seqlen = max(int(seqlen), 0)
    if not causal:
        return [seqlen] * s_q
    return [max(0, seqlen - (s_q - 1 - s)) for s in range(s_q)]


def mla_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int = 512,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    k_scale=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decode attention; returns ``(out, lse)`` (see the module docstring for the semantics).

    Computation runs in float32 (float64 when ``q`` is float64). ``cache_seqlens`` and ``block_table``
    are read on the host (this function synchronises; it is not meant for CUDA graphs). ``k_scale`` (a float
    or a one-element tensor; None = 1) multiplies the cache's values after their conversion to the compute
    precision (the dequantisation of a float8 cache).
    """
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(f"q and k_cache must be 4-D, got q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}")
    b, s_q, h_q, d = q.shape
    num_blocks, page_size, h_kv, d_k = k_cache.shape
    if d_k != d:
        raise ValueError(f"q head dim {d} != k_cache head dim {d_k}")
    if not 0 < head_dim_v <= d:
        raise ValueError(f"head_dim_v must be in 1..{d}, got {head_dim_v}")
    if h_kv < 1 or h_q % h_kv != 0:
        raise ValueError(f"h_q ({h_q}) must be a multiple of h_kv ({h_kv})")
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table must be (b={b}, max_blocks), got {tuple(block_table.shape)}")
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != b:
        raise ValueError(f"cache_seqlens must be (b={b},), got {tuple(cache_seqlens.shape)}")

    group = h_q // h_kv
    dev = q.device
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)

    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=cdtype, device=dev)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float32, device=dev)

    ks = 1.0 if k_scale is None else float(k_scale.item() if isinstance(k_scale, torch.Tensor) else k_scale)
    # float8 tensors are gathered as bytes (index_select has no float8 kernels everywhere)
    fp8 = k_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    k_src = k_cache.view(torch.uint8) if fp8 else k_cache
    seqlens = [int(x) for x in cache_seqlens.tolist()]
    bt = block_table.to(device=k_cache.device, dtype=torch.long)

    with _ieee_fp32_matmul(dev):
        for i in range(b):
            seqlen = seqlens[i]
            if seqlen <= 0:
                continue  # no key at all: out stays 0, lse stays +inf
            n_pages = -(-seqlen // page_size)
            if n_pages > bt.shape[1]:
                raise ValueError(f"request {i}: seqlen {seqlen} needs {n_pages} pages, "
                                 f"block_table has {bt.shape[1]} columns")
            pages = bt[i, :n_pages]
            # Gather only the valid pages, then keep only the first `seqlen` tokens (drops the tail).
            kv = k_src.index_select(0, pages).reshape(n_pages * page_size, h_kv, d)[:seqlen]
            if fp8:
                kv = kv.view(k_cache.dtype)
            kv = kv.to(device=dev, dtype=cdtype).permute(1, 0, 2)                   # (h_kv, L, d)
            if ks != 1.0:
                kv = kv * ks
            v = kv[..., :head_dim_v]                                                 # (h_kv, L, dv)
            # Rows of one kv head: (s, g) flattened, s-major.
            qi = q[i].to(cdtype).reshape(s_q, h_kv, group, d).permute(1, 0, 2, 3)    # (h_kv, s_q, g, d)
            qi = qi.reshape(h_kv, s_q * group, d)
            scores = torch.bmm(qi, kv.transpose(1, 2)) * scale                       # (h_kv, s_q*g, L)

            visible = causal_visible_lengths(seqlen, s_q, causal)
            if min(visible) < seqlen:
                key_idx = torch.arange(seqlen, device=dev)
                limit = torch.tensor(visible, device=dev).repeat_interleave(group)   # (s_q*g,)
                masked = key_idx.unsqueeze(0) >= limit.unsqueeze(1)                  # (s_q*g, L)
                scores = scores.masked_fill(masked.unsqueeze(0), -math.inf)

            row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)                  # -inf on empty rows
            empty = torch.isneginf(row_lse)
            probs = torch.exp(scores - torch.where(empty, torch.zeros_like(row_lse), row_lse))
            probs = torch.where(empty, torch.zeros_like(probs), probs)               # exp(-inf) = 0 already
            o = torch.bmm(probs, v)                                                  # (h_kv, s_q*g, dv)
            row_lse = torch.where(empty, torch.full_like(row_lse, math.inf), row_lse)

            o = o.reshape(h_kv, s_q, group, head_dim_v).permute(1, 0, 2, 3).reshape(s_q, h_q, head_dim_v)
            out[i] = o
            lse[i] = row_lse.reshape(h_kv, s_q, group).permute(0, 2, 1).reshape(h_q, s_q).to(torch.float32)

    return out.to(q.dtype), lse
