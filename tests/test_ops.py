"""The registered operators (flash_mla.ops) on the CPU: schemas, fake implementations, full-graph tracing by
torch.export and torch.compile. Their CUDA implementation is checked in test_gpu_kernels.py."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flash_mla  # noqa: F401  (registers the operators)


def _args(b=2, s_q=1, h_q=16, dtype=torch.bfloat16):
    return (torch.randn(b, s_q, h_q, 576, dtype=dtype), torch.randn(10, 64, 1, 576, dtype=dtype),
            torch.zeros(b, 5, dtype=torch.int32), torch.ones(b, dtype=torch.int32),
            torch.zeros(132, 8, dtype=torch.int32), torch.zeros(b + 1, dtype=torch.int32))


def test_schemas():
    s = str(torch.ops.flash_mla.mla_decode.default._schema)
    assert s.startswith("flash_mla::mla_decode(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, "
                        "Tensor tile_scheduler_metadata, Tensor num_splits, float? softmax_scale=None, "
                        "bool causal=False, float? seqlen_hint=None, Tensor? k_scale=None, "
                        "float k_scale_value=1.) -> (Tensor, Tensor)"), s
    s = str(torch.ops.flash_mla.mla_decode_out.default._schema)
    assert "Tensor(a6!) out, Tensor(a7!) lse" in s and s.endswith("-> ()"), s     # mutates out and lse only


@pytest.mark.parametrize("b,s_q,h_q,dtype", [(2, 1, 16, torch.bfloat16), (3, 4, 128, torch.float16)])
def test_fake_gives_flash_mlas_shapes_and_dtypes(b, s_q, h_q, dtype):
    with FakeTensorMode():
        args = _args(b, s_q, h_q, dtype)
        out, lse = torch.ops.flash_mla.mla_decode(*args, None, True, 4096.0)
        assert (out.shape, out.dtype) == ((b, s_q, h_q, 512), dtype)
        assert (lse.shape, lse.dtype) == ((b, h_q, s_q), torch.float32)
        o, l = torch.empty(b, s_q, h_q, 512, dtype=dtype), torch.empty(b, h_q, s_q)
        assert torch.ops.flash_mla.mla_decode_out(*args, o, l) is None
        with pytest.raises(ValueError, match="out must be"):
            torch.ops.flash_mla.mla_decode_out(*args, o[:, :, :1], l)
        with pytest.raises(ValueError, match="q must be"):
            torch.ops.flash_mla.mla_decode(args[0][0], *args[1:])


class _Step(torch.nn.Module):
    """A decode step as an engine writes it: the op between other tensor work."""

    def forward(self, q, k_cache, block_table, cache_seqlens, meta, splits):
        out, lse = torch.ops.flash_mla.mla_decode(q * 1.0, k_cache, block_table, cache_seqlens, meta, splits,
                                                  0.0416, True, 2048.0)
        return out.float().sum(-1), lse


def test_torch_export_traces_the_step_in_one_graph():
    ep = torch.export.export(_Step(), _args())
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.flash_mla.mla_decode.default in targets


def test_torch_compile_fullgraph_has_no_graph_break():
    graphs = []

    class Traced(Exception):
        pass

    def backend(gm, example_inputs):
        graphs.append(gm)

        def run(*a):
            raise Traced                       # tracing succeeded; the CUDA-only op cannot run on this CPU
        return run

    step = torch.compile(_Step(), backend=backend, fullgraph=True)
    with pytest.raises(Traced):
        step(*_args())
    assert len(graphs) == 1
    ops = (torch.ops.flash_mla.mla_decode, torch.ops.flash_mla.mla_decode.default)
    assert sum(n.target in ops for n in graphs[0].graph.nodes) == 1, graphs[0].graph


def test_cpu_tensors_have_no_implementation():
    with pytest.raises(NotImplementedError, match="flash_mla::mla_decode"):
        torch.ops.flash_mla.mla_decode(*_args())
