"""The workload key: the one home of the fields and buckets that name a tuned workload.

A :class:`WorkloadKey` is what the tuner tunes for, what a tuning database stores a winner under
(together with the GPU, SM count and CUDA version of the run) and what the runtime looks up for a call.
All three build it here, so a workload tuned by ``flash-mla tune`` and the call that serves it meet on
the same key.

Fields: dtype, ``h_q``, ``h_kv``, ``s_q``, page size, causal flag, ``batch_bucket`` and ``seqlen_bucket``.

- ``batch_bucket = bucket_batch(batch)``: the smallest power of two >= the batch size.
- ``seqlen_bucket = bucket_seqlen(mean KV length)``: the power of two nearest (in log scale) to the mean
  length of the step's requests, clamped to [64, 131072]. The mean is what the tuner's workloads are defined by
  (lengths drawn around ``mean_sk``).
- The runtime cannot read the lengths (they live on the GPU; reading them would be a host sync). A
  caller that holds them on the host (serving engines keep a CPU copy of the lengths, or their mean)
  passes them as the *length hint* of :func:`flash_mla.get_mla_metadata`. Without a hint the key's
  ``seqlen_bucket`` is :data:`NO_HINT`, and the call is served by the winner the tuner stores for
  "length unknown": the variant with the best geometric-mean time over the tuned lengths of that batch
  bucket. The block table's width (``max_model_len / page_size`` in engines) says nothing about the
  lengths and is not used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from .constants import HEAD_DIM, HEAD_DIM_V   # re-exported: the key's head dims

SEQLEN_BUCKET_MIN = 64
SEQLEN_BUCKET_MAX = 131072
#: ``seqlen_bucket`` of a call without a length hint, and of the winners stored for such calls.
NO_HINT = 0
#: The dtype names of keys and variants -> (q / output element, KV cache element). ``bf16_e4m3``: a float8
#: e4m3 KV cache (per-tensor dequantisation scale) with bf16 q and output.
DTYPE_ELEMENTS = {"bf16": ("bf16", "bf16"), "fp16": ("fp16", "fp16"), "bf16_e4m3": ("bf16", "e4m3")}
DTYPES = tuple(DTYPE_ELEMENTS)
_DTYPE_OF_ELEMENTS = {pair: name for name, pair in DTYPE_ELEMENTS.items()}
#: ``str(tensor.dtype)`` -> element name of :data:`DTYPE_ELEMENTS`.
TORCH_ELEMENT_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float8_e4m3fn": "e4m3"}
#: ``str(tensor.dtype)`` of q (with a KV cache of the same dtype) -> the dtype name of keys and variants.
TORCH_DTYPE_NAMES = {t: e for t, e in TORCH_ELEMENT_NAMES.items() if (e, e) in _DTYPE_OF_ELEMENTS}


def problem_dtype(q_dtype, kv_dtype=None) -> str:
    """The dtype name of a call from its q and KV cache dtypes (KV default: q's); KeyError if unsupported."""
    kv_dtype = q_dtype if kv_dtype is None else kv_dtype
    elems = (TORCH_ELEMENT_NAMES[str(q_dtype)], TORCH_ELEMENT_NAMES[str(kv_dtype)])
    if elems not in _DTYPE_OF_ELEMENTS:
        raise KeyError(f"no kernels for q {q_dtype} with a {kv_dtype} KV cache")
    return _DTYPE_OF_ELEMENTS[elems]


def bucket_batch(b: int) -> int:
    """Smallest power of two >= ``b`` (``b = 0`` -> 1)."""
    b = int(b)
    if b < 0:
        raise ValueError(f"batch must be >= 0, got {b}")
    return 1 if b <= 1 else 1 << (b - 1).bit_length()


def bucket_seqlen(s: float) -> int:
    """The power of two nearest to ``s`` in log scale, clamped to [64, 131072].

    A tuned length (the suites use powers of two) is the centre of its bucket, ``[L / sqrt 2, L sqrt 2)``,
    so a step whose mean length is drawn around it lands in the same bucket on either side of it.
    """
    s = max(float(s), 1.0)
    p = 1 << max(0, math.floor(math.log2(s) + 0.5))
    return min(max(p, SEQLEN_BUCKET_MIN), SEQLEN_BUCKET_MAX)


def mean_seqlen_hint(hint: Any) -> Optional[float]:
    """The mean KV length a length hint stands for, or None for no hint.

    ``hint`` is None, a number (a typical length of the step, e.g. the mean), a sequence of lengths, or a
    CPU tensor of lengths. A CUDA tensor is refused: reading it would synchronise with the GPU, which is
    what the hint exists to avoid.
    """
    if hint is None:
        return None
    if isinstance(hint, (bool, str, bytes)):
        raise TypeError(f"seqlens_hint must be a number, a sequence of lengths or a CPU tensor, "
                        f"got {type(hint).__name__}")
    if isinstance(hint, (int, float)):
        value = float(hint)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"seqlens_hint must be a finite length >= 0, got {hint!r}")
        return value
    if hasattr(hint, "device") and hasattr(hint, "tolist"):          # a torch tensor
        if hint.device.type != "cpu":
            raise ValueError(f"seqlens_hint must be on the host (a CPU tensor, list or number), got a tensor on "
                             f"{hint.device}: reading it would synchronise with the GPU")
        hint = hint.reshape(-1).tolist()
    try:
        values = [float(x) for x in hint]
    except TypeError:
        raise TypeError(f"seqlens_hint must be a number, a sequence of lengths or a CPU tensor, "
                        f"got {type(hint).__name__}") from None
    if not values:
        raise ValueError("seqlens_hint is empty")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError("seqlens_hint holds a negative or non-finite length")
    return sum(values) / len(values)


@dataclass(frozen=True)
class WorkloadKey:
    """The workload part of a tuning-DB key (the GPU, SM count and CUDA version come from the run)."""
    dtype: str
    h_q: int
    h_kv: int
    s_q: int
    page_size: int
    causal: bool
    batch_bucket: int
    seqlen_bucket: int          # NO_HINT: the lengths are unknown to the caller

    def __post_init__(self):
        if int(self.s_q) == 1 and self.causal:
            object.__setattr__(self, "causal", False)    # one query row per request: nothing to mask
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for f in ("h_q", "h_kv", "s_q", "page_size", "batch_bucket"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)!r}")
        if self.h_q % self.h_kv:
            raise ValueError(f"h_q ({self.h_q}) must be a multiple of h_kv ({self.h_kv})")
        if self.seqlen_bucket != NO_HINT and not SEQLEN_BUCKET_MIN <= self.seqlen_bucket <= SEQLEN_BUCKET_MAX:
            raise ValueError(f"seqlen_bucket must be {NO_HINT} (no hint) or in [{SEQLEN_BUCKET_MIN}, "
                             f"{SEQLEN_BUCKET_MAX}], got {self.seqlen_bucket}")

    @classmethod
    def for_call(cls, *, dtype: str, h_q: int, h_kv: int, s_q: int, page_size: int, causal: bool, batch: int,
                 mean_seqlen: Optional[float] = None) -> "WorkloadKey":
        """The key of a decode call: its shapes, and the mean KV length when the caller knows it."""
        return cls(dtype=dtype, h_q=int(h_q), h_kv=int(h_kv), s_q=int(s_q), page_size=int(page_size),
                   causal=bool(causal) and int(s_q) > 1, batch_bucket=bucket_batch(batch),
                   seqlen_bucket=NO_HINT if mean_seqlen is None else bucket_seqlen(mean_seqlen))

    @classmethod
    def from_row(cls, row: dict) -> "WorkloadKey":
        """The key of a trials / winners row."""
        return cls(dtype=row["dtype"], h_q=int(row["h_q"]), h_kv=int(row["h_kv"]), s_q=int(row["s_q"]),
                   page_size=int(row["page_size"]), causal=bool(row["causal"]),
                   batch_bucket=int(row["batch_bucket"]), seqlen_bucket=int(row["seqlen_bucket"]))

    @property
    def has_hint(self) -> bool:
        return self.seqlen_bucket != NO_HINT

    def without_hint(self) -> "WorkloadKey":
        return replace(self, seqlen_bucket=NO_HINT)

    @property
    def canonical(self) -> str:
        """Stable readable form, e.g. ``bf16_p64_hq128_hkv1_sq2_causal_b32_sk4096`` (``_sknohint`` without a hint)."""
        sk = "nohint" if self.seqlen_bucket == NO_HINT else str(self.seqlen_bucket)
        return (f"{self.dtype}_p{self.page_size}_hq{self.h_q}_hkv{self.h_kv}_sq{self.s_q}"
                f"{'_causal' if self.causal else ''}_b{self.batch_bucket}_sk{sk}")

    def db_fields(self) -> dict:
        """The key's columns in a tuning DB's trials / winners tables."""
        d = asdict(self)
        d["causal"] = int(self.causal)
        return {**d, "head_dim": HEAD_DIM, "head_dim_v": HEAD_DIM_V}

    def __str__(self) -> str:
        return self.canonical


__all__ = ["WorkloadKey", "NO_HINT", "TORCH_DTYPE_NAMES", "DTYPE_ELEMENTS", "problem_dtype", "bucket_batch", "bucket_seqlen", "mean_seqlen_hint", "HEAD_DIM",
           "HEAD_DIM_V", "SEQLEN_BUCKET_MIN", "SEQLEN_BUCKET_MAX"]
