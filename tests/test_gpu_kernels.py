"""The generated kernels on an SM90 GPU: public API end to end, CUDA-graph capture, bad inputs."""

from __future__ import annotations

import pytest
import torch

import flash_mla
from flash_mla import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata
from flash_mla.reference import mla_decode_reference
from flash_mla.testing import compare, make_paged_kv, varlen_seqlens

pytestmark = pytest.mark.gpu


def _inputs(b, s_q, h_q, h_kv, mean_sk, page_size=64, dtype=torch.bfloat16, seed=0, zero_len=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = varlen_seqlens(b, mean_sk, s_q, g)
    if zero_len:
        lens[0] = 0
    return make_paged_kv(b, s_q, h_q, h_kv, lens, page_size, dtype, "cuda", g)


@pytest.mark.parametrize("b,s_q,h_q,h_kv,sk,causal,page,dtype,zero", [
    (4, 1, 16, 1, 700, False, 64, torch.bfloat16, False),
    (3, 2, 128, 1, 1500, True, 64, torch.bfloat16, True),
    (2, 4, 3, 1, 90, True, 32, torch.float16, False),
    (5, 1, 64, 2, 300, False, 32, torch.bfloat16, True),
])
@pytest.mark.parametrize("form", ["classic", "sched"])     # both FlashMLA interfaces, same cases
def test_api_matches_reference(b, s_q, h_q, h_kv, sk, causal, page, dtype, zero, form):
    q, k_cache, block_table, seqlens = _inputs(b, s_q, h_q, h_kv, sk, page, dtype, seed=b * 7 + s_q, zero_len=zero)
    if form == "classic":
        meta, splits = get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
    else:
        meta, splits = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, meta, splits, causal=causal)
    if form == "sched":                          # filled by the first call, reused by the next (a second layer)
        assert isinstance(meta, FlashMLASchedMeta) and meta.have_initialized
        first = meta.tile_scheduler_metadata
        out2, lse2 = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, meta, None, causal=causal)
        assert meta.tile_scheduler_metadata is first
        assert torch.equal(out2, out) and torch.equal(lse2, lse)
    assert out.shape == (b, s_q, h_q, 512) and out.dtype == dtype
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    ref_out, ref_lse = mla_decode_reference(q, k_cache, block_table, seqlens, 512, causal=causal)
    m = compare(out, ref_out, lse, ref_lse, dtype)
    assert m["ok"], m
    if zero:
        assert torch.all(out[0] == 0) and torch.all(torch.isinf(lse[0]) & (lse[0] > 0))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs in one process")
def test_one_variant_on_two_devices_in_one_process():
    # The decode kernel's dynamic shared-memory opt-in (cudaFuncSetAttribute) holds per device: a variant first
    # launched on device 0 must still launch (and be right) on device 1 of the same process.
    for dev in (0, 1):
        with torch.cuda.device(dev):
            q, k_cache, block_table, seqlens = _inputs(3, 1, 64, 1, 900, seed=20 + dev)
            meta, splits = get_mla_metadata(seqlens, 64, 1)
            out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, meta, splits)
            torch.cuda.synchronize()
            assert out.device.index == dev
            ref_out, ref_lse = mla_decode_reference(q, k_cache, block_table, seqlens, 512)
            m = compare(out, ref_out, lse, ref_lse, torch.bfloat16)
            assert m["ok"], (dev, m)


def test_cuda_graph_capture_and_replay():
    b, s_q, h_q, h_kv = 8, 2, 32, 1
    q, k_cache, block_table, seqlens = _inputs(b, s_q, h_q, h_kv, 2000, seed=11)
    meta, splits = get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
    flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, meta, splits, causal=True)  # load + warm
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        meta_g, splits_g = get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, meta_g, splits_g, causal=True)
    # New values in the captured buffers (same shapes); the replay must see them.
    g = torch.Generator(device="cuda").manual_seed(12)
    q.copy_(torch.randn(q.shape, generator=g, device="cuda", dtype=q.dtype))
    new_lens = torch.tensor(varlen_seqlens(b, 1500, s_q, g), dtype=torch.int32, device="cuda")
    seqlens.copy_(torch.minimum(new_lens, seqlens))       # shorter: pages stay valid, tails are NaN-free data
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = mla_decode_reference(q, k_cache, block_table, seqlens, 512, causal=True)
    m = compare(out, ref_out, lse, ref_lse, q.dtype)
    assert m["ok"], m


def test_schedule_object_under_cuda_graph_capture():
    b, s_q, h_q, h_kv = 4, 1, 16, 1
    q, k_cache, block_table, seqlens = _inputs(b, s_q, h_q, h_kv, 1200, seed=21)
    sched, _ = get_mla_metadata()
    flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched)      # fills the object, loads the kernel
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = get_mla_metadata()        # an object first used inside the capture schedules in the graph
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, captured)
        out_b, lse_b = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched)
    g = torch.Generator(device="cuda").manual_seed(22)
    q.copy_(torch.randn(q.shape, generator=g, device="cuda", dtype=q.dtype))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = mla_decode_reference(q, k_cache, block_table, seqlens, 512)
    for o, l in ((out, lse), (out_b, lse_b)):
        m = compare(o, ref_out, l, ref_lse, q.dtype)
        assert m["ok"], m


def test_cpu_tensors_rejected():
    q, k_cache, block_table, seqlens = _inputs(2, 1, 16, 1, 100)
    meta, splits = get_mla_metadata(seqlens, 16, 1)
    with pytest.raises(ValueError, match="q"):
        flash_mla_with_kvcache(q.cpu(), k_cache, block_table, seqlens, 512, meta, splits)
    with pytest.raises(ValueError, match="cache_seqlens"):
        get_mla_metadata(seqlens.cpu(), 16, 1)


def test_unsupported_page_size_rejected():
    q, k_cache, block_table, seqlens = _inputs(2, 1, 16, 1, 100, page_size=16)
    meta, splits = get_mla_metadata(seqlens, 16, 1)
    with pytest.raises(ValueError, match="page_block_size"):
        flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, meta, splits)


class _no_fallback_report:
    """Fails the test if the flash_mla logger reports a fallback to the default variant inside the block."""

    def __enter__(self):
        import logging

        class Fail(logging.Handler):
            def emit(self, record):
                raise AssertionError(f"unexpected fallback report: {record.getMessage()}")
        self.logger, self.handler = logging.getLogger("flash_mla"), Fail(logging.WARNING)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        return False


def test_shipped_db_winner_is_selected_and_correct():
    from flash_mla import db, dispatch, selection
    if db.shipped_db_path() is None:
        pytest.skip("the package ships no tuning database")
    gpu, sms, cuda = selection.device_info(0)
    selection.clear_cache()
    q, k_cache, block_table, seqlens = _inputs(4, 1, 16, 1, 2048, seed=5)
    mean = float(seqlens.double().mean())                   # the host copy an engine passes as the hint
    sel = selection.select_for_tensors(q, k_cache, False, mean)
    if sel.source != "shipped":
        pytest.skip(f"shipped DB has no entry for {gpu} / CUDA {cuda}: {sel.reason}")
    with _no_fallback_report():
        chosen = dispatch.select_variant(q, k_cache, False, mean)
        meta, splits = get_mla_metadata(seqlens, 16, 1, seqlens_hint=seqlens.cpu())
        assert getattr(meta, "_flash_mla_mean_seqlen") == pytest.approx(mean)     # carried to the decode call
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, meta, splits)
    assert chosen == sel.variant
    ref_out, ref_lse = mla_decode_reference(q, k_cache, block_table, seqlens, 512)
    assert compare(out, ref_out, lse, ref_lse, q.dtype)["ok"]


def test_registered_ops_match_the_api_and_compile_without_a_graph_break():
    b, s_q, h_q, h_kv = 4, 2, 16, 1
    q, k_cache, block_table, seqlens = _inputs(b, s_q, h_q, h_kv, 900, seed=5)
    meta, splits = get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, meta, splits, causal=True)
    o1, l1 = torch.ops.flash_mla.mla_decode(q, k_cache, block_table, seqlens, meta, splits, None, True, None)
    assert torch.equal(o1, out) and torch.equal(l1, lse)
    o2, l2 = torch.full_like(out, float("nan")), torch.full_like(lse, float("nan"))
    torch.ops.flash_mla.mla_decode_out(q, k_cache, block_table, seqlens, meta, splits, o2, l2, None, True, None)
    assert torch.equal(o2, out) and torch.equal(l2, lse)

    def step(q, k_cache, block_table, seqlens, meta, splits):
        o, l = torch.ops.flash_mla.mla_decode(q * 1.0, k_cache, block_table, seqlens, meta, splits, None, True, None)
        return o, l
    o3, l3 = torch.compile(step, fullgraph=True)(q, k_cache, block_table, seqlens, meta, splits)
    assert torch.equal(o3, out) and torch.equal(l3, lse)
    with pytest.raises(ValueError, match="out must be"):
        torch.ops.flash_mla.mla_decode_out(q, k_cache, block_table, seqlens, meta, splits, o2.float(), l2, None, True,
                                           None)


# Engine call patterns (the README's recipes): one metadata per step shared by the layers, engine-style block
# tables, one CUDA graph per batch size, replayed with new lengths and queries.

def _engine_step_inputs(b, s_q, h_q, layers, max_model_len, seed):
    """Per-layer caches, one block table as wide as max_model_len / 64 (engines size it so), lengths."""
    q, k0, bt, lens = _inputs(b, s_q, h_q, 1, 1500, seed=seed)
    caches = [k0] + [torch.randn_like(k0) for _ in range(layers - 1)]
    wide = torch.zeros((b, max_model_len // 64), dtype=torch.int32, device="cuda")
    wide[:, :bt.shape[1]] = bt
    return q, caches, wide, lens


def _replay_with_new_lengths(graph, q, lens, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q.copy_(torch.randn(q.shape, generator=g, device="cuda", dtype=q.dtype))
    new = torch.tensor(varlen_seqlens(lens.shape[0], 900, q.shape[1], g), dtype=torch.int32, device="cuda")
    lens.copy_(torch.minimum(new, lens))
    graph.replay()
    torch.cuda.synchronize()


def test_vllm_pattern_metadata_tensor_alone_under_a_full_cuda_graph():
    # vLLM's FlashMLA backend: the metadata builder calls get_mla_metadata(seq_lens, s_q * h_q, 1,
    # is_fp8_kvcache=False) outside the graph and keeps [0]; each layer's decode passes it with num_splits=None.
    b, s_q, h_q, layers = 4, 2, 16, 2
    q, caches, bt, lens = _engine_step_inputs(b, s_q, h_q, layers, 8192, seed=31)
    flash_mla.warm_up(num_heads_q=h_q, seqlen_q=s_q, causal=True, batch_sizes=(b,))
    sched_meta, _ = get_mla_metadata(lens, s_q * h_q, 1, is_fp8_kvcache=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [flash_mla_with_kvcache(q, k, bt, lens, 512, tile_scheduler_metadata=sched_meta, causal=True,
                                       is_fp8_kvcache=False) for k in caches]
    get_mla_metadata(lens, s_q * h_q, 1, is_fp8_kvcache=False)   # the builder's next step: not read by the graph
    _replay_with_new_lengths(graph, q, lens, seed=32)
    for (out, lse), k in zip(outs, caches):
        ref_out, ref_lse = mla_decode_reference(q, k, bt, lens, 512, causal=True)
        m = compare(out, ref_out, lse, ref_lse, q.dtype)
        assert m["ok"], m


def test_sglang_pattern_classic_tensors_copied_into_graph_buffers():
    # SGLang's FlashMLA backend: persistent metadata buffers sized for the largest batch, the step's
    # get_mla_metadata copied into them before capture and before each replay; block table rows are a slice of
    # a wider persistent buffer.
    b, max_bs, s_q, h_q, layers = 3, 8, 1, 32, 2
    q, caches, bt, lens = _engine_step_inputs(b, s_q, h_q, layers, 16384, seed=41)
    cg_meta, cg_splits = get_mla_metadata(torch.ones(max_bs, dtype=torch.int32, device="cuda"), s_q * h_q, 1)
    kv_indices = torch.zeros((max_bs, bt.shape[1] + 5), dtype=torch.int32, device="cuda")
    kv_indices[:b, :bt.shape[1]] = bt
    table = kv_indices[:b, :bt.shape[1]]                     # row stride wider than the view

    def refresh():
        m, s = get_mla_metadata(lens, s_q * h_q, 1)
        cg_meta.copy_(m)
        cg_splits[:b + 1].copy_(s)
    refresh()
    flash_mla.warm_up(num_heads_q=h_q, seqlen_q=s_q, causal=True, batch_sizes=(b,))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [flash_mla_with_kvcache(q, k, table, lens, 512, cg_meta, cg_splits[:b + 1], causal=True)
                for k in caches]
    g = torch.Generator(device="cuda").manual_seed(42)
    q.copy_(torch.randn(q.shape, generator=g, device="cuda", dtype=q.dtype))
    lens.copy_(torch.minimum(torch.tensor(varlen_seqlens(b, 700, s_q, g), dtype=torch.int32, device="cuda"), lens))
    refresh()                                                 # before the replay, outside the graph
    graph.replay()
    torch.cuda.synchronize()
    for (out, lse), k in zip(outs, caches):
        ref_out, ref_lse = mla_decode_reference(q, k, table, lens, 512, causal=True)
        m = compare(out, ref_out, lse, ref_lse, q.dtype)
        assert m["ok"], m


# ------------------------------------------------------------------------------------- float8 KV cache

@pytest.mark.parametrize("b,s_q,h_q,h_kv,sk,causal,page,zero", [
    (4, 1, 16, 1, 700, False, 64, False),
    (3, 2, 128, 1, 1500, True, 64, True),
    (2, 4, 3, 1, 90, True, 32, False),
    (5, 1, 64, 2, 300, False, 32, True),
])
@pytest.mark.parametrize("scale_as", ["tensor", "float"])
def test_fp8_cache_matches_the_dequantised_reference(b, s_q, h_q, h_kv, sk, causal, page, zero, scale_as):
    from flash_mla.testing import quantize_e4m3
    q, k_bf16, block_table, seqlens = _inputs(b, s_q, h_q, h_kv, sk, page, seed=b * 5 + s_q, zero_len=zero)
    k8, scale = quantize_e4m3(k_bf16)              # NaN-poisoned tails and spare pages stay NaN
    k_scale = torch.tensor([scale], device="cuda") if scale_as == "tensor" else scale
    meta, splits = get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv, is_fp8_kvcache=True)
    out, lse = flash_mla_with_kvcache(q, k8, block_table, seqlens, 512, meta, splits, causal=causal,
                                      is_fp8_kvcache=True, k_scale=k_scale)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_out, ref_lse = mla_decode_reference(q, k8, block_table, seqlens, 512, causal=causal, k_scale=scale)
    m = compare(out, ref_out, lse, ref_lse, torch.bfloat16)
    assert m["ok"], m
    if zero:
        assert torch.all(out[0] == 0) and torch.all(torch.isinf(lse[0]) & (lse[0] > 0))


def test_fp8_widening_is_exact_for_every_e4m3_value():
    # One token per request, so P = 1 and out = V: every non-NaN e4m3 byte (subnormals, both zeros, +-448)
    # must come out as exactly its value (bf16 holds every e4m3 value), times a power-of-two scale.
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)   # 254 values
    b, page = 2, 64
    k8 = torch.zeros(b + 1, page, 1, 576, dtype=torch.uint8)
    k8[0, 0, 0, :254] = codes                      # request 0: channels 0..253
    k8[1, 0, 0, :254] = codes.flip(0)              # request 1: the same values in reverse
    k8[:, 1:] = 0x7F                               # NaN past the one valid token
    k8 = k8.view(torch.float8_e4m3fn).cuda()
    q = torch.randn(b, 1, 16, 576, dtype=torch.bfloat16, device="cuda")
    bt = torch.tensor([[0], [1]], dtype=torch.int32, device="cuda")
    lens = torch.ones(b, dtype=torch.int32, device="cuda")
    meta, splits = get_mla_metadata(lens, 16, 1)
    out, lse = flash_mla_with_kvcache(q, k8, bt, lens, 512, meta, splits, k_scale=0.25)
    want = k8[:2, 0, 0, :512].float() * 0.25       # (b, 512)
    assert torch.equal(out[:, 0].float(), want[:, None, :].expand(b, 16, 512))


def test_fp8_k_scale_tensor_is_read_at_replay():
    # A CUDA graph captures the pointer of a tensor k_scale: a new value in the tensor applies at the next replay.
    from flash_mla.testing import quantize_e4m3
    q, k_bf16, bt, lens = _inputs(4, 1, 32, 1, 900, seed=3)
    k8, scale = quantize_e4m3(k_bf16)
    ks = torch.tensor([scale], device="cuda")
    meta, splits = get_mla_metadata(lens, 32, 1)
    flash_mla_with_kvcache(q, k8, bt, lens, 512, meta, splits, k_scale=ks)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = flash_mla_with_kvcache(q, k8, bt, lens, 512, meta, splits, k_scale=ks)
    for s in (scale, 2 * scale):
        ks.fill_(s)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = mla_decode_reference(q, k8, bt, lens, 512, k_scale=s)
        m = compare(out, ref_out, lse, ref_lse, torch.bfloat16)
        assert m["ok"], (s, m)


def test_fp8_bad_scale_and_format_are_named():
    q, k_bf16, bt, lens = _inputs(2, 1, 16, 1, 100, seed=4)
    meta, splits = get_mla_metadata(lens, 16, 1)
    with pytest.raises(ValueError, match="k_scale applies to a float8_e4m3fn k_cache only"):
        flash_mla_with_kvcache(q, k_bf16, bt, lens, 512, meta, splits, k_scale=0.5)
    k8 = k_bf16.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="k_scale must be a one-element float32 tensor"):
        flash_mla_with_kvcache(q, k8, bt, lens, 512, meta, splits, k_scale=torch.ones(2, device="cuda"))
    with pytest.raises(ValueError, match="k_scale must be on the same device as q"):
        flash_mla_with_kvcache(q, k8, bt, lens, 512, meta, splits, k_scale=torch.ones(1))
    with pytest.raises(ValueError, match="k_scale must be a finite positive number"):
        flash_mla_with_kvcache(q, k8, bt, lens, 512, meta, splits, k_scale=float("nan"))
    with pytest.raises(TypeError, match="q must be bfloat16 with a float8_e4m3fn k_cache"):
        flash_mla_with_kvcache(q.half(), k8, bt, lens, 512, meta, splits)


# ------------------------------------------------------------------------------------- swapped schedule

@pytest.mark.parametrize("qk", ["swap16", "swap32"])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("b,s_q,h_q,h_kv,sk,causal,zero", [
    (4, 1, 16, 1, 700, False, False),
    (3, 2, 16, 1, 1500, True, True),       # 32 rows: two CTAs of 16 (swap16) or one of 32
    (2, 4, 3, 1, 90, True, False),
    (5, 1, 64, 2, 300, False, True),       # 32 rows per kv head, two kv heads
    (2, 1, 128, 1, 2000, False, False),    # 128 rows: 8 / 4 CTAs over the same tiles
])
def test_swapped_schedule_matches_reference(qk, fp8, b, s_q, h_q, h_kv, sk, causal, zero):
    from flash_mla.codegen.variant import Variant
    from flash_mla.testing import quantize_e4m3
    q, k, bt, lens = _inputs(b, s_q, h_q, h_kv, sk, seed=b * 3 + h_q, zero_len=zero)
    scale = None
    if fp8:
        k, scale = quantize_e4m3(k)
    v = Variant(dtype="bf16_e4m3" if fp8 else "bf16", qk=qk, merge="wide_pdl").validate()
    meta, splits = get_mla_metadata(lens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q, k, bt, lens, 512, meta, splits, causal=causal, k_scale=scale, variant=v)
    ref_out, ref_lse = mla_decode_reference(q, k, bt, lens, 512, causal=causal, k_scale=scale)
    m = compare(out, ref_out, lse, ref_lse, torch.bfloat16)
    assert m["ok"], m
