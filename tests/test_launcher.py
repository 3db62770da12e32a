"""The C++ launcher (flash_mla/csrc/launcher.cpp) on the CPU: signature caching, the FmlaParams it fills, the
checks it repeats on cached calls, errors through it, and the Python-defined operators where it is off or cannot
be built. A stand-in "variant" (a ctypes callback with the variant ABI) records what a real one would receive."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch

import flash_mla
from flash_mla import launcher, ops
from flash_mla.runtime import FmlaParams

mod = launcher.module()
needs_cpp = pytest.mark.skipif(mod is None, reason="the C++ launcher could not be built here (see the warning)")

LAUNCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(FmlaParams), ctypes.c_void_p)
_FIELDS = [name for name, _ in FmlaParams._fields_]


class FakeVariant:
    """What the resolver hands the launcher: a C entry point (here a ctypes callback) plus the call log."""

    def __init__(self, status=0, cacheable=True, scale=0.125):
        self.launches, self.resolves = [], []
        self.status, self.cacheable, self.scale = status, cacheable, scale
        self._cb = LAUNCH(self._launch)                    # kept alive as long as this object
        self.address = ctypes.cast(self._cb, ctypes.c_void_p).value

    def _launch(self, p, stream):
        self.launches.append({n: getattr(p.contents, n) for n in _FIELDS})
        return self.status

    def resolve(self, *args):
        self.resolves.append(args)
        return self.address, self.scale, self.cacheable


@pytest.fixture
def fake():
    v = FakeVariant()
    mod.clear_plans()
    mod.set_resolver(v.resolve)
    yield v
    mod.set_resolver(launcher.resolve)
    mod.clear_plans()


def _args(b=2, s_q=1, h_q=16, h_kv=1, parts=7, dtype=torch.bfloat16):
    return (torch.randn(b, s_q, h_q, 576, dtype=dtype), torch.randn(10, 64, h_kv, 576, dtype=dtype),
            torch.zeros(b, 5, dtype=torch.int32), torch.ones(b, dtype=torch.int32),
            torch.zeros(parts, 8, dtype=torch.int32), torch.zeros(b + 1, dtype=torch.int32))


@needs_cpp
def test_operators_are_the_cpp_ones():
    assert ops.IMPLEMENTATION == "cpp"


@needs_cpp
def test_a_signature_is_resolved_once_and_then_launched_directly(fake):
    args = _args()
    out, lse = mod.decode(*args, None, False, None)
    out2, lse2 = mod.decode(*args, None, False, None)
    assert len(fake.resolves) == 1 and len(fake.launches) == 2 and mod.num_plans() == 1
    q2 = _args()                                         # new tensors, same signature: no new resolve
    mod.decode(*q2, None, False, None)
    assert len(fake.resolves) == 1
    for changed in [dict(b=3), dict(s_q=2), dict(h_q=32), dict(h_kv=2, h_q=32), dict(parts=9),
                    dict(dtype=torch.float16)]:
        mod.decode(*_args(**changed), None, False, None)
    mod.decode(*args, 0.5, False, None)                  # the scale, causality and hint are in the signature
    mod.decode(*args, None, True, None)
    mod.decode(*args, None, False, 4096.0)
    mod.decode(torch.randn(2, 1, 16, 640, dtype=torch.bfloat16)[..., :576], *args[1:], None, False, None)  # strides
    assert len(fake.resolves) == 1 + 6 + 3 + 1
    assert out.shape == (2, 1, 16, 512) and out.dtype == torch.bfloat16
    assert lse.shape == (2, 16, 1) and lse.dtype == torch.float32
    assert out.data_ptr() != out2.data_ptr()             # fresh outputs per call


@needs_cpp
def test_the_resolver_gets_the_call_and_the_variant_gets_its_params(fake):
    q, k, bt, sl, meta, splits = _args(b=3, s_q=2, h_q=32, h_kv=2, parts=5)
    out, lse = mod.decode(q, k, bt, sl, meta, splits, None, True, 2048.0)
    r = fake.resolves[0]
    assert all(a is b for a, b in zip(r[:6], (q, k, bt, sl, meta, splits)))
    assert r[6:] == (None, True, 2048.0, None, None, None, 1.0)      # ..., out, lse, k_scale, k_scale_value
    p = fake.launches[0]
    assert (p["q"], p["k_cache"], p["block_table"], p["cache_seqlens"], p["metadata"], p["num_splits"]) == (
        q.data_ptr(), k.data_ptr(), bt.data_ptr(), sl.data_ptr(), meta.data_ptr(), splits.data_ptr())
    assert (p["out"], p["lse"]) == (out.data_ptr(), lse.data_ptr())
    assert (p["q_batch_stride"], p["q_seq_stride"], p["q_head_stride"]) == q.stride()[:3]
    assert (p["k_block_stride"], p["k_row_stride"], p["k_head_stride"]) == k.stride()[:3]
    assert p["block_table_stride"] == 5
    assert (p["batch"], p["s_q"], p["h_q"], p["h_kv"], p["num_blocks"], p["num_parts"]) == (3, 2, 32, 2, 10, 5)
    max_splits = 3 + 5                                   # scheduler.max_total_splits: batch + partitions
    rows = 2 * 32 // 2
    assert p["max_splits"] == max_splits
    assert p["lse_accum"] - p["o_accum"] == max_splits * 2 * rows * 512 * 4   # lse_accum after o_accum
    assert p["causal"] == 1 and p["scale"] == pytest.approx(0.125)
    mod.decode(*_args(s_q=1), None, True, None)          # causal is only passed on with s_q > 1
    assert fake.launches[-1]["causal"] == 0


@needs_cpp
def test_caller_owned_outputs_reach_the_variant(fake):
    args = _args()
    out, lse = torch.empty(2, 1, 16, 512, dtype=torch.bfloat16), torch.empty(2, 16, 1)
    o, l = mod.decode(*args, None, False, None, out, lse)
    assert o is out or o.data_ptr() == out.data_ptr()
    assert (fake.launches[0]["out"], fake.launches[0]["lse"]) == (out.data_ptr(), lse.data_ptr())
    assert fake.resolves[0][9] is out and fake.resolves[0][10] is lse       # validated by the resolver
    mod.decode(*args, None, False, None)                 # without outputs: another signature
    assert len(fake.resolves) == 2


@needs_cpp
def test_cached_calls_still_check_the_data_pointers_alignment(fake):
    q, *rest = _args()
    mod.decode(q, *rest, None, False, None)
    base = torch.empty(q.numel() + 8, dtype=q.dtype)
    shifted = base[1:1 + q.numel()].view(q.shape)        # same sizes and strides, 2 bytes off alignment
    with pytest.raises(ValueError, match="q must be 16-byte aligned"):
        mod.decode(shifted, *rest, None, False, None)
    assert len(fake.resolves) == 1


@needs_cpp
def test_resolver_errors_pass_through_unchanged_and_nothing_is_cached(fake):
    def refuse(*args):
        raise ValueError("block_table must be int32")
    mod.set_resolver(refuse)
    with pytest.raises(ValueError, match="block_table must be int32"):
        mod.decode(*_args(), None, False, None)
    assert mod.num_plans() == 0


@needs_cpp
def test_uncacheable_plans_are_resolved_every_call():
    v = FakeVariant(cacheable=False)                     # what FLASH_MLA_CHECK_VALUES=1 asks for
    mod.clear_plans()
    mod.set_resolver(v.resolve)
    try:
        for _ in range(3):
            mod.decode(*_args(), None, False, None)
    finally:
        mod.set_resolver(launcher.resolve)
    assert len(v.resolves) == 3 and mod.num_plans() == 0


@needs_cpp
def test_a_failed_launch_raises_with_the_cuda_error():
    v = FakeVariant(status=700)
    mod.clear_plans()
    mod.set_resolver(v.resolve)
    try:
        with pytest.raises(RuntimeError, match="cudaError_t 700"):
            mod.decode(*_args(), None, False, None)
    finally:
        mod.set_resolver(launcher.resolve)
        mod.clear_plans()


@needs_cpp
def test_the_real_resolver_validates_like_the_python_path():
    mod.clear_plans()
    with pytest.raises(ValueError, match="CUDA"):      # CPU tensors: rejected by the full validation
        flash_mla.flash_mla_with_kvcache(*_args()[:4], 512, *_args()[4:])
    assert mod.num_plans() == 0


@needs_cpp
def test_a_new_user_db_forgets_the_cached_signatures(fake, tmp_path):
    from flash_mla import db
    mod.decode(*_args(), None, False, None)
    assert mod.num_plans() == 1
    db.set_user_db(tmp_path / "user.sqlite")
    try:
        assert mod.num_plans() == 0
    finally:
        db.set_user_db(None)


def _run(code: str, **env):
    e = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


_SCHEMAS = ("import flash_mla, torch; from flash_mla import ops; print(ops.IMPLEMENTATION); "
            "print(torch.ops.flash_mla.mla_decode.default._schema); "
            "print(torch.ops.flash_mla.mla_decode_out.default._schema)")


@needs_cpp
def test_python_operators_have_the_same_schemas():
    r = _run(_SCHEMAS, FLASH_MLA_LAUNCHER="python")
    assert r.returncode == 0, r.stderr
    impl, *schemas = r.stdout.strip().splitlines()
    assert impl == "python"
    assert schemas == [str(torch.ops.flash_mla.mla_decode.default._schema),
                       str(torch.ops.flash_mla.mla_decode_out.default._schema)]
    assert "launcher" not in r.stderr                   # chosen by the user: no warning


def test_without_a_compiler_the_python_operators_are_used_and_one_warning_says_why(tmp_path):
    r = _run(_SCHEMAS, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "python"
    warnings = [ln for ln in r.stderr.splitlines() if "C++ launcher is unavailable" in ln]
    assert len(warnings) == 1, r.stderr
    assert not list(tmp_path.glob("*/*.so"))            # nothing half-built is left under the final name


def test_a_bad_launcher_setting_is_one_clear_error():
    r = _run("import flash_mla", FLASH_MLA_LAUNCHER="fast")
    assert r.returncode != 0 and "$FLASH_MLA_LAUNCHER must be 'cpp' (default) or 'python', got 'fast'" in r.stderr


@needs_cpp
def test_a_float8_caches_scale_reaches_the_variant(fake):
    q, k, bt, sl, meta, splits = _args()
    k8 = k.to(torch.float8_e4m3fn)
    ks = torch.tensor([0.5])
    mod.decode(q, k8, bt, sl, meta, splits, None, False, None, k_scale=ks)
    assert fake.resolves[0][11] is ks and fake.resolves[0][12] == 1.0
    assert (fake.launches[0]["k_scale"], fake.launches[0]["k_scale_value"]) == (ks.data_ptr(), 1.0)
    mod.decode(q, k8, bt, sl, meta, splits, None, False, None, k_scale=torch.tensor([0.25]))  # same signature
    assert len(fake.resolves) == 1 and fake.launches[1]["k_scale"] != ks.data_ptr()
    mod.decode(q, k8, bt, sl, meta, splits, None, False, None, k_scale_value=0.75)     # a float: new signature
    assert len(fake.resolves) == 2
    assert (fake.launches[2]["k_scale"], fake.launches[2]["k_scale_value"]) == (None, 0.75)
    mod.decode(q, k, bt, sl, meta, splits, None, False, None)             # a bf16 cache: no scale
    assert (fake.launches[3]["k_scale"], fake.launches[3]["k_scale_value"]) == (None, 1.0)
