"""Every argument check of flash_mla.validation: exception type, and the argument named in the message."""

from __future__ import annotations

import re

import pytest
import torch

from flash_mla.validation import check_decode_args, check_metadata_args

PAGE_SIZES = (32, 64)


def make_args(b=2, s_q=1, h_q=16, h_kv=1, page=64, dtype=torch.bfloat16, num_parts=4, max_blocks=3):
    """A valid set of decode arguments (CPU, tiny); values are irrelevant to the checks."""
    return dict(
        q=torch.zeros(b, s_q, h_q, 576, dtype=dtype),
        k_cache=torch.zeros(b * max_blocks + 1, page, h_kv, 576, dtype=dtype),
        block_table=torch.zeros(b, max_blocks, dtype=torch.int32),
        cache_seqlens=torch.ones(b, dtype=torch.int32),
        head_dim_v=512,
        tile_scheduler_metadata=torch.zeros(num_parts, 8, dtype=torch.int32),
        num_splits=torch.zeros(b + 1, dtype=torch.int32),
        softmax_scale=None,
        causal=False,
    )


def check(args, require_cuda=False, page_sizes=PAGE_SIZES):
    return check_decode_args(**args, supported_page_sizes=page_sizes, require_cuda=require_cuda)


def expect(exc, name, args, **kw):
    with pytest.raises(exc) as info:
        check(args, **kw)
    assert re.search(rf"\b{re.escape(name)}\b", str(info.value)), str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------- valid inputs

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 64), (2, 2, 128, 1, 64), (6, 4, 64, 8, 32), (3, 3, 9, 3, 32),
                                   (0, 1, 16, 1, 64)])
def test_valid_traits(dtype, shape):
    b, s_q, h_q, h_kv, page = shape
    args = make_args(b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, page=page, dtype=dtype, num_parts=7)
    args["softmax_scale"] = 0.05
    args["causal"] = True
    traits = check(args)
    assert traits == dict(b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, d=576, dv=512, page_size=page, dtype=dtype,
                          num_parts=7)


def test_large_s_q_accepted():
    # the API does not cap the number of query tokens
    assert check(make_args(s_q=16, h_q=128))["s_q"] == 16


def test_softmax_scale_int_accepted():
    args = make_args()
    args["softmax_scale"] = 1
    check(args)


def test_non_contiguous_q_heads_allowed():
    # only the last dimension has to be dense (e.g. q sliced out of a larger projection)
    args = make_args()
    big = torch.zeros(2, 1, 32, 576, dtype=torch.bfloat16)
    args["q"] = big[:, :, ::2]
    assert args["q"].stride(-1) == 1 and not args["q"].is_contiguous()
    check(args)


def test_no_values_read():
    # meta tensors have no data: any read of values would raise
    args = make_args()
    for k, v in list(args.items()):
        if isinstance(v, torch.Tensor):
            args[k] = torch.empty_like(v, device="meta")
    assert check(args)["b"] == 2


# ------------------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("name", ["q", "k_cache"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8, torch.float8_e5m2])
def test_input_dtype(name, dtype):
    args = make_args()
    args[name] = args[name].to(dtype)
    msg = expect(TypeError, name, args)
    assert "bfloat16" in msg and "float16" in msg and str(dtype) in msg


def test_q_as_float8_is_refused():
    args = make_args()
    args["q"] = args["q"].to(torch.float8_e4m3fn)
    assert "q must be bfloat16 or float16, got torch.float8_e4m3fn" in expect(TypeError, "q", args)


def test_a_float8_cache_goes_with_bfloat16_q():
    args = make_args()
    args["k_cache"] = args["k_cache"].to(torch.float8_e4m3fn)
    assert check(args)["b"] == 2                           # bf16 q + e4m3 cache: accepted
    args["q"] = args["q"].half()
    assert "with a float8_e4m3fn k_cache, got torch.float16" in expect(TypeError, "q", args)


def test_q_dtype_message():
    args = make_args()
    args["q"] = args["q"].float()
    with pytest.raises(TypeError, match=r"q must be bfloat16 or float16, got torch.float32"):
        check(args)


def test_dtype_mismatch():
    args = make_args()
    args["k_cache"] = args["k_cache"].half()
    msg = expect(TypeError, "k_cache", args)
    assert "torch.bfloat16" in msg and "torch.float16" in msg


@pytest.mark.parametrize("name", ["block_table", "cache_seqlens", "tile_scheduler_metadata", "num_splits"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.int16])
def test_int32_args(name, dtype):
    args = make_args()
    args[name] = args[name].to(dtype)
    assert "int32" in expect(TypeError, name, args)


@pytest.mark.parametrize("name", ["q", "k_cache", "block_table", "cache_seqlens", "tile_scheduler_metadata",
                                  "num_splits"])
@pytest.mark.parametrize("value", [None, [1, 2], 3])
def test_not_a_tensor(name, value):
    args = make_args()
    args[name] = value
    expect(TypeError, name, args)


# -------------------------------------------------------------------------------------- ranks

@pytest.mark.parametrize("name,bad", [
    ("q", lambda t: t[0]),
    ("q", lambda t: t.unsqueeze(0)),
    ("k_cache", lambda t: t[0]),
    ("k_cache", lambda t: t.unsqueeze(0)),
    ("block_table", lambda t: t.flatten()),
    ("block_table", lambda t: t.unsqueeze(0)),
    ("cache_seqlens", lambda t: t.unsqueeze(0)),
    ("cache_seqlens", lambda t: t[0]),
    ("tile_scheduler_metadata", lambda t: t.flatten()),
    ("tile_scheduler_metadata", lambda t: t.unsqueeze(0)),
    ("num_splits", lambda t: t.unsqueeze(0)),
])
def test_ranks(name, bad):
    args = make_args()
    args[name] = bad(args[name])
    assert "-D" in expect(ValueError, name, args)


def test_metadata_columns():
    args = make_args()
    args["tile_scheduler_metadata"] = torch.zeros(4, 7, dtype=torch.int32)
    assert "8 columns" in expect(ValueError, "tile_scheduler_metadata", args)


def test_metadata_rows():
    args = make_args()
    args["tile_scheduler_metadata"] = torch.zeros(0, 8, dtype=torch.int32)
    expect(ValueError, "tile_scheduler_metadata", args)


def test_num_splits_length():
    args = make_args(b=3)
    args["num_splits"] = torch.zeros(3, dtype=torch.int32)
    assert "batch_size + 1" in expect(ValueError, "num_splits", args)


# ---------------------------------------------------------------------------------- head dims

def test_q_head_dim():
    args = make_args()
    args["q"] = torch.zeros(2, 1, 16, 512, dtype=torch.bfloat16)
    assert "576" in expect(ValueError, "q", args)


def test_k_cache_head_dim():
    args = make_args()
    args["k_cache"] = torch.zeros(7, 64, 1, 512, dtype=torch.bfloat16)
    assert "576" in expect(ValueError, "k_cache", args)


@pytest.mark.parametrize("dv", [576, 128, 0])
def test_head_dim_v(dv):
    args = make_args()
    args["head_dim_v"] = dv
    assert "512" in expect(ValueError, "head_dim_v", args)


@pytest.mark.parametrize("dv", [512.0, "512", None, True])
def test_head_dim_v_type(dv):
    args = make_args()
    args["head_dim_v"] = dv
    expect(TypeError, "head_dim_v", args)


# ------------------------------------------------------------------------------ heads, batch

@pytest.mark.parametrize("h_q,h_kv", [(16, 3), (9, 2), (1, 8), (63, 8)])
def test_heads_divisible(h_q, h_kv):
    args = make_args(h_q=h_q, h_kv=h_kv)
    msg = expect(ValueError, "num_heads_k", args)
    assert "multiple" in msg and str(h_q) in msg


def test_zero_heads():
    args = make_args()
    args["q"] = torch.zeros(2, 1, 0, 576, dtype=torch.bfloat16)
    expect(ValueError, "q", args)
    args = make_args()
    args["k_cache"] = torch.zeros(7, 64, 0, 576, dtype=torch.bfloat16)
    expect(ValueError, "k_cache", args)


def test_zero_s_q():
    args = make_args()
    args["q"] = torch.zeros(2, 0, 16, 576, dtype=torch.bfloat16)
    assert "seqlen_q" in expect(ValueError, "q", args)


@pytest.mark.parametrize("name", ["block_table", "cache_seqlens"])
def test_batch_mismatch(name):
    args = make_args(b=2)
    other = make_args(b=3)
    args[name] = other[name]
    msg = expect(ValueError, name, args)
    assert "batch size" in msg and "3" in msg and "2" in msg


def test_batch_mismatch_q():
    args = make_args(b=2)
    args["q"] = make_args(b=4)["q"]
    expect(ValueError, "block_table", args)      # q is the reference for the batch size


# ---------------------------------------------------------------------------------- page size

@pytest.mark.parametrize("page", [16, 48, 128, 1])
def test_page_size(page):
    args = make_args(page=page)
    msg = expect(ValueError, "k_cache", args)
    assert "page_block_size" in msg and "[32, 64]" in msg and str(page) in msg


def test_page_size_list_is_used():
    args = make_args(page=64)
    expect(ValueError, "k_cache", args, page_sizes=(32,))
    assert check(args, page_sizes=[64])["page_size"] == 64


def test_empty_cache():
    args = make_args()
    args["k_cache"] = torch.zeros(0, 64, 1, 576, dtype=torch.bfloat16)
    expect(ValueError, "k_cache", args)


# ------------------------------------------------------------------------------------ devices

@pytest.mark.parametrize("name", ["k_cache", "block_table", "cache_seqlens", "tile_scheduler_metadata",
                                  "num_splits"])
def test_same_device(name):
    args = make_args()
    args[name] = torch.empty_like(args[name], device="meta")
    msg = expect(ValueError, name, args)
    assert "same device" in msg and "meta" in msg


def test_require_cuda_rejects_cpu():
    args = make_args()
    msg = expect(ValueError, "q", args, require_cuda=True)
    assert "CUDA" in msg and "cpu" in msg


def test_require_cuda_false_accepts_cpu():
    assert check(make_args(), require_cuda=False)["b"] == 2


@pytest.mark.gpu
def test_require_cuda_accepts_cuda():
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_args().items()}
    assert check(args, require_cuda=True)["b"] == 2


@pytest.mark.gpu
def test_mixed_cuda_cpu():
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_args().items()}
    args["block_table"] = args["block_table"].cpu()
    expect(ValueError, "block_table", args, require_cuda=True)


# ------------------------------------------------------------------------------------ layouts

@pytest.mark.parametrize("name", ["q", "k_cache"])
def test_last_dim_stride(name):
    args = make_args()
    x = args[name]
    args[name] = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)[..., ::2]
    assert "stride(-1)" in expect(ValueError, name, args)


@pytest.mark.parametrize("name", ["block_table", "cache_seqlens", "tile_scheduler_metadata", "num_splits"])
def test_contiguous_int_args(name):
    args = make_args()
    x = args[name]
    if x.dim() == 1:
        args[name] = torch.zeros(2 * x.shape[0], dtype=x.dtype)[::2]
    else:
        args[name] = torch.zeros(x.shape[1], x.shape[0], dtype=x.dtype).t()
    assert not args[name].is_contiguous()
    assert "contiguous" in expect(ValueError, name, args)


def test_block_table_may_be_a_row_slice_of_a_wider_buffer():
    args = make_args()                              # engines pass buffer[:batch, :pages] of a wider buffer
    bt = args["block_table"]
    wide = torch.zeros(bt.shape[0] + 3, bt.shape[1] + 7, dtype=bt.dtype)
    wide[:bt.shape[0], :bt.shape[1]] = bt
    args["block_table"] = wide[:bt.shape[0], :bt.shape[1]]
    assert not args["block_table"].is_contiguous()
    check(args)


# ------------------------------------------------------------------------------------ scalars

@pytest.mark.parametrize("scale", [0.0, -0.1, float("inf"), float("nan"), float("-inf")])
def test_softmax_scale_value(scale):
    args = make_args()
    args["softmax_scale"] = scale
    expect(ValueError, "softmax_scale", args)


@pytest.mark.parametrize("scale", ["0.1", True, torch.tensor(0.1), [0.1]])
def test_softmax_scale_type(scale):
    args = make_args()
    args["softmax_scale"] = scale
    expect(TypeError, "softmax_scale", args)


@pytest.mark.parametrize("causal", [1, 0, None, "yes", torch.tensor(True)])
def test_causal_type(causal):
    args = make_args()
    args["causal"] = causal
    expect(TypeError, "causal", args)


# ------------------------------------------------------------------------------- get_mla_metadata

def test_metadata_args_valid():
    check_metadata_args(torch.zeros(5, dtype=torch.int32), 128, 1)
    check_metadata_args(torch.zeros(0, dtype=torch.int32), 1, 8)


@pytest.mark.parametrize("value", [torch.zeros(4, dtype=torch.int64), torch.zeros(4)])
def test_metadata_seqlens_dtype(value):
    with pytest.raises(TypeError, match=r"cache_seqlens.*int32"):
        check_metadata_args(value, 16, 1)


def test_metadata_seqlens_rank():
    with pytest.raises(ValueError, match=r"cache_seqlens.*1-D"):
        check_metadata_args(torch.zeros(2, 3, dtype=torch.int32), 16, 1)


def test_metadata_seqlens_not_tensor():
    with pytest.raises(TypeError, match=r"cache_seqlens"):
        check_metadata_args([1, 2, 3], 16, 1)


@pytest.mark.parametrize("name", ["num_heads_per_head_k", "num_heads_k"])
@pytest.mark.parametrize("value,exc", [(0, ValueError), (-3, ValueError), (1.5, TypeError), ("8", TypeError),
                                       (True, TypeError), (None, TypeError)])
def test_metadata_ints(name, value, exc):
    kw = dict(cache_seqlens=torch.zeros(3, dtype=torch.int32), num_heads_per_head_k=16, num_heads_k=1)
    kw[name] = value
    with pytest.raises(exc) as info:
        check_metadata_args(**kw)
    assert name in str(info.value)


@pytest.mark.parametrize("value,err", [(0, ValueError), (-3, ValueError), (-100, ValueError), (2.0, TypeError),
                                       (True, TypeError)])
def test_split_overhead_is_validated(value, err):
    # -3 used to drop 3 of 16 blocks from the schedule and -100 to schedule nothing, without an error
    with pytest.raises(err, match="split_overhead"):
        check_metadata_args(torch.zeros(5, dtype=torch.int32), 16, 1, split_overhead=value)
    check_metadata_args(torch.zeros(5, dtype=torch.int32), 16, 1, split_overhead=1)


@pytest.mark.parametrize("value,err", [(0, ValueError), (-1, ValueError), (4.0, TypeError), (True, TypeError)])
def test_split_min_blocks_is_validated(value, err):
    with pytest.raises(err, match="split_min_blocks"):
        check_metadata_args(torch.zeros(5, dtype=torch.int32), 16, 1, split_min_blocks=value)
    check_metadata_args(torch.zeros(5, dtype=torch.int32), 16, 1, split_min_blocks=16)


def test_get_mla_metadata_checks_split_overhead_before_the_device():
    from flash_mla import get_mla_metadata
    with pytest.raises(ValueError, match="split_overhead must be >= 1, got -3"):
        get_mla_metadata(torch.full((4,), 1000, dtype=torch.int32), 16, 1, split_overhead=-3)


def _paged(lens, page=64, width=None, num_blocks=None):
    from flash_mla.testing import make_paged_kv
    q, k, bt, sl = make_paged_kv(len(lens), 1, 16, 1, lens, page, torch.bfloat16, "cpu", torch.Generator().manual_seed(0))
    return k, bt, sl


def test_value_check_accepts_valid_inputs():
    from flash_mla.validation import check_values
    check_values(*_paged([100, 0, 64, 300]))


def test_value_check_names_a_length_past_the_capacity():
    from flash_mla.validation import check_values
    k, bt, sl = _paged([100, 300])
    sl[1] = bt.shape[1] * 64 + 1
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = .* exceeds the block table's capacity"):
        check_values(k, bt, sl)


def test_value_check_names_a_block_index_outside_the_cache():
    from flash_mla.validation import check_values
    k, bt, sl = _paged([100, 300])
    bt[1, 2] = k.shape[0]                      # one past the last block; request 1 uses pages 0..4
    with pytest.raises(ValueError, match=r"block_table\[1, 2\] = .* outside k_cache"):
        check_values(k, bt, sl)
    bt[1, 2] = -1
    with pytest.raises(ValueError, match=r"block_table\[1, 2\] = -1"):
        check_values(k, bt, sl)
    bt[1, 2] = 0
    bt[0, bt.shape[1] - 1] = -7                # an unused entry (past request 0's pages) is not checked
    check_values(k, bt, sl)


def test_value_check_is_opt_in(monkeypatch):
    from flash_mla.validation import values_check_enabled
    monkeypatch.delenv("FLASH_MLA_CHECK_VALUES", raising=False)
    assert not values_check_enabled()
    monkeypatch.setenv("FLASH_MLA_CHECK_VALUES", "1")
    assert values_check_enabled()
    monkeypatch.setenv("FLASH_MLA_CHECK_VALUES", "0")
    assert not values_check_enabled()
