"""The torch reference against an independent float64 formulation, plus the test-data helpers."""

from __future__ import annotations

import math
import random

import pytest
import torch

from flash_mla.reference import causal_visible_lengths, mla_decode_reference
from flash_mla.testing import compare, make_paged_kv, tolerances_for, varlen_seqlens

D, DV = 576, 512


def loop_reference(q, k_cache, block_table, cache_seqlens, dv, scale, causal):
    """Per request, per query position, per head; tokens fetched one at a time; float64 softmax."""
    b, s_q, h_q, _ = q.shape
    page_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    group = h_q // h_kv
    out = torch.zeros(b, s_q, h_q, dv, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        seqlen = int(cache_seqlens[i])
        if seqlen == 0:
            continue
        toks = []
        for t in range(seqlen):
            page = int(block_table[i, t // page_size])
            toks.append(k_cache[page, t % page_size].to(torch.float64))   # (h_kv, d)
        keys = torch.stack(toks)                                          # (seqlen, h_kv, d)
        for s in range(s_q):
            n = seqlen - (s_q - 1 - s) if causal else seqlen
            if n <= 0:
                continue
            for h in range(h_q):
                kh = keys[:n, h // group]
                logits = (kh @ q[i, s, h].to(torch.float64)) * scale
                m = logits.max()
                w = torch.exp(logits - m)
                denom = w.sum()
                out[i, s, h] = (w / denom) @ kh[:, :dv]
                lse[i, h, s] = m + torch.log(denom)
    return out, lse


def _cases():
    """A seeded selection from FlashMLA's correctness matrix, sized for a CPU."""
    rng = random.Random(20251122)
    cases = []
    heads = [1, 3, 9, 63, 64, 126, 128]
    while len(cases) < 36:
        b = rng.choice([1, 2, 6])
        s_q = rng.choice([1, 2, 4])
        h_q = rng.choice(heads)
        h_kv = rng.choice([x for x in (1, 2, 3, 8) if h_q % x == 0])
        s_k = rng.choice([20, 140, 333])
        varlen = rng.random() < 0.5
        causal = rng.random() < 0.5
        page = rng.choice([64, 32])
        dtype = rng.choice([torch.bfloat16, torch.float16])
        if b * s_q * h_q > 3072:           # keep the float64 loop short
            continue
        cases.append((b, s_q, h_q, h_kv, s_k, varlen, causal, page, dtype))
    # fixed coverage: MQA with 128 heads, GQA h_kv=8, s_q=4 causal, page 32 at a page boundary
    cases += [
        (2, 1, 128, 1, 140, True, False, 64, torch.bfloat16),
        (1, 4, 64, 8, 140, False, True, 32, torch.float16),
        (2, 2, 126, 2, 128, False, True, 64, torch.bfloat16),
        (6, 4, 3, 3, 20, True, True, 32, torch.bfloat16),
    ]
    return cases


def _id(c):
    b, s_q, h_q, h_kv, s_k, varlen, causal, page, dtype = c
    return (f"b{b}-sq{s_q}-hq{h_q}-hkv{h_kv}-sk{s_k}-{'var' if varlen else 'fix'}-"
            f"{'causal' if causal else 'full'}-p{page}-{str(dtype).split('.')[-1]}")


def _seqlens(b, s_k, s_q, varlen, seed):
    if not varlen:
        return [s_k] * b
    lens = varlen_seqlens(b, s_k, s_q, torch.Generator().manual_seed(seed))
    if b > 1 and seed % 2:
        lens[seed % b] = 0                                      # a zero-length request in the batch
    return lens


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_matches_loop_reference(case):
    b, s_q, h_q, h_kv, s_k, varlen, causal, page, dtype = case
    seed = sum(map(ord, _id(case)))                           # stable across processes
    lens = _seqlens(b, s_k, s_q, varlen, seed)
    q, k_cache, block_table, cache_seqlens = make_paged_kv(
        b, s_q, h_q, h_kv, lens, page, dtype, "cpu", torch.Generator().manual_seed(seed))
    scale = D ** -0.5
    want_out, want_lse = loop_reference(q, k_cache, block_table, cache_seqlens, DV, scale, causal)

    # float64 inputs: the vectorised reference must agree with the loop to rounding.
    out64, lse64 = mla_decode_reference(q.double(), k_cache.double(), block_table, cache_seqlens, DV,
                                        None, causal)
    assert out64.dtype == torch.float64 and lse64.dtype == torch.float32
    torch.testing.assert_close(out64, want_out, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(lse64, want_lse.float(), atol=1e-5, rtol=1e-6)

    # native dtype: float32 accumulation, output rounded to the input dtype.
    out, lse = mla_decode_reference(q, k_cache, block_table, cache_seqlens, DV, None, causal)
    assert out.shape == (b, s_q, h_q, DV) and out.dtype == dtype
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    m = compare(out, want_out, lse, want_lse, dtype)
    assert m["ok"], m


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("page", [64, 32])
def test_zero_length_sequences(causal, page):
    lens = [0, 37, 0, 64, 0]
    b, s_q, h_q, h_kv = len(lens), 2, 9, 3
    q, k_cache, block_table, cache_seqlens = make_paged_kv(
        b, s_q, h_q, h_kv, lens, page, torch.bfloat16, "cpu", torch.Generator().manual_seed(7))
    out, lse = mla_decode_reference(q, k_cache, block_table, cache_seqlens, DV, causal=causal)
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.all(out[i] == 0)
            assert torch.all(torch.isposinf(lse[i]))
        else:
            assert torch.isfinite(out[i].float()).all() and torch.isfinite(lse[i]).all()
    want_out, want_lse = loop_reference(q, k_cache, block_table, cache_seqlens, DV, D ** -0.5, causal)
    assert compare(out, want_out, lse, want_lse)["ok"]


def test_all_zero_lengths():
    q, k_cache, block_table, cache_seqlens = make_paged_kv(
        3, 1, 4, 1, [0, 0, 0], 64, torch.float16, "cpu", torch.Generator().manual_seed(1))
    out, lse = mla_decode_reference(q, k_cache, block_table, cache_seqlens)
    assert out.shape == (3, 1, 4, DV) and out.dtype == torch.float16
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse))


def test_causal_rows_without_visible_keys():
    # seqlen 2 < s_q 4: positions 0 and 1 see nothing (out 0, lse +inf), 2 sees one key, 3 sees two.
    s_q, h_q = 4, 2
    q, k_cache, block_table, cache_seqlens = make_paged_kv(
        1, s_q, h_q, 1, [2], 64, torch.bfloat16, "cpu", torch.Generator().manual_seed(3))
    out, lse = mla_decode_reference(q, k_cache, block_table, cache_seqlens, causal=True)
    assert causal_visible_lengths(2, s_q, True) == [0, 0, 1, 2]
    assert torch.all(out[0, :2] == 0) and torch.all(torch.isposinf(lse[0, :, :2]))
    # one visible key: output is that key's V, lse is its scaled logit
    k0 = k_cache[int(block_table[0, 0]), 0, 0].float()
    torch.testing.assert_close(out[0, 2].float(), k0[:DV].expand(h_q, DV).bfloat16().float())
    want = (q[0, 2].float() @ k0) * D ** -0.5
    torch.testing.assert_close(lse[0, :, 2], want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lse[0, :, 3]).all()


def test_causal_is_noop_for_single_query():
    data = make_paged_kv(2, 1, 16, 1, [50, 200], 64, torch.bfloat16, "cpu", torch.Generator().manual_seed(4))
    a = mla_decode_reference(*data, causal=False)
    c = mla_decode_reference(*data, causal=True)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


def test_causal_mask_aligned_to_end():
    # the last query position sees the whole sequence: equal to the non-causal result there
    data = make_paged_kv(2, 3, 8, 2, [70, 129], 32, torch.float16, "cpu", torch.Generator().manual_seed(5))
    oc, lc = mla_decode_reference(*data, causal=True)
    of, lf = mla_decode_reference(*data, causal=False)
    torch.testing.assert_close(oc[:, -1], of[:, -1])
    torch.testing.assert_close(lc[..., -1], lf[..., -1], atol=1e-6, rtol=1e-6)
    assert not torch.equal(oc[:, 0], of[:, 0])
    # position s of a causal call equals a non-causal call on the sequence cut to seqlen - (s_q-1-s)
    q, k_cache, block_table, cache_seqlens = data
    cut = cache_seqlens - 2
    o0, l0 = mla_decode_reference(q[:, :1].contiguous(), k_cache, block_table, cut)
    torch.testing.assert_close(oc[:, 0], o0[:, 0])
    torch.testing.assert_close(lc[..., 0], l0[..., 0], atol=1e-6, rtol=1e-6)


def test_lse_semantics_and_default_scale():
    b, s_q, h_q, h_kv = 2, 1, 4, 1
    lens = [45, 100]
    data = make_paged_kv(b, s_q, h_q, h_kv, lens, 64, torch.bfloat16, "cpu", torch.Generator().manual_seed(6))
    q, k_cache, block_table, cache_seqlens = data
    out, lse = mla_decode_reference(*data)
    out_s, lse_s = mla_decode_reference(*data, softmax_scale=1 / math.sqrt(576))
    assert torch.equal(out, out_s) and torch.equal(lse, lse_s)
    out_o, lse_o = mla_decode_reference(*data, softmax_scale=1 / math.sqrt(512))
    assert not torch.equal(lse, lse_o)
    for scale, o_got, l_got in ((D ** -0.5, out, lse), (0.3, *mla_decode_reference(*data, softmax_scale=0.3))):
        for i, n in enumerate(lens):
            pages = block_table[i, : -(-n // 64)].long()
            keys = k_cache[pages].reshape(-1, D)[:n].double()         # h_kv = 1
            logits = q[i, 0].double() @ keys.T * scale                 # (h_q, n)
            torch.testing.assert_close(l_got[i, :, 0].double(), torch.logsumexp(logits, -1),
                                       atol=1e-5, rtol=1e-6)
            o = torch.softmax(logits, -1) @ keys[:, :DV]
            torch.testing.assert_close(o_got[i, 0].double(), o, atol=1e-2, rtol=2 / 128)


def test_nan_in_unused_pages_never_leaks():
    lens = [1, 63, 64, 65, 130]
    b, s_q, h_q, h_kv = len(lens), 2, 6, 2
    q, k_cache, block_table, cache_seqlens = make_paged_kv(
        b, s_q, h_q, h_kv, lens, 64, torch.bfloat16, "cpu", torch.Generator().manual_seed(8),
        extra_table_cols=3)
    # the fixture really is poisoned: tails and every unused table entry are NaN pages
    for i, n in enumerate(lens):
        used = -(-n // 64)
        if n % 64:
            assert torch.isnan(k_cache[int(block_table[i, used - 1]), n % 64:]).all()
        assert not torch.isnan(k_cache[block_table[i, :used].long()].reshape(-1, h_kv, D)[:n]).any()
        for j in range(used, block_table.shape[1]):
            assert torch.isnan(k_cache[int(block_table[i, j])]).all()
    for causal in (False, True):
        out, lse = mla_decode_reference(q, k_cache, block_table, cache_seqlens, causal=causal)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_nan_free_values_unchanged_by_poison():
    """Replacing the NaN poison with other garbage leaves the result bit-identical."""
    lens = [10, 100, 0]
    q, k_cache, block_table, cache_seqlens = make_paged_kv(
        3, 1, 8, 1, lens, 32, torch.bfloat16, "cpu", torch.Generator().manual_seed(9))
    a = mla_decode_reference(q, k_cache, block_table, cache_seqlens)
    garbage = torch.nan_to_num(k_cache, nan=1e4)
    b = mla_decode_reference(q, garbage, block_table, cache_seqlens)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_head_mapping_gqa():
    """Query head h reads kv head h // (h_q // h_kv): heads of one group see the same keys."""
    b, s_q, h_q, h_kv = 1, 1, 6, 3
    q, k_cache, block_table, cache_seqlens = make_paged_kv(
        b, s_q, h_q, h_kv, [50], 64, torch.float16, "cpu", torch.Generator().manual_seed(10))
    q = q.clone()
    q[0, 0, 1] = q[0, 0, 0]          # heads 0 and 1 share kv head 0
    q[0, 0, 2] = q[0, 0, 0]          # head 2 reads kv head 1
    out, lse = mla_decode_reference(q, k_cache, block_table, cache_seqlens)
    assert torch.equal(out[0, 0, 0], out[0, 0, 1]) and torch.equal(lse[0, 0], lse[0, 1])
    assert not torch.equal(out[0, 0, 0], out[0, 0, 2])


def test_float32_inputs_and_head_dim_v():
    data = make_paged_kv(2, 1, 4, 1, [33, 90], 64, torch.float32, "cpu", torch.Generator().manual_seed(11))
    out, lse = mla_decode_reference(*data)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 4, 512)
    out2, lse2 = mla_decode_reference(*data, head_dim_v=576)
    assert out2.shape == (2, 1, 4, 576)
    torch.testing.assert_close(out2[..., :512], out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse2, lse, atol=0, rtol=0)


# ---------------------------------------------------------------- helpers of flash_mla.testing

def test_make_paged_kv_deterministic_and_well_formed():
    lens = varlen_seqlens(6, 140, 2, torch.Generator().manual_seed(12))
    a = make_paged_kv(6, 2, 16, 2, lens, 32, torch.bfloat16, "cpu", torch.Generator().manual_seed(13))
    b = make_paged_kv(6, 2, 16, 2, lens, 32, torch.bfloat16, "cpu", torch.Generator().manual_seed(13))
    for x, y in zip(a, b):
        assert torch.equal(x.nan_to_num(), y.nan_to_num())
    q, k_cache, block_table, cache_seqlens = a
    assert q.shape == (6, 2, 16, D) and q.dtype == torch.bfloat16 and (q != 0).all()
    assert k_cache.shape[1:] == (32, 2, D)
    assert block_table.dtype == torch.int32 and cache_seqlens.dtype == torch.int32
    assert cache_seqlens.tolist() == lens
    used = [block_table[i, : -(-n // 32)].tolist() for i, n in enumerate(lens)]
    flat = [p for row in used for p in row]
    assert len(flat) == len(set(flat)), "a page is shared between requests"
    assert all(0 <= p < k_cache.shape[0] for p in block_table.flatten().tolist())
    assert k_cache.shape[0] > len(flat), "no spare pages"
    assert sorted(flat) != list(range(len(flat))), "block table is not permuted"


def test_varlen_seqlens():
    lens = varlen_seqlens(1000, 200, 4, torch.Generator().manual_seed(14))
    assert len(lens) == 1000 and min(lens) >= 4 and all(isinstance(x, int) for x in lens)
    assert 180 < sum(lens) / len(lens) < 220
    assert lens == varlen_seqlens(1000, 200, 4, torch.Generator().manual_seed(14))
    assert min(varlen_seqlens(100, 10, 7, 0)) >= 7


def test_compare():
    g = torch.Generator().manual_seed(15)
    ref = torch.randn(2, 1, 4, DV, generator=g)
    lse_ref = torch.randn(2, 4, 1, generator=g) + 5
    lse_ref[0, 0, 0] = math.inf
    m = compare(ref.bfloat16(), ref, lse_ref.clone(), lse_ref, torch.bfloat16)
    assert m["ok"] and m["lse_max_abs"] == 0 and m["out_cos_diff"] < 1e-5
    assert m["tolerances"] == tolerances_for(torch.bfloat16)
    bad = ref.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert not compare(bad, ref, lse_ref, lse_ref, torch.float32)["ok"]
    bad_lse = lse_ref.clone()
    bad_lse[0, 0, 0] = 3.0                                  # finite where the reference is +inf
    m = compare(ref, ref, bad_lse, lse_ref, torch.float32)
    assert not m["ok"] and m["lse_nonfinite"] == 1
    off = ref.clone()
    off[1, 0, 2, 7] += 0.5
    m = compare(off, ref, lse_ref, lse_ref, torch.bfloat16)
    assert not m["ok"] and m["out_mismatches"] == 1 and abs(m["out_max_abs"] - 0.5) < 1e-6


def test_compare_lse_near_zero():
    """An lse near 0 is the difference of two float32 terms of the size of the largest score: its error is
    theirs (H100, every variant: 7.6e-6 at 0.0165), within the absolute bound; 10x that bound still fails, and
    away from 0 the relative bound governs."""
    out = torch.zeros(1, 1, 2, DV)
    lse_ref = torch.tensor([[[0.0165], [8.0]]]).reshape(1, 2, 1)
    near = lse_ref.clone()
    near[0, 0, 0] += 7.6e-6
    assert compare(out.bfloat16(), out, near, lse_ref, torch.bfloat16)["ok"]
    far = lse_ref.clone()
    far[0, 0, 0] += 1e-3
    m = compare(out.bfloat16(), out, far, lse_ref, torch.bfloat16)
    assert not m["ok"] and m["lse_mismatches"] == 1
    big = lse_ref.clone()
    big[0, 1, 0] += 8.0 * 8 / 65536 * 2                     # twice the relative bound at lse = 8
    assert compare(out.bfloat16(), out, big, lse_ref, torch.bfloat16)["lse_mismatches"] == 1
    big[0, 1, 0] = 8.0 + 8.0 * 8 / 65536 / 2
    assert compare(out.bfloat16(), out, big, lse_ref, torch.bfloat16)["ok"]


@pytest.mark.gpu
def test_reference_cuda_matches_cpu():
    lens = [0, 77, 300]
    cpu = make_paged_kv(3, 2, 64, 1, lens, 64, torch.bfloat16, "cpu", torch.Generator().manual_seed(16))
    gpu = make_paged_kv(3, 2, 64, 1, lens, 64, torch.bfloat16, "cuda", torch.Generator().manual_seed(16))
    for x, y in zip(cpu, gpu):
        assert torch.equal(x.nan_to_num(), y.cpu().nan_to_num())
    oc, lc = mla_decode_reference(*cpu, causal=True)
    og, lg = mla_decode_reference(*gpu, causal=True)
    assert og.is_cuda and lg.is_cuda
    assert compare(og.cpu(), oc.float(), lg.cpu(), lc, torch.bfloat16)["ok"]
