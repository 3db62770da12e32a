"""A length past the block table's capacity, run under ``compute-sanitizer --tool memcheck``.

Default mode: values are never read on the host, so the kernel walks past the block table (the sanitizer
reports the out-of-bounds reads). With ``FLASH_MLA_CHECK_VALUES=1`` the call raises a clear ValueError
before any launch (exit code 3). Run with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its
own allocation: a read past a tensor inside one of the caching allocator's segments is invisible to the
sanitizer.
"""

import sys

import torch

from flash_mla import flash_mla_with_kvcache, get_mla_metadata
from flash_mla.testing import make_paged_kv

g = torch.Generator(device="cuda").manual_seed(0)
q, k, bt, sl = make_paged_kv(1, 1, 16, 1, [200], 64, torch.bfloat16, "cuda", g, extra_table_cols=0)
sl[0] = bt.shape[1] * 64 + 10 * 64                # ten pages past the table's four
meta, splits = get_mla_metadata(sl, 16, 1)
try:
    out, lse = flash_mla_with_kvcache(q, k, bt, sl, 512, meta, splits)
    torch.cuda.synchronize()
    print(f"decode ran on length {int(sl[0])} with a block table of {bt.shape[1]} pages (no value check)")
except ValueError as e:
    print(f"value check: {e}")
    sys.exit(3)
