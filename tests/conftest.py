"""Skip hardware-dependent tests where the hardware or toolchain is missing.

Markers (declared in pyproject.toml):
    gpu   needs a CUDA device of compute capability 9.0 (H100 / H200 / H800)
    nvcc  needs the CUDA compiler (compile-only checks; no GPU required)
A test that needs both carries both markers.
"""

from __future__ import annotations

import functools
import os
import shutil

import pytest


@functools.lru_cache(maxsize=None)
def sm90_gpu_reason() -> str | None:
    """None when an SM90 GPU is usable, else why not."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device available"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        name = torch.cuda.get_device_name()
        return f"needs an SM90 GPU, found {name} (sm_{major}{minor})"
    return None


@functools.lru_cache(maxsize=None)
def find_nvcc() -> str | None:
    """Path of nvcc, searched like the build does: FLASH_MLA_CUDA_HOME / CUDA_HOME / CUDA_PATH,
    then /usr/local/cuda, then PATH."""
    homes = [os.environ.get(v) for v in ("FLASH_MLA_CUDA_HOME", "CUDA_HOME", "CUDA_PATH")]
    for home in [h for h in homes if h] + ["/usr/local/cuda"]:
        cand = os.path.join(home, "bin", "nvcc")
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return shutil.which("nvcc")


def pytest_collection_modifyitems(config, items):
    gpu_skip = nvcc_skip = None
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            reason = sm90_gpu_reason()
            if reason is not None:
                gpu_skip = gpu_skip or pytest.mark.skip(reason=f"gpu test: {reason}")
                item.add_marker(gpu_skip)
                continue
        if item.get_closest_marker("nvcc") is not None and find_nvcc() is None:
            nvcc_skip = nvcc_skip or pytest.mark.skip(reason="nvcc test: nvcc not found "
                                                      "(set CUDA_HOME or put nvcc on PATH)")
            item.add_marker(nvcc_skip)
