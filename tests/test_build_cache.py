"""Fault injection on the build cache, with a fake nvcc (a C compiler building a stub library), so no CUDA
toolkit and no GPU are needed: a link killed half-way, truncated and corrupted libraries, a library that
does not load, and concurrent builders of one variant."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from flash_mla.codegen import build as B
from flash_mla.codegen.variant import Variant
from flash_mla.runtime import ABI_VERSION

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc) for the fake nvcc")

FAKE_NVCC = r'''#!/bin/sh
# Stand-in for nvcc: '--version', else build a stub C library at '-o OUT'.
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 99.9, fake for tests"; exit 0; fi
out=""
while [ $# -gt 0 ]; do case "$1" in -o) out="$2"; shift 2;; *) shift;; esac; done
echo "ptxas info    : Used 32 registers, used 0 barriers" >&2
[ -n "$FAKE_NVCC_LOG" ] && echo "$out" >> "$FAKE_NVCC_LOG"
[ -n "$FAKE_NVCC_SLEEP" ] && sleep "$FAKE_NVCC_SLEEP"
if [ -n "$FAKE_NVCC_GARBAGE" ]; then head -c 4096 /dev/urandom > "$out"; exit 0; fi
exec cc -shared -fPIC -o "$out" "$FAKE_STUB_C"
'''
STUB_C = ("int fmla_abi_version(void) { return %d; }\nconst char* fmla_variant_key(void) { return \"fake\"; }\n"
          % ABI_VERSION)


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    cuda = tmp_path / "cuda" / "bin"
    cuda.mkdir(parents=True)
    nvcc = cuda / "nvcc"
    nvcc.write_text(FAKE_NVCC)
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    stub = tmp_path / "stub.c"
    stub.write_text(STUB_C)
    log = tmp_path / "nvcc.log"
    env = {"FLASH_MLA_CUDA_HOME": str(tmp_path / "cuda"), "FLASH_MLA_CACHE_DIR": str(tmp_path / "cache"),
           "FAKE_STUB_C": str(stub), "FAKE_NVCC_LOG": str(log)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    B.nvcc_version.cache_clear()
    yield {"log": log, "env": env}
    B.nvcc_version.cache_clear()


def _compiles(log):
    return log.read_text().splitlines() if log.exists() else []


def test_a_build_is_published_only_with_its_manifest(fake_env):
    (a,) = B.build([Variant()], jobs=1)
    assert a.ok, a.error
    assert a.library.is_file() and a.manifest.is_file() and not a.partial.exists()
    assert a.is_built()
    (again,) = B.build([Variant()], jobs=1)
    assert again.ok and len(_compiles(fake_env["log"])) == 1        # cached: no second compile


@pytest.mark.parametrize("fault", ["truncated", "no_manifest", "corrupted", "empty"])
def test_a_damaged_library_is_rebuilt(fake_env, fault):
    (a,) = B.build([Variant()], jobs=1)
    data = a.library.read_bytes()
    if fault == "truncated":                      # a link killed half-way through writing the file
        a.library.write_bytes(data[: len(data) // 2])
    elif fault == "no_manifest":                  # killed between publishing the library and its manifest
        a.manifest.unlink()
    elif fault == "corrupted":                    # same size, flipped bytes
        a.library.write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:200]) + data[200:])
    else:
        a.library.write_bytes(b"")
    assert not a.is_built()
    (b,) = B.build([Variant()], jobs=1)
    assert b.ok and b.is_built() and len(_compiles(fake_env["log"])) == 2
    assert b.library.read_bytes() != b"" and b.library.stat().st_size == len(data)


def test_a_leftover_partial_file_is_never_published(fake_env):
    a = B.prepare(Variant())
    a.partial.write_bytes(b"\x7fELF half a library")           # what a killed nvcc leaves
    (b,) = B.build([Variant()], jobs=1)
    assert b.ok and not b.partial.exists() and len(_compiles(fake_env["log"])) == 1


def test_a_library_that_does_not_load_is_rejected(fake_env, monkeypatch):
    monkeypatch.setenv("FAKE_NVCC_GARBAGE", "1")
    (a,) = B.build([Variant()], jobs=1)
    assert not a.ok and "does not load" in a.error
    assert not a.library.exists() and not a.partial.exists()
    with pytest.raises(B.BuildError, match="does not load"):
        B.build_one(Variant())


def test_concurrent_builders_compile_once_and_all_see_a_whole_library(fake_env, tmp_path):
    env = {**os.environ, **fake_env["env"], "FAKE_NVCC_SLEEP": "1"}
    code = textwrap.dedent("""
        from flash_mla.codegen.build import build
        from flash_mla.codegen.variant import Variant
        (a,) = build([Variant()], jobs=1)
        assert a.ok and a.is_built(), a.error
        print(a.library.stat().st_size)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    sizes = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        sizes.append(int(out.split()[-1]))
    assert len(set(sizes)) == 1 and sizes[0] > 0
    assert len(_compiles(fake_env["log"])) == 1


def test_a_built_variant_is_found_without_a_compiler(fake_env, tmp_path, monkeypatch):
    v, other = Variant(), Variant(stages=3, block_n=32)
    (a,) = B.build([v], jobs=1)
    assert a.ok, a.error
    manifest = __import__("json").loads(a.manifest.read_text())
    assert manifest["source"] == a.source_hash and "fake" in manifest["nvcc"]
    # serving machine: no CUDA toolkit at all
    monkeypatch.setenv("FLASH_MLA_CUDA_HOME", str(tmp_path / "no-cuda"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    B.nvcc_version.cache_clear()
    with pytest.raises(B.BuildError, match="FLASH_MLA_CUDA_HOME"):
        B.nvcc_path()                                   # a compile would fail here ...
    found = B.find_built(v)                             # ... finding the built one does not need it
    assert found is not None and found.ok and found.library == a.library
    assert B.find_built(other) is None                  # another variant's source: not built
    a.library.write_bytes(a.library.read_bytes()[:100])   # a truncated library is never taken
    assert B.find_built(v) is None


def test_serving_without_a_compiler_names_the_missing_variant(fake_env, tmp_path, monkeypatch):
    from flash_mla import dispatch
    monkeypatch.setenv("FLASH_MLA_CUDA_HOME", str(tmp_path / "no-cuda"))
    B.nvcc_version.cache_clear()
    v = Variant(stages=3, block_n=32)
    with pytest.raises(B.BuildError, match=f"variant {v.key} has no built library .*flash-mla build --from-db"):
        dispatch.library_for.__wrapped__(v)
