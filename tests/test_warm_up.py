"""flash_mla.warm_up on any machine: which kernels it selects and loads before CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

import flash_mla
from flash_mla import dispatch, selection
from flash_mla.codegen.variant import Variant, default_variant
from flash_mla.workload_key import NO_HINT

WINNERS = {1: Variant(block_n=32, stages=4), 4: Variant(block_n=32, stages=4),
           64: Variant(block_n=32, stages=3)}


@pytest.fixture
def fake_gpu(monkeypatch):
    seen = {"keys": [], "loaded": [], "policy": []}
    monkeypatch.setattr(selection, "device_info", lambda i: ("Fake GPU", 132, "13.0"))

    def select(gpu, sms, cuda, key):
        seen["keys"].append(key)
        v = WINNERS.get(key.batch_bucket) if key.seqlen_bucket == NO_HINT else Variant(block_n=32, stages=2)
        return selection.Selection(v, "shipped" if v else "default", "test")
    monkeypatch.setattr(selection, "select", select)
    monkeypatch.setattr(dispatch, "library_for", lambda v: seen["loaded"].append(v.key) or object())
    monkeypatch.setattr(dispatch, "split_policy_for", lambda *a: seen["policy"].append(a))
    return seen


def test_warm_up_loads_each_selected_variant_once(fake_gpu):
    keys = flash_mla.warm_up(num_heads_q=16, batch_sizes=[1, 3, 4, 64, 100], device="cuda:0")
    # first the library of get_mla_metadata's schedule kernel (the bf16 / page-64 default); then buckets 1, 4, 4, 64,
    # 128: the winners of 1, 4 (the same variant) and 64, and the default for 128 (loaded already)
    assert keys == [dispatch.schedule_variant().key, WINNERS[1].key, WINNERS[64].key]
    assert dispatch.schedule_variant() == default_variant("bf16", 64)
    assert fake_gpu["loaded"] == keys
    assert [k.batch_bucket for k in fake_gpu["keys"]] == [1, 4, 4, 64, 128]
    assert all(k.h_q == 16 and k.s_q == 1 and not k.causal and k.seqlen_bucket == NO_HINT for k in fake_gpu["keys"])
    assert [a[3] for a in fake_gpu["policy"]] == [1, 3, 4, 64, 100]      # the split policy is looked up too


def test_warm_up_with_a_hint_prepares_both_kinds_of_call(fake_gpu):
    keys = flash_mla.warm_up(num_heads_q=128, seqlen_q=2, causal=True, batch_sizes=[8], seqlens_hint=4000,
                             dtype=torch.bfloat16, device="cuda:0")
    assert [k.seqlen_bucket for k in fake_gpu["keys"]] == [NO_HINT, 4096]
    assert all(k.causal and k.s_q == 2 for k in fake_gpu["keys"])
    assert keys == [dispatch.schedule_variant().key, Variant(block_n=32, stages=2).key]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_heads_q=0), ValueError, "num_heads_q"),
    (dict(num_heads_q=16, num_heads_k=3), ValueError, "multiple of num_heads_k"),
    (dict(num_heads_q=16, dtype=torch.float32), TypeError, "dtype"),
    (dict(num_heads_q=16, page_block_size=16), ValueError, "page_block_size"),
    (dict(num_heads_q=16, batch_sizes=[4, 0]), ValueError, "batch_sizes"),
    (dict(num_heads_q=16, seqlens_hint="long"), (TypeError, ValueError), "seqlens_hint"),
])
def test_warm_up_checks_its_arguments(fake_gpu, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        flash_mla.warm_up(device="cuda:0", **kwargs)
    assert fake_gpu["loaded"] == []


def test_a_build_inside_cuda_graph_capture_is_refused_naming_warm_up(monkeypatch):
    from flash_mla.codegen.build import BuildError
    from flash_mla.codegen.variant import Variant
    builds = []
    monkeypatch.setattr(dispatch, "find_built", lambda v: None)
    monkeypatch.setattr(dispatch, "build_one", lambda v: builds.append(v))
    monkeypatch.setattr(dispatch, "_capturing", lambda: True)
    v = Variant(block_n=32, stages=3)
    dispatch.library_for.cache_clear()
    with pytest.raises(BuildError, match=r"inside CUDA-graph capture.*flash_mla.warm_up"):
        dispatch.library_for(v)
    assert builds == []
    dispatch.library_for.cache_clear()
