"""Serving start-up where no compiler is: the variant binaries come from the cache ``flash-mla build --from-db``
filled; nvcc and CUTLASS are made unreachable (``bench/device_peers.sh coldstart`` runs this with no CUDA
toolkit on PATH, ``$FLASH_MLA_CUDA_HOME`` and ``$FLASH_MLA_CUTLASS_INCLUDE`` pointing at empty folders, so a
build attempt fails loudly). Times the import, ``warm_up`` and the first decode call of a bf16 and a float8
cache, and checks both outputs against the reference. Exits non-zero on a mismatch.
"""

import shutil
import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402

t1 = time.perf_counter()
import flash_mla  # noqa: E402
from flash_mla import flash_mla_with_kvcache, get_mla_metadata, warm_up  # noqa: E402
from flash_mla.reference import mla_decode_reference  # noqa: E402
from flash_mla.testing import compare, make_paged_kv, quantize_e4m3  # noqa: E402

t2 = time.perf_counter()
print(f"nvcc on PATH: {shutil.which('nvcc')}; launcher: {flash_mla.ops.IMPLEMENTATION}")
print(f"import torch {t1 - t0:.2f} s, import flash_mla {t2 - t1:.2f} s")
ok = True
for kv in (None, torch.float8_e4m3fn):
    name = "bf16" if kv is None else "bf16 q + e4m3 cache"
    t = time.perf_counter()
    keys = warm_up(num_heads_q=16, num_heads_k=1, dtype=torch.bfloat16, batch_sizes=(1, 8, 64), kv_dtype=kv)
    torch.cuda.synchronize()
    tw = time.perf_counter() - t
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, bt, sl = make_paged_kv(8, 1, 16, 1, [1000 + 300 * i for i in range(8)], 64, torch.bfloat16, "cuda", g)
    scale = None
    if kv is not None:
        k, scale = quantize_e4m3(k)
    t = time.perf_counter()
    meta, splits = get_mla_metadata(sl, 16, 1)
    out, lse = flash_mla_with_kvcache(q, k, bt, sl, 512, meta, splits, k_scale=scale)
    torch.cuda.synchronize()
    tc = time.perf_counter() - t
    ref_out, ref_lse = mla_decode_reference(q, k, bt, sl, 512, k_scale=scale)
    m = compare(out, ref_out, lse, ref_lse, torch.bfloat16)
    ok &= m["ok"]
    print(f"{name}: warm_up {tw:.2f} s ({', '.join(keys)}), first call {tc * 1e3:.1f} ms, matches reference: {m['ok']}")
sys.exit(0 if ok else 1)
