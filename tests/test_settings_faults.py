"""Settings that point at something unusable are one clear error naming the setting and the path (CPU)."""

from __future__ import annotations

import pytest

from flash_mla import db, selection
from flash_mla.codegen import build as B
from flash_mla.workload_key import WorkloadKey

ARGS = ("NVIDIA H100 80GB HBM3", 132, "13.0",
        WorkloadKey.for_call(dtype="bf16", h_q=16, h_kv=1, s_q=1, page_size=64, causal=False, batch=8,
                             mean_seqlen=4096))


@pytest.fixture(autouse=True)
def _fresh_selection():
    db.set_user_db(None)
    yield
    db.set_user_db(None)


def test_a_corrupt_user_db_names_the_variable_and_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "tuned.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    monkeypatch.setenv(db.ENV_USER_DB, str(bad))
    selection.clear_cache()
    with pytest.raises(db.UserDBError, match=r"\$FLASH_MLA_TUNING_DB points at .*tuned.sqlite.*cannot be read"):
        selection.select(*ARGS)


def test_a_folder_as_user_db_is_an_error_not_silence(tmp_path, monkeypatch):
    monkeypatch.setenv(db.ENV_USER_DB, str(tmp_path))
    selection.clear_cache()
    with pytest.raises(db.UserDBError, match="not a file"):
        selection.select(*ARGS)


def test_set_user_db_is_named_when_it_is_the_origin(tmp_path):
    bad = tmp_path / "x.sqlite"
    bad.write_bytes(b"\0" * 4096 + b"garbage")
    db.set_user_db(bad)
    with pytest.raises(db.UserDBError, match="set_user_db"):
        selection.select(*ARGS)


def test_a_missing_user_db_reads_as_empty(tmp_path, monkeypatch):
    monkeypatch.setenv(db.ENV_USER_DB, str(tmp_path / "not-yet.sqlite"))
    selection.clear_cache()
    sel = selection.select(*ARGS)          # falls through to the shipped DB or the default, no error
    assert sel.source in ("shipped", "default")


def test_a_bad_cuda_home_setting_is_not_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_MLA_CUDA_HOME", str(tmp_path / "no-cuda"))
    with pytest.raises(B.BuildError, match=r"\$FLASH_MLA_CUDA_HOME=.*no-cuda has no bin/nvcc"):
        B.cuda_home()


def test_a_bad_cutlass_setting_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_MLA_CUTLASS_INCLUDE", str(tmp_path))
    with pytest.raises(B.BuildError, match="FLASH_MLA_CUTLASS_INCLUDE"):
        B.cutlass_include()


def test_a_cache_dir_that_is_a_file_is_an_error(tmp_path, monkeypatch):
    f = tmp_path / "cache"
    f.write_text("x")
    monkeypatch.setenv("FLASH_MLA_CACHE_DIR", str(f))
    with pytest.raises(B.BuildError, match="FLASH_MLA_CACHE_DIR.*not a folder"):
        B.cache_dir()


def test_cli_environment_errors_are_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    from flash_mla import cli
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database" * 100)
    assert cli.main(["db", "show", "--db", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.sqlite cannot be read as a tuning database" in err
    monkeypatch.setenv("FLASH_MLA_CUDA_HOME", str(tmp_path / "nowhere"))
    monkeypatch.setenv("FLASH_MLA_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["build", "--variants", "default", "--dtypes", "bf16", "--page-sizes", "64"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "FLASH_MLA_CUDA_HOME" in err and "Traceback" not in err
    monkeypatch.setenv("FLASH_MLA_DEBUG", "1")                      # the traceback on request
    with pytest.raises(B.BuildError):
        cli.main(["build", "--variants", "default", "--dtypes", "bf16", "--page-sizes", "64"])
