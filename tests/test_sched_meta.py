"""FlashMLA's current interface on any machine: the schedule object, its reuse rules and the arguments
this package refuses. Its GPU runs (same cases as the classic interface) are in test_gpu_kernels.py."""

from __future__ import annotations

import pytest
import torch

import flash_mla
from flash_mla import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata
from flash_mla import api, scheduler


def _cpu_call(b=2, s_q=1, h_q=16, h_k=1, page=64):
    q = torch.zeros(b, s_q, h_q, 576, dtype=torch.bfloat16)
    k_cache = torch.zeros(4, page, h_k, 576, dtype=torch.bfloat16)
    block_table = torch.zeros(b, 2, dtype=torch.int32)
    seqlens = torch.full((b,), 100, dtype=torch.int32)
    return q, k_cache, block_table, seqlens


def test_no_argument_form_returns_an_empty_schedule_object():
    sched, none = get_mla_metadata()
    assert isinstance(sched, FlashMLASchedMeta) and none is None
    assert not sched.have_initialized and sched.tile_scheduler_metadata is None and sched.num_splits is None
    assert flash_mla.FlashMLASchedMeta is FlashMLASchedMeta
    kept, _ = get_mla_metadata(split_overhead=2, split_min_blocks=4, seqlens_hint=[100, 200])
    assert (kept.split_overhead, kept.split_min_blocks, kept.seqlens_hint) == (2, 4, [100, 200])


@pytest.mark.parametrize("kwargs,match", [(dict(split_overhead=0), "split_overhead"),
                                          (dict(split_min_blocks=-1), "split_min_blocks"),
                                          (dict(seqlens_hint="long"), "seqlens_hint")])
def test_no_argument_form_checks_its_keywords_at_once(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        get_mla_metadata(**kwargs)


def test_classic_form_needs_all_three_arguments():
    with pytest.raises(TypeError, match="num_heads_per_head_k, num_heads_k missing"):
        get_mla_metadata(torch.zeros(3, dtype=torch.int32))


def test_num_splits_goes_with_the_form():
    q, k_cache, bt, lens = _cpu_call()
    sched, _ = get_mla_metadata()
    with pytest.raises(ValueError, match="num_splits must be None"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, sched, torch.zeros(3, dtype=torch.int32))
    meta, _ = scheduler.schedule(lens, 4)
    with pytest.raises(TypeError, match="num_splits must be the tensor"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta)


@pytest.mark.parametrize("name,value", [("indices", torch.zeros(2, 1, 8, dtype=torch.int32)),
                                        ("attn_sink", torch.zeros(16)), ("extra_k_cache", torch.zeros(1)),
                                        ("extra_indices_in_kvcache", torch.zeros(1)),
                                        ("topk_length", torch.zeros(2, dtype=torch.int32)),
                                        ("extra_topk_length", torch.zeros(2, dtype=torch.int32)),
                                        ("is_fp8_kvcache", True), ("enable_batch_invariant", True)])
@pytest.mark.parametrize("form", ["classic", "sched"])
def test_unsupported_arguments_name_themselves(name, value, form):
    q, k_cache, bt, lens = _cpu_call()
    meta, splits = get_mla_metadata() if form == "sched" else scheduler.schedule(lens, 4)
    with pytest.raises(NotImplementedError, match=name):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, splits, **{name: value})
    if form == "sched":
        assert not meta.have_initialized


def _filled(q, k_cache, lens, causal=False):
    sched, _ = get_mla_metadata()
    sched.tile_scheduler_metadata, sched.num_splits = scheduler.schedule(lens, 4)
    sched.config = FlashMLASchedMeta.Config(b=q.shape[0], s_q=q.shape[1], h_q=q.shape[2],
                                            page_block_size=k_cache.shape[1], h_k=k_cache.shape[2],
                                            causal=causal, is_fp8_kvcache=False)
    sched.have_initialized = True
    return sched


@pytest.mark.parametrize("change,field", [(dict(b=3), "b 2 -> 3"), (dict(s_q=2), "s_q 1 -> 2"),
                                          (dict(h_q=32), "h_q 16 -> 32"), (dict(page=32), "page_block_size 64 -> 32"),
                                          (dict(h_k=2), "h_k 1 -> 2")])
def test_a_filled_object_refuses_another_configuration(change, field):
    q, k_cache, bt, lens = _cpu_call()
    sched = _filled(q, k_cache, lens)
    q2, k2, bt2, lens2 = _cpu_call(**change)
    with pytest.raises(ValueError, match=field):
        flash_mla_with_kvcache(q2, k2, bt2, lens2, 512, sched)
    with pytest.raises(ValueError, match="causal False -> True"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, sched, causal=True)


def test_a_filled_object_is_reused_not_recomputed(monkeypatch):
    q, k_cache, bt, lens = _cpu_call()
    sched = _filled(q, k_cache, lens)
    monkeypatch.setattr(api, "get_mla_metadata", lambda *a, **k: pytest.fail("schedule recomputed"))
    seen = {}
    monkeypatch.setattr(api, "check_decode_args",
                        lambda q, k, bt, cs, dv, meta, splits, *a, **kw: seen.update(meta=meta, splits=splits)
                        or (_ for _ in ()).throw(RuntimeError("stop before the GPU")))
    with pytest.raises(RuntimeError, match="stop before the GPU"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, sched)
    assert seen["meta"] is sched.tile_scheduler_metadata and seen["splits"] is sched.num_splits


def test_first_call_schedules_with_the_objects_keywords_and_keeps_it_only_when_valid(monkeypatch):
    q, k_cache, bt, lens = _cpu_call(b=2, s_q=2, h_q=32, h_k=1)
    sched, _ = get_mla_metadata(split_overhead=3, split_min_blocks=2, seqlens_hint=100)
    calls = []

    def fake_metadata(cache_seqlens, nhphk, nhk, **kw):       # the CPU spec in place of the CUDA-only entry
        calls.append((nhphk, nhk, kw))
        return scheduler.schedule(cache_seqlens, 4, overhead=kw["split_overhead"], min_payload=kw["split_min_blocks"])
    monkeypatch.setattr(api, "get_mla_metadata", fake_metadata)
    with pytest.raises(ValueError, match="must be on a CUDA device|CUDA"):   # CPU tensors: the call is refused ...
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, sched)
    assert calls == [(64, 1, dict(split_overhead=3, split_min_blocks=2, seqlens_hint=100))]
    assert not sched.have_initialized and sched.tile_scheduler_metadata is None   # ... and nothing is kept
    monkeypatch.setattr(api, "check_decode_args", lambda *a, **k: None)
    monkeypatch.setattr(api, "_check_kernel_layout", lambda *a, **k: None)
    monkeypatch.setattr(api.dispatch, "select_variant", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("gpu")))
    with pytest.raises(RuntimeError, match="gpu"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, sched)
    assert sched.have_initialized and sched.config.s_q == 2 and sched.config.h_q == 32
    want_meta, want_splits = scheduler.schedule(lens, 4, overhead=3, min_payload=2)
    assert torch.equal(sched.tile_scheduler_metadata, want_meta) and torch.equal(sched.num_splits, want_splits)


def test_dense_schedule_needs_the_lengths():
    q, k_cache, bt, _ = _cpu_call()
    sched, _ = get_mla_metadata()
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_mla_with_kvcache(q, k_cache, bt, None, 512, sched)


# FlashMLA's current interface as vLLM calls it: get_mla_metadata with the classic arguments (and
# is_fp8_kvcache=), only the first element kept and passed with num_splits=None.

def _classic_with_sched(lens, parts=4):
    """What get_mla_metadata(lens, ...) returns on a GPU, built from the CPU spec of the schedule."""
    meta, splits = scheduler.schedule(lens, parts)
    setattr(meta, api._SCHED_ATTR, FlashMLASchedMeta(precomputed=(lens, meta, splits)))
    return meta, splits


@pytest.fixture
def stop_before_gpu(monkeypatch):
    monkeypatch.setattr(api, "check_decode_args", lambda *a, **k: None)
    monkeypatch.setattr(api, "_check_kernel_layout", lambda *a, **k: None)
    monkeypatch.setattr(api, "_num_sms", lambda index: 4)
    monkeypatch.setattr(api.launcher, "module", lambda: None)          # the Python path, stopped at selection
    monkeypatch.setattr(api.dispatch, "select_variant", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("gpu")))
    recomputed = []

    def fake_metadata(cache_seqlens, nhphk, nhk, **kw):
        recomputed.append(cache_seqlens)
        return scheduler.schedule(cache_seqlens, 4)
    monkeypatch.setattr(api, "get_mla_metadata", fake_metadata)
    return recomputed


def test_the_metadata_tensor_alone_takes_its_precomputed_schedule_eagerly(stop_before_gpu):
    q, k_cache, bt, lens = _cpu_call(b=2, s_q=1, h_q=16)
    meta, splits = _classic_with_sched(lens)
    sched = getattr(meta, api._SCHED_ATTR)
    with pytest.raises(RuntimeError, match="gpu"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta)            # num_splits=None, as vLLM calls it
    assert sched.have_initialized and sched.tile_scheduler_metadata is meta and sched.num_splits is splits
    assert stop_before_gpu == [] and sched.precomputed is None
    with pytest.raises(RuntimeError, match="gpu"):                          # the next layer reuses it
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta)
    assert stop_before_gpu == []


def test_the_metadata_tensor_alone_schedules_again_inside_graph_capture(stop_before_gpu, monkeypatch):
    monkeypatch.setattr(api.dispatch, "_capturing", lambda: True)
    q, k_cache, bt, lens = _cpu_call(b=2, s_q=1, h_q=16)
    meta, _ = _classic_with_sched(lens)
    with pytest.raises(RuntimeError, match="gpu"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta)
    sched = getattr(meta, api._SCHED_ATTR)
    assert stop_before_gpu == [lens]                                        # computed in the captured call
    assert sched.tile_scheduler_metadata is not meta


def test_the_metadata_tensor_alone_schedules_again_for_other_lengths(stop_before_gpu):
    q, k_cache, bt, lens = _cpu_call(b=2, s_q=1, h_q=16)
    meta, _ = _classic_with_sched(lens)
    other = lens.clone()
    with pytest.raises(RuntimeError, match="gpu"):
        flash_mla_with_kvcache(q, k_cache, bt, other, 512, meta)
    assert stop_before_gpu == [other]


def test_a_copy_of_the_metadata_tensor_alone_is_refused():
    q, k_cache, bt, lens = _cpu_call()
    meta, _ = _classic_with_sched(lens)
    with pytest.raises(TypeError, match="not a copy of it"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta.clone())


@pytest.mark.parametrize("kwargs,exc,match", [(dict(is_fp8_kvcache=1), TypeError, "is_fp8_kvcache"),
                                              (dict(topk=64), NotImplementedError, "topk"),
                                              (dict(num_heads_q=1.5), TypeError, "num_heads_q")])
def test_flashmlas_other_metadata_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        get_mla_metadata(torch.ones(2, dtype=torch.int32), 16, 1, **kwargs)
