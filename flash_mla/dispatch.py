"""Choose the variant for a call and hand back its loaded library.

Selection today: the default variant for (dtype, page size). The tuning database plugs in here: a
lookup keyed by GPU and shape that falls back to the default, saying so once.
"""

from __future__ import annotations

import functools

from .codegen.build import build_one
from .codegen.variant import PAGE_SIZES, Variant, default_variant
from . import runtime

SUPPORTED_PAGE_SIZES = PAGE_SIZES
_DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}


def dtype_name(dtype) -> str:
    return _DTYPE_NAMES[str(dtype)]


@functools.lru_cache(maxsize=None)
def library_for(variant: Variant) -> runtime.Library:
    """Build (or take from the disk cache) and load the variant; cached per process."""
    return runtime.load(build_one(variant).library)


def select_variant(dtype, page_size: int) -> Variant:
    return default_variant(dtype_name(dtype), page_size)
