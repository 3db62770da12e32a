"""Build rendered variants into shared libraries with ninja + nvcc, cached by content.

Each variant becomes ``<cache>/<key>-<hash>/variant.so`` with its source and ptxas report beside it.
The hash covers the rendered source, the static headers, the nvcc version, the flags and the CUTLASS
version, so a changed template or compiler never reuses a stale binary. The cache root is
``$FLASH_MLA_CACHE_DIR`` (default ``~/.cache/flash_mla``). No GPU is needed to build.

Nothing half-written is ever taken as built. nvcc writes ``variant.so.part``; the library is then
loaded in a separate process and its ABI version checked, renamed to ``variant.so`` (atomic), and only
then is ``manifest.json`` (size and SHA-256 of the library) written, by rename too. A variant counts as
built only when its library matches its manifest; anything else (a link killed half-way, a truncated or
corrupted file) is rebuilt. A per-variant file lock makes concurrent processes (tensor-parallel ranks
starting at once) build each variant once while the others wait for it.

Serving needs no compiler: the manifest also records the *source hash* (rendered source, kernel headers,
flags; no toolchain), and :func:`find_built` finds a library of the variant's current source by that
hash alone, without nvcc or CUTLASS (``flash-mla build --from-db`` prepares them on a machine with nvcc).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import ptxas
from .render import render, static_headers
from .variant import Variant

ARCH_FLAGS = ["-gencode", "arch=compute_90a,code=sm_90a"]
NVCC_FLAGS = [
    "-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda",
    "-shared", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-lineinfo",
    "-DNDEBUG", "-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED",
]


class BuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    env = os.environ.get("FLASH_MLA_CACHE_DIR")
    root = Path(env).expanduser() if env else Path(os.path.expanduser("~")) / ".cache" / "flash_mla"
    if root.exists() and not root.is_dir():
        raise BuildError(f"{'$FLASH_MLA_CACHE_DIR' if env else 'the build cache'} {root} is not a folder")
    return root


def cuda_home() -> Path | None:
    own = os.environ.get("FLASH_MLA_CUDA_HOME")
    if own:                                      # the project's own setting is never silently replaced
        if not (Path(own) / "bin" / "nvcc").is_file():
            raise BuildError(f"$FLASH_MLA_CUDA_HOME={own} has no bin/nvcc: point it at a CUDA toolkit or unset it")
        return Path(own)
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env) and (Path(os.environ[env]) / "bin" / "nvcc").exists():
            return Path(os.environ[env])
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return Path("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parent.parent if nvcc else None


def nvcc_path() -> Path:
    home = cuda_home()
    if home is None:
        raise BuildError("nvcc not found: install the CUDA toolkit (>= 12.8) or set FLASH_MLA_CUDA_HOME")
    return home / "bin" / "nvcc"


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    out = subprocess.run([str(nvcc_path()), "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def cutlass_include() -> Path:
    env = os.environ.get("FLASH_MLA_CUTLASS_INCLUDE")
    if env:
        if not (Path(env) / "cute" / "tensor.hpp").is_file():
            raise BuildError(f"$FLASH_MLA_CUTLASS_INCLUDE={env} holds no cute/tensor.hpp: point it at CUTLASS's "
                             "include folder or unset it")
        return Path(env)
    try:
        import cutlass_library
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise BuildError("CUTLASS headers not found: pip install nvidia-cutlass "
                         "or set FLASH_MLA_CUTLASS_INCLUDE") from e
    inc = Path(cutlass_library.__file__).parent / "source" / "include"
    if not (inc / "cute" / "tensor.hpp").exists():
        raise BuildError(f"CUTLASS headers not found under {inc}")
    return inc


def _cutlass_version() -> str:
    h = cutlass_include() / "cutlass" / "version.h"
    return hashlib.sha256(h.read_bytes()).hexdigest()[:12] if h.exists() else "unknown"


def cutlass_version() -> str:
    """CUTLASS release of the headers the variants are built with (``4.2.0``), from ``cutlass/version.h``;
    ``unknown`` where it cannot be read."""
    import re
    try:
        text = (cutlass_include() / "cutlass" / "version.h").read_text()
    except (OSError, BuildError):
        return "unknown"
    parts = [re.search(rf"#define\s+CUTLASS_{n}\s+(\d+)", text) for n in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else "unknown"


def include_flags() -> list[str]:
    flags = ["-I", str(cutlass_include())]
    home = cuda_home()
    if home and (home / "include" / "cccl").exists():   # CUDA 13 keeps CCCL (cuda/std/...) here
        flags += ["-I", str(home / "include" / "cccl")]
    return flags


@dataclass
class Artifact:
    variant: Variant
    directory: Path
    ok: bool = False
    error: str = ""
    resources: dict = field(default_factory=dict)   # kernel name -> ptxas.KernelResources
    source_hash: str = ""                           # rendered source + headers + flags, no toolchain

    @property
    def library(self) -> Path:
        return self.directory / "variant.so"

    @property
    def report_path(self) -> Path:
        return self.directory / "ptxas.log"

    @property
    def partial(self) -> Path:
        return self.directory / "variant.so.part"

    @property
    def manifest(self) -> Path:
        return self.directory / "manifest.json"

    def rejection(self) -> str:
        """Why this build may not be timed as a tuning candidate ('' where it may): it failed, its decode kernel
        spills registers, or ptxas serialised its wgmmas (C75xx notes). The tuner measures none of these, so no
        such variant becomes a winner in the database."""
        if not self.ok:
            return f"compilation failed: {self.error.strip()[-300:]}" if self.error else "compilation failed"
        dec = self.resources.get("decode_kernel")
        if dec is not None and dec.spills:
            return (f"the decode kernel spills ({dec.spill_stores} B stored, {dec.spill_loads} B loaded; "
                    f"{dec.registers} registers)")
        notes = ptxas.serialised_wgmma(self.report_path.read_text()) if self.report_path.exists() else []
        if notes:
            return "ptxas serialised the wgmmas: " + "; ".join(notes)
        return ""

    def is_built(self) -> bool:
        """The library exists and matches its manifest (size and SHA-256)."""
        try:
            m = json.loads(self.manifest.read_text())
            if self.library.stat().st_size != m["size"]:
                return False
            return _sha256(self.library) == m["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """``text`` written beside ``path`` and renamed over it: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# Loads a library in a fresh process and prints its ABI version: a broken file cannot take the caller down.
_ABI_PROBE = "import ctypes, sys; print(ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_LOCAL).fmla_abi_version())"


@functools.lru_cache(maxsize=None)
def _abi_version() -> int:
    """FMLA_ABI_VERSION of templates/kernels/params.h: what every library built from it must report."""
    m = re.search(r"#define\s+FMLA_ABI_VERSION\s+(\d+)", static_headers()["kernels/params.h"])
    if not m:
        raise BuildError("templates/kernels/params.h defines no FMLA_ABI_VERSION")
    return int(m.group(1))


def _finish(a: Artifact) -> str:
    """Verify ``a.partial`` and publish it as the library; returns an error text ('' on success)."""
    if not a.partial.is_file() or a.partial.stat().st_size == 0:
        return "the compiler left no library"
    probe = subprocess.run([sys.executable, "-c", _ABI_PROBE, str(a.partial)], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"the built library does not load: {probe.stderr.strip()[-2000:]}"
    if probe.stdout.strip() != str(_abi_version()):
        return f"the built library has ABI version {probe.stdout.strip()}, the runtime expects {_abi_version()}"
    size, digest = a.partial.stat().st_size, _sha256(a.partial)
    os.replace(a.partial, a.library)
    write_atomic(a.manifest, json.dumps({"size": size, "sha256": digest, "abi": _abi_version(),
                                          "source": a.source_hash, "nvcc": nvcc_version(),
                                          "cutlass": _cutlass_version()}))
    return ""


@contextlib.contextmanager
def _locked(artifacts: list[Artifact]):
    """Hold every artifact's build lock (taken in a fixed order, so two builders cannot deadlock)."""
    files = []
    try:
        for a in sorted(artifacts, key=lambda x: str(x.directory)):
            f = open(a.directory / "build.lock", "a")
            fcntl.flock(f, fcntl.LOCK_EX)
            files.append(f)
        yield
    finally:
        for f in files:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _source_hash(source: str, headers: dict[str, str]) -> str:
    """What a library is built from, without the toolchain: found again by :func:`find_built`."""
    return _digest(source, *(headers[k] for k in sorted(headers)), " ".join(ARCH_FLAGS + NVCC_FLAGS))


def _content_hash(source: str, headers: dict[str, str]) -> str:
    """The cache folder's hash: the source hash's parts plus the compiler and CUTLASS versions."""
    return _digest(source, *(headers[k] for k in sorted(headers)), nvcc_version(),
                   " ".join(ARCH_FLAGS + NVCC_FLAGS), _cutlass_version())


def prepare(v: Variant) -> Artifact:
    """Render the variant into its cache directory (source + headers); does not compile."""
    source = render(v)
    headers = static_headers()
    d = cache_dir() / f"{v.build_key}-{_content_hash(source, headers)}"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in {"variant.cu": source, **headers}.items():
        p = d / name
        p.parent.mkdir(exist_ok=True)
        if not p.exists() or p.read_text() != text:
            write_atomic(p, text)
    return Artifact(variant=v, directory=d, source_hash=_source_hash(source, headers))


def find_built(v: Variant) -> Artifact | None:
    """A built library of ``v``'s current source, found without nvcc or CUTLASS, or None.

    Any cache entry of its build key whose manifest records the same source hash and whose library
    matches the manifest (size, SHA-256) qualifies; among several (built by different compilers) the
    newest wins. Entries built before the manifest recorded the source are not found here (``build``
    still finds them)."""
    want = _source_hash(render(v), static_headers())
    found = []
    for d in cache_dir().glob(f"{v.build_key}-*"):
        a = Artifact(variant=v, directory=d, source_hash=want)
        try:
            if json.loads(a.manifest.read_text()).get("source") != want or not a.is_built():
                continue
            found.append((a.library.stat().st_mtime, str(d), a))
        except (OSError, ValueError, AttributeError):
            continue
    if not found:
        return None
    a = max(found, key=lambda t: t[:2])[2]
    a.ok = True
    a.resources = ptxas.parse(a.report_path.read_text()) if a.report_path.exists() else {}
    return a


def _ninja() -> str:
    exe = shutil.which("ninja")
    if exe:
        return exe
    try:
        import ninja
        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError as e:  # pragma: no cover
        raise BuildError("ninja not found: pip install ninja") from e


def write_ninja(artifacts: list[Artifact], path: Path) -> None:
    flags = " ".join(ARCH_FLAGS + NVCC_FLAGS + include_flags())
    lines = [
        "ninja_required_version = 1.3",
        f"builddir = {path.parent}",
        f"nvcc = {nvcc_path()}",
        f"flags = {flags}",
        "rule nvcc",
        # ptxas -v goes to stderr; keep it (and any error) in the variant's log. $out is variant.so.part:
        # the library is published by build() only after it has been verified.
        "  command = $nvcc $flags -I $dir -o $out $in > $log 2>&1 || (cat $log; exit 1)",
        "  description = nvcc $key",
        "",
    ]
    for a in artifacts:
        lines += [
            f"build {a.partial}: nvcc {a.directory / 'variant.cu'} | "
            + " ".join(str(a.directory / h) for h in sorted(static_headers())),
            f"  dir = {a.directory}",
            f"  log = {a.report_path}",
            f"  key = {a.variant.key}",
        ]
    path.write_text("\n".join(lines) + "\n")


def build(variants: list[Variant], jobs: int | None = None, verbose: bool = False) -> list[Artifact]:
    """Compile every variant (in parallel, cached); returns one Artifact per variant, failures included."""
    artifacts = [prepare(v) for v in variants]
    errors = {}
    built = {a.directory for a in artifacts if a.is_built()}   # each library is hashed once per call
    todo = [a for a in artifacts if a.directory not in built]
    if todo:
        with _locked(todo):
            built |= {a.directory for a in todo if a.is_built()}  # another process may have built them meanwhile
            todo = [a for a in todo if a.directory not in built]
            for a in todo:
                a.partial.unlink(missing_ok=True)             # never trust what a killed build left behind
            if todo:
                ninja_dir = cache_dir() / "ninja"
                ninja_dir.mkdir(parents=True, exist_ok=True)
                tag = hashlib.sha256("".join(str(a.directory) for a in todo).encode()).hexdigest()[:12]
                nf = ninja_dir / f"build-{tag}-{os.getpid()}.ninja"
                write_ninja(todo, nf)
                cmd = [_ninja(), "-f", str(nf), "-k", "0", "-j", str(jobs or os.cpu_count() or 1)]
                # failures are reported per variant from its log below; -k 0 keeps building the others
                subprocess.run(cmd, capture_output=not verbose, text=True)
                nf.unlink(missing_ok=True)
                for a in todo:
                    if a.partial.exists():
                        errors[a.directory] = _finish(a)
                        a.partial.unlink(missing_ok=True)
                        if not errors[a.directory]:
                            built.add(a.directory)
    for a in artifacts:
        if a.directory in built:
            a.ok = True
            a.resources = ptxas.parse(a.report_path.read_text()) if a.report_path.exists() else {}
        else:
            a.error = (errors.get(a.directory) or
                       (a.report_path.read_text()[-4000:] if a.report_path.exists() else "not built"))
    return artifacts


def build_one(v: Variant) -> Artifact:
    a = build([v])[0]
    if not a.ok:
        raise BuildError(f"building {v.key} failed:\n{a.error}")
    return a
