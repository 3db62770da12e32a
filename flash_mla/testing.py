"""Test-data builders and result comparison shared by the tests, the tuner and the benchmark.

Everything here is device-agnostic and deterministic for a given ``torch.Generator``: random numbers
are drawn on the generator's device (a CPU generator gives the same data whatever ``device`` is asked
for) and the result is then moved to ``device``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch

__all__ = [
    "HEAD_DIM_K", "HEAD_DIM_V", "TOLERANCES", "PagedKV",
    "make_paged_kv", "varlen_seqlens", "compare", "tolerances_for", "quantize_e4m3", "E4M3_MAX",
]

from .constants import HEAD_DIM as HEAD_DIM_K, HEAD_DIM_V

# Tolerances of the decode kernel against the float32 reference, read as FlashMLA's own tests read them:
# an element passes when it is within the absolute OR the relative tolerance (|x - ref| <= abs, or
# |x - ref| <= rel * (|ref| + 1e-6)), and the cosine difference of the whole tensor must be <= cos.
# float16 uses FlashMLA's bf16 figures (its 3 extra mantissa bits keep the rounded P within them).
TOLERANCES = {
    # bf16: P enters the tensor-core P V product in bf16 (unit roundoff 2^-9, as in every SM90 MLA
    # kernel), which alone moves an output by up to 2^-9 * max|V| (~1e-2 for unit-normal V on short
    # sequences), plus one rounding of out itself. The cosine bound stays as tight as for fp16.
    # lse: the kernel forms it in float32 as (max score + log of the row sum), two terms as large as the largest
    # scaled score (~5-10 for unit-normal data) that cancel where the row's lse is near 0; its absolute error is
    # that of those terms (H100: 7.6e-6 at lse = 0.0165, s_q = 2 causal, s_k = 3072, every variant and the
    # default alike), so the absolute bound is set by them (1e-4, ~100 float32 ulps at 8), not by 1e-6. Away
    # from 0 the relative bound governs (8 / 65536 of |lse|: 1e-3 at lse = 8).
    torch.bfloat16: dict(out_abs=2e-2, out_rel=2 / 128, out_cos=5e-6, lse_abs=1e-4, lse_rel=8 / 65536),
    torch.float16: dict(out_abs=8e-4, out_rel=2 / 128, out_cos=5e-6, lse_abs=1e-4, lse_rel=8 / 65536),
    torch.float32: dict(out_abs=1e-5, out_rel=1e-4, out_cos=1e-9, lse_abs=1e-6, lse_rel=1e-5),
    torch.float64: dict(out_abs=1e-10, out_rel=1e-9, out_cos=1e-15, lse_abs=1e-6, lse_rel=1e-6),
}

GeneratorLike = Union[torch.Generator, int, None]


def _as_generator(generator: GeneratorLike) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator()
    g.manual_seed(0 if generator is None else int(generator))
    return g


class PagedKV(NamedTuple):
    """Inputs of one decode call. Unpacks as ``q, k_cache, block_table, cache_seqlens = data``."""

    q: torch.Tensor              # (b, s_q, h_q, d), randn
    k_cache: torch.Tensor        # (num_blocks, page_size, h_kv, d); unused pages and tails are NaN
    block_table: torch.Tensor    # (b, max_blocks) int32; unused entries point at NaN-filled spare pages
    cache_seqlens: torch.Tensor  # (b,) int32


def varlen_seqlens(b: int, mean_sk: int, s_q: int = 1, generator: GeneratorLike = None) -> list[int]:
    """``b`` sequence lengths drawn from normal(mean_sk, mean_sk / 2), rounded, at least ``s_q``."""
    g = _as_generator(generator)
    x = torch.randn(b, generator=g, dtype=torch.float64, device=g.device).cpu()
    lens = (x * (mean_sk / 2) + mean_sk).round().clamp_min(s_q)
    return [int(v) for v in lens.tolist()]


def make_paged_kv(
    b: int,
    s_q: int,
    h_q: int,
    h_kv: int,
    seqlens: Union[Sequence[int], torch.Tensor],
    page_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    device: Union[str, torch.device] = "cpu",
    generator: GeneratorLike = None,
    *,
    head_dim: int = HEAD_DIM_K,
    spare_blocks: Optional[int] = None,
    extra_table_cols: int = 1,
    nan_fill: bool = True,
) -> PagedKV:
    """Random paged-KV decode inputs.

    * ``q`` and the valid part of ``k_cache`` are standard normal (never zero).
    * The ``ceil(seqlen_i / page_size)`` pages of every request are scattered over the cache through a
      random permutation; ``spare_blocks`` more pages (default: a quarter of the used ones, at least 2)
      are never referenced by a valid entry.
    * With ``nan_fill`` (default) spare pages and the tail of every request's last page are NaN, so a
      kernel or reference that reads past ``seqlen`` gives NaN.
    * ``block_table`` has ``max_i ceil(seqlen_i / page_size) + extra_table_cols`` columns; the entries
      past each request's pages hold random indices of spare (NaN) pages: valid addresses, poisoned data.
    """
    g = _as_generator(generator)
    gdev = g.device
    if isinstance(seqlens, torch.Tensor):
        seqlens = [int(x) for x in seqlens.tolist()]
    seqlens = [int(x) for x in seqlens]
    if len(seqlens) != b:
        raise ValueError(f"seqlens has {len(seqlens)} entries, expected b={b}")
    if any(x < 0 for x in seqlens):
        raise ValueError(f"seqlens must be >= 0, got {seqlens}")
    if h_kv < 1 or h_q % h_kv:
        raise ValueError(f"h_q ({h_q}) must be a multiple of h_kv ({h_kv})")

    pages = [-(-x // page_size) for x in seqlens]
    used = sum(pages)
    spare = max(2, used // 4) if spare_blocks is None else int(spare_blocks)
    if spare < 1:
        raise ValueError("spare_blocks must be >= 1 (unused block-table entries point at spare pages)")
    num_blocks = used + spare
    max_pages = max(pages, default=0) + int(extra_table_cols)
    max_pages = max(max_pages, 1)

    q = torch.randn(b, s_q, h_q, head_dim, generator=g, device=gdev, dtype=dtype)
    k_cache = torch.randn(num_blocks, page_size, h_kv, head_dim, generator=g, device=gdev, dtype=dtype)

    perm = torch.randperm(num_blocks, generator=g, device=gdev).to(torch.int32)
    spare_ids = perm[used:]
    pick = torch.randint(0, spare, (b, max_pages), generator=g, device=gdev)
    block_table = spare_ids[pick].to(torch.int32)                     # poison everywhere first
    offset = 0
    for i, n in enumerate(pages):
        block_table[i, :n] = perm[offset:offset + n]
        offset += n

    if nan_fill:
        nan = float("nan")
        k_cache[spare_ids.long()] = nan
        offset = 0
        for x, n in zip(seqlens, pages):
            if n and x % page_size:
                k_cache[int(perm[offset + n - 1]), x % page_size:] = nan
            offset += n

    device = torch.device(device)
    return PagedKV(
        q=q.to(device),
        k_cache=k_cache.to(device),
        block_table=block_table.to(device).contiguous(),
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32).to(device),
    )


E4M3_MAX = 448.0     # largest finite float8 e4m3fn value


def quantize_e4m3(k_cache: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-tensor float8 e4m3 quantisation, as serving engines store an FP8 KV cache: ``scale`` = largest finite
    magnitude / 448, stored value = value / scale rounded to the nearest e4m3 (NaN stays NaN). Returns
    ``(stored float8_e4m3fn tensor, scale)``; the dequantised cache is ``stored.float() * scale``.

    A float8 cache is checked with the tolerances of bf16: the kernel widens the stored values to bf16
    exactly (every e4m3 value is a bf16 value) and applies ``scale`` in float32, so the only roundings are
    those of the bf16 path, against a reference that dequantises first."""
    # In slices of 2^26 elements, so that a cache of tens of GB needs no float32 copy of itself.
    flat, step = k_cache.reshape(-1), 1 << 26
    amax = 0.0
    for i in range(0, flat.numel(), step):
        c = flat[i:i + step].abs()
        amax = max(amax, float(torch.where(torch.isfinite(c), c, torch.zeros_like(c)).max()))
    scale = amax / E4M3_MAX if amax > 0 else 1.0
    out = torch.empty(flat.shape, dtype=torch.float8_e4m3fn, device=k_cache.device)
    for i in range(0, flat.numel(), step):
        out[i:i + step] = (flat[i:i + step].float() / scale).to(torch.float8_e4m3fn)
    return out.view(k_cache.shape), scale


def tolerances_for(dtype: torch.dtype) -> dict:
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerances for dtype {dtype}")
    return dict(TOLERANCES[dtype])


def _close_metrics(x: torch.Tensor, y: torch.Tensor, abs_tol: float, rel_tol: float, prefix: str,
                   inf_equal: bool) -> dict:
    x = x.detach().to(dtype=torch.float64)
    y = y.detach().to(device=x.device, dtype=torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"{prefix}: shape {tuple(x.shape)} != reference shape {tuple(y.shape)}")
    same_inf = torch.isinf(x) & torch.isinf(y) & (torch.sign(x) == torch.sign(y)) if inf_equal \
        else torch.zeros_like(x, dtype=torch.bool)
    both_finite = torch.isfinite(x) & torch.isfinite(y)
    bad_nonfinite = ~(both_finite | same_inf)                 # NaN anywhere, or an unmatched inf
    diff = torch.where(both_finite, (x - y).abs(), torch.zeros_like(x))
    ref_abs = torch.where(both_finite, y.abs(), torch.zeros_like(y))
    rel = diff / ref_abs.clamp_min(1e-30)
    rel = torch.where(diff == 0, torch.zeros_like(rel), rel)
    mismatch = ((diff > abs_tol) & (diff > rel_tol * (ref_abs + 1e-6))) | bad_nonfinite
    n_bad_nonfinite = int(bad_nonfinite.sum())
    return {
        f"{prefix}_max_abs": math.inf if n_bad_nonfinite else (float(diff.max()) if diff.numel() else 0.0),
        f"{prefix}_max_rel": math.inf if n_bad_nonfinite else (float(rel.max()) if rel.numel() else 0.0),
        f"{prefix}_mismatches": int(mismatch.sum()),
        f"{prefix}_nonfinite": n_bad_nonfinite,
    }


def _cos_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2 <x, y> / (|x|^2 + |y|^2)``: 0 for identical tensors, insensitive to tensor size."""
    x = x.detach().to(dtype=torch.float64).flatten()
    y = y.detach().to(device=x.device, dtype=torch.float64).flatten()
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return math.inf
    denom = float((x * x).sum() + (y * y).sum())
    if denom == 0.0:
        return 0.0
    return max(0.0, 1.0 - 2.0 * float((x * y).sum()) / denom)


def compare(out: torch.Tensor, ref: torch.Tensor, lse: torch.Tensor, lse_ref: torch.Tensor,
            dtype: Optional[torch.dtype] = None) -> dict:
    """Compare a kernel's ``(out, lse)`` with the reference's; returns metrics and a verdict.

    ``dtype`` picks the tolerances (default: ``out.dtype``). Keys: ``out_max_abs``, ``out_max_rel``,
    ``out_mismatches``, ``out_nonfinite``, ``out_cos_diff``, ``lse_max_abs``, ``lse_max_rel``,
    ``lse_mismatches``, ``lse_nonfinite``, ``tolerances`` (the dict used) and ``ok`` (bool).
    In ``lse``, +inf (a row without keys) equals +inf; any NaN, or an inf on one side only, fails.
    """
    tol = tolerances_for(dtype if dtype is not None else out.dtype)
    m = {}
    m.update(_close_metrics(out, ref, tol["out_abs"], tol["out_rel"], "out", inf_equal=False))
    m["out_cos_diff"] = _cos_diff(out, ref)
    m.update(_close_metrics(lse, lse_ref, tol["lse_abs"], tol["lse_rel"], "lse", inf_equal=True))
    m["tolerances"] = tol
    m["ok"] = (m["out_mismatches"] == 0 and m["out_cos_diff"] <= tol["out_cos"]
               and m["lse_mismatches"] == 0)
    return m
