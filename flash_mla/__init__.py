"""flash_mla: autotuned, code-generated MLA decoding kernels for NVIDIA Hopper (SM90).

Importable without a GPU: the reference implementation and the code generator work anywhere; launching
a kernel needs an SM90 GPU.
"""

from .api import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata, warm_up
from . import ops  # noqa: F401  (registers torch.ops.flash_mla.mla_decode / mla_decode_out)
from .reference import mla_decode_reference

__version__ = "0.1.0"
__all__ = ["FlashMLASchedMeta", "flash_mla_with_kvcache", "warm_up", "get_mla_metadata", "mla_decode_reference", "__version__"]
