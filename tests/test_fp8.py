"""The float8 e4m3 KV cache on the CPU: its dtype name through keys and variants, the variant's constraints, the
quantisation helper and the dequantising reference, the scale's checks and the API's FP8 arguments."""

from __future__ import annotations

import math

import pytest
import torch

from flash_mla import flash_mla_with_kvcache, get_mla_metadata
from flash_mla.codegen.render import render
from flash_mla.codegen.variant import SMEM_LIMIT, InvalidVariant, Variant, default_variant, search_space
from flash_mla.reference import mla_decode_reference
from flash_mla.testing import E4M3_MAX, make_paged_kv, quantize_e4m3
from flash_mla.validation import check_k_scale
from flash_mla.workload_key import WorkloadKey, problem_dtype

FP8 = "bf16_e4m3"


def test_dtype_names():
    assert problem_dtype(torch.bfloat16) == "bf16" and problem_dtype(torch.float16, torch.float16) == "fp16"
    assert problem_dtype(torch.bfloat16, torch.float8_e4m3fn) == FP8
    with pytest.raises(KeyError):
        problem_dtype(torch.float16, torch.float8_e4m3fn)
    key = WorkloadKey.for_call(dtype=FP8, h_q=16, h_kv=1, s_q=1, page_size=64, causal=False, batch=8)
    assert key.dtype == FP8 and key.canonical.startswith(FP8 + "_p64")


def test_fp8_variants_widen_in_the_nsplit_schedule_only():
    v = default_variant(FP8, 64)
    assert (v.q_dtype, v.kv_dtype, v.kv_fp8, v.qk) == ("bf16", "e4m3", True, "nsplit")
    assert v.key.startswith("bf16_e4m3_p64_") and v.smem_bytes() <= SMEM_LIMIT
    with pytest.raises(InvalidVariant, match="nsplit and swapped schedules only"):
        Variant(dtype=FP8, merge="wide_pdl", qk="full_wg").validate()
    space = search_space(FP8, 64)
    assert space and {s.qk for s in space} == {"nsplit", "swap16", "swap32"}
    # a one-byte ring: more stages fit than with bf16 at block_n = 64
    assert Variant(dtype=FP8, block_n=32, stages=4).smem_bytes() < Variant(block_n=32, stages=4).smem_bytes()


def test_render_names_both_element_types():
    src = render(default_variant(FP8, 64))
    assert "using Element = cutlass::bfloat16_t;" in src and "using KvElement = cutlass::float_e4m3_t;" in src
    assert "using KvElement = cutlass::bfloat16_t;" in render(default_variant("bf16", 64))


def test_quantize_e4m3():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 576, generator=g).to(torch.bfloat16)
    x[3, 5] = float("nan")
    q8, scale = quantize_e4m3(x)
    finite = x.float()[torch.isfinite(x.float())]
    assert q8.dtype == torch.float8_e4m3fn and scale == pytest.approx(float(finite.abs().max()) / E4M3_MAX)
    back = q8.float() * scale
    assert math.isnan(back[3, 5]) and float(back[torch.isfinite(back)].abs().max()) == pytest.approx(
        float(finite.abs().max()), rel=1e-6)
    err = (back - x.float())[torch.isfinite(back)].abs() / (x.float()[torch.isfinite(back)].abs() + scale * 2 ** -9)
    assert float(err.max()) <= 2 ** -4 + 1e-6        # e4m3: 3 mantissa bits, half an ulp


def test_reference_dequantises_a_float8_cache():
    g = torch.Generator().manual_seed(1)
    q, k, bt, sl = make_paged_kv(3, 2, 8, 1, [70, 5, 130], 64, torch.bfloat16, "cpu", g)
    k8, scale = quantize_e4m3(k)
    out8, lse8 = mla_decode_reference(q, k8, bt, sl, 512, causal=True, k_scale=scale)
    out, lse = mla_decode_reference(q, (k8.float() * scale), bt, sl, 512, causal=True)
    assert torch.allclose(lse8, lse, atol=1e-5) and torch.allclose(out8.float(), out.to(torch.bfloat16).float())
    out_t, lse_t = mla_decode_reference(q, k8, bt, sl, 512, causal=True, k_scale=torch.tensor([scale]))
    assert torch.equal(out_t, out8) and torch.equal(lse_t, lse8)


def _k(dtype=torch.float8_e4m3fn):
    return torch.zeros(2, 64, 1, 576).to(dtype)


@pytest.mark.parametrize("k_cache,k_scale,value,exc,match", [
    (_k(torch.bfloat16), None, 0.5, ValueError, "k_scale applies to a float8_e4m3fn k_cache only"),
    (_k(torch.bfloat16), torch.ones(1), 1.0, ValueError, "k_scale applies to a float8_e4m3fn k_cache only"),
    (_k(), None, float("inf"), ValueError, "k_scale must be a finite positive number"),
    (_k(), None, -1.0, ValueError, "k_scale must be a finite positive number"),
    (_k(), None, "2", TypeError, "k_scale must be a float or a one-element float32 tensor"),
    (_k(), torch.ones(1, dtype=torch.float64), 1.0, ValueError, "one-element float32 tensor"),
    (_k(), torch.ones(2), 1.0, ValueError, "one-element float32 tensor"),
    (_k(), [1.0], 1.0, TypeError, "k_scale must be a torch.Tensor"),
])
def test_k_scale_checks(k_cache, k_scale, value, exc, match):
    q = torch.zeros(1, 1, 16, 576, dtype=torch.bfloat16)
    with pytest.raises(exc, match=match):
        check_k_scale(k_cache, q, k_scale, value)


def test_k_scale_accepted():
    q = torch.zeros(1, 1, 16, 576, dtype=torch.bfloat16)
    check_k_scale(_k(), q, torch.ones(1), 1.0)
    check_k_scale(_k(), q, None, 0.01)
    check_k_scale(_k(torch.bfloat16), q, None, 1.0)


def test_is_fp8_kvcache_names_the_supported_layout():
    q = torch.zeros(1, 1, 16, 576, dtype=torch.bfloat16)
    meta, splits = torch.zeros(4, 8, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    bt, sl = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="float8_e4m3fn tensor .* 656-byte"):
        flash_mla_with_kvcache(q, _k(torch.bfloat16), bt, sl, 512, meta, splits, is_fp8_kvcache=True)
    with pytest.raises(NotImplementedError, match="656-byte"):
        flash_mla_with_kvcache(q, torch.zeros(2, 64, 1, 656, dtype=torch.uint8), bt, sl, 512, meta, splits,
                               is_fp8_kvcache=True)


def test_get_mla_metadata_takes_is_fp8_kvcache():
    sched, none = get_mla_metadata(is_fp8_kvcache=True)
    assert none is None and not sched.have_initialized


def test_widen_ahead_constraints():
    v = Variant(dtype=FP8, qk="swap16", stages=1, widen="ahead").validate()
    assert v.key.endswith("_qs16_wa") and v.build_key.endswith("_qs16_wa") and v.smem_bytes() <= SMEM_LIMIT
    # two widened tiles: one bf16 tile more than inline
    assert v.smem_bytes() - Variant(dtype=FP8, qk="swap16", stages=1).smem_bytes() == 64 * 576 * 2
    for bad in (dict(dtype="bf16", qk="swap16", stages=1), dict(dtype=FP8, qk="nsplit", stages=1),
                dict(dtype=FP8, qk="swap16", stages=2)):
        with pytest.raises(InvalidVariant, match="widen=ahead"):
            Variant(widen="ahead", **bad).validate()
    with pytest.raises(InvalidVariant, match="widen must be one of"):
        Variant(widen="sideways").validate()
    assert "static constexpr bool kWidenAhead = true;" in render(v)
