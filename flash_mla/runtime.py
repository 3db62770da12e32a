"""Load built variants (shared libraries with a C ABI) and launch them on torch tensors.

The ABI is ``templates/kernels/params.h``; ``FmlaParams`` below mirrors it field for field. Launching reads
only tensor metadata (pointers, strides, shapes) on the host: no device sync, so it is CUDA-graph safe.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

ABI_VERSION = 4
from .constants import HEAD_DIM_V, METADATA_SIZE


class FmlaParams(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p), ("k_cache", ctypes.c_void_p), ("block_table", ctypes.c_void_p),
        ("cache_seqlens", ctypes.c_void_p), ("metadata", ctypes.c_void_p), ("num_splits", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("o_accum", ctypes.c_void_p),
        ("lse_accum", ctypes.c_void_p),
        ("q_batch_stride", ctypes.c_int64), ("q_seq_stride", ctypes.c_int64), ("q_head_stride", ctypes.c_int64),
        ("k_block_stride", ctypes.c_int64), ("k_row_stride", ctypes.c_int64), ("k_head_stride", ctypes.c_int64),
        ("block_table_stride", ctypes.c_int64),
        ("batch", ctypes.c_int32), ("s_q", ctypes.c_int32), ("h_q", ctypes.c_int32), ("h_kv", ctypes.c_int32),
        ("num_blocks", ctypes.c_int32), ("num_parts", ctypes.c_int32), ("max_splits", ctypes.c_int32),
        ("causal", ctypes.c_int32), ("scale", ctypes.c_float),
        ("k_scale", ctypes.c_void_p), ("k_scale_value", ctypes.c_float),
    ]


class KernelLaunchError(RuntimeError):
    pass


class Library:
    """One built variant, loaded once per process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lib = ctypes.CDLL(str(self.path), mode=ctypes.RTLD_LOCAL)
        self._lib.fmla_launch.argtypes = [ctypes.POINTER(FmlaParams), ctypes.c_void_p]
        self._lib.fmla_launch.restype = ctypes.c_int
        self._lib.fmla_variant_key.restype = ctypes.c_char_p
        abi = self._lib.fmla_abi_version()
        if abi != ABI_VERSION:
            raise KernelLaunchError(f"{self.path}: ABI version {abi}, runtime expects {ABI_VERSION}; rebuild it")
        self._lib.fmla_schedule.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4 + [ctypes.c_void_p]
        self._lib.fmla_schedule.restype = ctypes.c_int
        self.key = self._lib.fmla_variant_key().decode()
        # the C entry point's address, for the C++ launcher (flash_mla/csrc/launcher.cpp) to call directly
        self.entry_address = ctypes.cast(self._lib.fmla_launch, ctypes.c_void_p).value

    def launch(self, params: FmlaParams, stream: int) -> None:
        err = self._lib.fmla_launch(ctypes.byref(params), ctypes.c_void_p(stream))
        if err:
            raise KernelLaunchError(f"variant {self.key}: launch failed with cudaError_t {err} "
                                    "(see cuda_runtime_api.h; run under compute-sanitizer for details)")


    def schedule(self, cache_seqlens, num_parts: int, overhead: int, min_payload: int):
        """flash_mla/scheduler.py's ``schedule`` in one kernel launch on the current stream (bit-identical to it,
        no host sync): ``(tile_scheduler_metadata (num_parts, 8) int32, num_splits (b + 1,) int32)``."""
        dev = cache_seqlens.device
        lens = cache_seqlens.contiguous()
        b = lens.shape[0]
        meta = torch.empty((num_parts, METADATA_SIZE), dtype=torch.int32, device=dev)
        splits = torch.empty(b + 1, dtype=torch.int32, device=dev)
        workspace = torch.empty(b + 1, dtype=torch.int64, device=dev)
        err = self._lib.fmla_schedule(lens.data_ptr(), meta.data_ptr(), splits.data_ptr(), workspace.data_ptr(),
                                      b, num_parts, overhead, min_payload, torch.cuda.current_stream(dev).cuda_stream)
        if err:
            raise KernelLaunchError(f"variant {self.key}: the schedule kernel's launch failed with cudaError_t {err}")
        return meta, splits


_libs: dict[str, Library] = {}
_lock = threading.Lock()


def load(path: Path | str) -> Library:
    key = str(path)
    lib = _libs.get(key)
    if lib is None:
        with _lock:
            lib = _libs.get(key) or Library(Path(path))
            _libs[key] = lib
    return lib


def run_decode(lib: Library, q, k_cache, block_table, cache_seqlens, metadata, num_splits,
               softmax_scale: float, causal: bool, out=None, lse=None, k_scale=None, k_scale_value: float = 1.0):
    """Launch decode + combine on the current stream into ``out``/``lse`` (allocated when None).

    Returns ``(out, lse)``. Passing buffers lets correctness checks poison them beforehand. A float8 KV cache
    is dequantised as stored value * ``k_scale_value`` * ``k_scale[0]`` (``k_scale``: a one-element float32
    tensor on q's device, or None).
    """
    b, s_q, h_q, _ = q.shape
    num_blocks, _, h_kv, _ = k_cache.shape
    rows = s_q * (h_q // h_kv)
    num_parts = metadata.shape[0]
    max_splits = num_splits.shape[0] - 1 + num_parts        # scheduler.max_total_splits
    dev = q.device
    if out is None:
        out = torch.empty((b, s_q, h_q, HEAD_DIM_V), dtype=q.dtype, device=dev)
    if lse is None:
        lse = torch.empty((b, h_q, s_q), dtype=torch.float32, device=dev)
    assert out.shape == (b, s_q, h_q, HEAD_DIM_V) and out.is_contiguous() and out.dtype == q.dtype
    assert lse.shape == (b, h_q, s_q) and lse.is_contiguous() and lse.dtype == torch.float32
    o_accum = torch.empty((max_splits, h_kv, rows, HEAD_DIM_V), dtype=torch.float32, device=dev)
    lse_accum = torch.empty((max_splits, h_kv, rows), dtype=torch.float32, device=dev)
    p = FmlaParams(
        q=q.data_ptr(), k_cache=k_cache.data_ptr(), block_table=block_table.data_ptr(),
        cache_seqlens=cache_seqlens.data_ptr(), metadata=metadata.data_ptr(), num_splits=num_splits.data_ptr(),
        out=out.data_ptr(), lse=lse.data_ptr(), o_accum=o_accum.data_ptr(), lse_accum=lse_accum.data_ptr(),
        q_batch_stride=q.stride(0), q_seq_stride=q.stride(1), q_head_stride=q.stride(2),
        k_block_stride=k_cache.stride(0), k_row_stride=k_cache.stride(1), k_head_stride=k_cache.stride(2),
        block_table_stride=block_table.stride(0),
        batch=b, s_q=s_q, h_q=h_q, h_kv=h_kv, num_blocks=num_blocks, num_parts=num_parts,
        max_splits=max_splits, causal=int(bool(causal) and s_q > 1), scale=float(softmax_scale),
        k_scale=None if k_scale is None else k_scale.data_ptr(), k_scale_value=float(k_scale_value),
    )
    lib.launch(p, torch.cuda.current_stream(dev).cuda_stream)
    return out, lse
