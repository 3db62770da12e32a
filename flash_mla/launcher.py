"""The C++ launcher (``flash_mla/csrc/launcher.cpp``): the decode call's host side without Python per call.

It defines ``torch.ops.flash_mla.mla_decode`` / ``mla_decode_out`` in C++ (schema and CUDA kernel) and gives
``flash_mla_with_kvcache`` a direct entry. A call whose signature (every tensor's sizes, strides, dtype and
device, the scale, the causal flag, the length hint) was seen before launches from C++: argument validation,
the tuning-DB selection and the library load ran once for that signature, in :func:`resolve`.

It is one small library per install and torch version (not per variant), built on first import with the
C++ compiler torch's extension builder uses (about 20 s) into ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``), under a file lock, written to a temporary name and renamed; later imports load
it without a compiler. ``FLASH_MLA_LAUNCHER=python`` skips it: the operators are then defined in Python
(:mod:`flash_mla.ops`) and every call validates and selects in Python. Where it cannot be built, the same
happens and one warning on the ``flash_mla`` logger says why.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger("flash_mla")

ENV = "FLASH_MLA_LAUNCHER"          # "python": do not build or load the C++ launcher


class LauncherUnavailable(RuntimeError):
    """The C++ launcher could not be built or loaded here."""


def _source() -> Path:
    return Path(__file__).parent / "csrc" / "launcher.cpp"


def _include_dir() -> Path:
    return Path(str(resources.files("flash_mla.templates"))) / "kernels"


def _digest() -> str:
    h = hashlib.sha256(_source().read_bytes())
    for name in ("params.h", "mla_constants.h"):
        h.update(b"\0" + (_include_dir() / name).read_bytes())
    h.update(f"\0{torch.__version__}\0{sys.version_info[:2]}\0{sys.implementation.cache_tag}".encode())
    return h.hexdigest()[:12]


def module_name() -> str:
    return f"flash_mla_launcher_{_digest()}"


def build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "torch_extensions")
    return Path(root) / module_name()


def library_path() -> Path:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return build_dir() / f"{module_name()}{suffix}"


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(module_name(), str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _locked(d: Path):
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_BUILD = """
import sys
from torch.utils import cpp_extension
name, source, include, work = sys.argv[1:]
mod = cpp_extension.load(name=name, sources=[source], extra_include_paths=[include], extra_cflags=["-O2"],
                         build_directory=work, verbose=False)
print(mod.__file__)
"""


def build() -> Path:
    """Build the launcher for this torch and source if it is not built yet; returns the library's path.
    Concurrent processes build it once (file lock); the library appears under its final name only complete."""
    lib = library_path()
    if lib.is_file():
        return lib
    with _locked(build_dir()):
        if lib.is_file():
            return lib
        work = build_dir() / "build"
        work.mkdir(exist_ok=True)
        log.info("flash_mla: building the C++ launcher (once per install and torch version) in %s", work)
        # In a child process: torch's builder also imports what it built, and a second library defining the
        # flash_mla operators in this process would be fatal.
        r = subprocess.run([sys.executable, "-c", _BUILD, module_name(), str(_source()), str(_include_dir()),
                            str(work)], capture_output=True, text=True)
        if r.returncode != 0:
            lines = [ln for ln in (r.stderr + r.stdout).strip().splitlines() if ln.strip()]
            why = next((ln for ln in lines if "error:" in ln), None) or next(
                (ln for ln in reversed(lines) if ln.startswith(("RuntimeError", "OSError"))),
                lines[-1] if lines else f"exit status {r.returncode}")
            raise LauncherUnavailable(f"building the C++ launcher failed: {why.strip()}")
        src = Path(r.stdout.strip().splitlines()[-1])
        part = lib.with_name(lib.name + ".part")
        shutil.copyfile(src, part)
        os.replace(part, lib)
    return lib


@functools.lru_cache(maxsize=1)
def module():
    """The loaded launcher module (defines the operators), or None where ``FLASH_MLA_LAUNCHER=python`` or it
    cannot be built here (one warning says why). Loaded once per process."""
    choice = os.environ.get(ENV, "").strip().lower()
    if choice == "python":
        return None
    if choice not in ("", "cpp"):
        raise ValueError(f"${ENV} must be 'cpp' (default) or 'python', got {os.environ[ENV]!r}")
    try:
        lib = library_path()
        mod = _import(lib if lib.is_file() else build())
    except (LauncherUnavailable, OSError, ImportError) as e:
        log.warning("flash_mla: the C++ launcher is unavailable (%s); decode calls validate and select in Python "
                    "on every call (tens of microseconds more host time). Set %s=python to silence this.", e, ENV)
        return None
    mod.set_resolver(resolve)
    from . import db
    db.on_user_db_change(mod.clear_plans)          # a new user DB can change the selection of a known signature
    return mod


def resolve(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, softmax_scale, causal,
            seqlen_hint, out, lse, k_scale=None, k_scale_value=1.0):
    """The first call of a signature: full validation, selection and library load (the same as the Python
    path, :func:`flash_mla.api.prepare`). Returns ``(entry point address, softmax scale, cacheable)``; not
    cacheable when ``$FLASH_MLA_CHECK_VALUES`` asks for the per-call value checks."""
    from .api import prepare
    from .validation import values_check_enabled
    lib, scale = prepare(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                         softmax_scale, causal, seqlen_hint=seqlen_hint, out=out, lse=lse, k_scale=k_scale,
                         k_scale_value=k_scale_value)
    return lib.entry_address, float(scale), not values_check_enabled()
