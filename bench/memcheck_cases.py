"""Small decode calls for ``compute-sanitizer`` (memcheck, racecheck, synccheck): zero-length requests,
h_q = 3, page size 32, causal MTP, split requests, more requests than partitions. Exits non-zero if an
output disagrees with the reference.

Usage: python bench/memcheck_cases.py [VARIANT_KEY]   (default: the variant the API selects; a key runs
that variant's knobs at each case's page size, or at its own where its knobs do not allow the case's, e.g. a
one-TMA tile load at page size 32; a float8-cache key gets the cases' caches quantised)
"""

import dataclasses
import sys

import torch

from flash_mla import flash_mla_with_kvcache, get_mla_metadata
from flash_mla.reference import mla_decode_reference
from flash_mla.codegen.variant import InvalidVariant, variants_by_key
from flash_mla.testing import compare, make_paged_kv, quantize_e4m3

variant = variants_by_key(sys.argv[1:2])[0] if len(sys.argv) > 1 else None

CASES = [  # b, s_q, h_q, h_kv, seqlens, page_size, causal
    (3, 1, 16, 1, [0, 130, 0], 64, False),
    (2, 2, 3, 1, [77, 300], 64, True),
    (4, 4, 64, 2, [5, 0, 1000, 64], 32, True),
    (20, 4, 128, 1, [1 + 37 * i for i in range(20)], 64, True),     # 8 m-blocks: 16 partitions < 20 requests
]

ok = True
for i, (b, s_q, h_q, h_kv, lens, page, causal) in enumerate(CASES):
    if variant is not None:
        try:
            v = dataclasses.replace(variant, page_size=page).validate()
        except InvalidVariant:  # knobs tied to the variant's page size: the case at that page size
            v, page = variant, variant.page_size
    else:
        v = None
    g = torch.Generator(device="cuda").manual_seed(i)
    q, k, bt, sl = make_paged_kv(b, s_q, h_q, h_kv, lens, page, torch.bfloat16, "cuda", g)
    meta, splits = get_mla_metadata(sl, s_q * h_q // h_kv, h_kv)
    scale = None
    if v is not None and v.kv_fp8:
        k, scale = quantize_e4m3(k)
    out, lse = flash_mla_with_kvcache(q, k, bt, sl, 512, meta, splits, causal=causal, variant=v, k_scale=scale)
    torch.cuda.synchronize()
    ref_out, ref_lse = mla_decode_reference(q, k, bt, sl, 512, causal=causal, k_scale=scale)
    m = compare(out, ref_out, lse, ref_lse, torch.bfloat16)
    print(f"case {i}: b={b} s_q={s_q} h_q={h_q} h_kv={h_kv} splits={int(splits[-1])} page={page} "
          f"variant={v.key if v else 'selected'} ok={m['ok']}")
    ok &= m["ok"]
sys.exit(0 if ok else 1)
