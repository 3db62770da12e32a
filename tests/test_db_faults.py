"""Fault injection on the tuning database (CPU): concurrent winner writers, export onto its own file."""

from __future__ import annotations

import multiprocessing as mp
import random

import pytest

from flash_mla import db
from flash_mla.codegen.variant import Variant

H100 = {"gpu_name": "NVIDIA H100 80GB HBM3", "sm_count": 132, "cuda_version": "13.0", "driver_version": None,
        "torch_version": "x", "package_version": "0", "hostname": "gpu-a"}
WL = {"dtype": "bf16", "h_q": 16, "h_kv": 1, "s_q": 1, "page_size": 64, "causal": False, "batch": 8,
      "mean_sk": 4096}


def _writer(path, times, barrier):
    with db.TuningDB(path) as tdb:
        rid = tdb.add_run(H100)
        ids = [tdb.add_trial(rid, "s", Variant(), WL, "ok", time_us=t) for t in times]
        barrier.wait()                              # all writers race on the same winner row from here
        for tid in ids:
            tdb.record_winner(tid)


def test_concurrent_writers_keep_the_true_minimum(tmp_path):
    path = tmp_path / "t.sqlite"
    db.TuningDB(path).close()
    rng = random.Random(7)
    per_writer = [[rng.uniform(10.0, 100.0) for _ in range(25)] for _ in range(4)]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_writer, args=(path, ts, barrier)) for ts in per_writer]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    with db.TuningDB(path, readonly=True) as tdb:
        (w,) = tdb.winners()
        assert w["time_us"] == min(min(ts) for ts in per_writer)
        assert len(tdb.trials()) == 100


def test_a_losing_update_leaves_no_open_transaction(tmp_path):
    with db.TuningDB(tmp_path / "t.sqlite") as tdb:
        rid = tdb.add_run(H100)
        fast = tdb.add_trial(rid, "s", Variant(), WL, "ok", time_us=10.0)
        slow = tdb.add_trial(rid, "s", Variant(), WL, "ok", time_us=20.0)
        assert tdb.record_winner(fast) and not tdb.record_winner(slow)
        assert not tdb.db.conn.in_transaction
        assert tdb.winners()[0]["time_us"] == 10.0


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_export_refuses_its_own_file_and_leaves_it_intact(tmp_path, fmt):
    path = tmp_path / "t.sqlite"
    with db.TuningDB(path) as tdb:
        rid = tdb.add_run(H100)
        tdb.record_winner(tdb.add_trial(rid, "s", Variant(), WL, "ok", time_us=10.0))
    before = path.read_bytes()
    with db.TuningDB(path, readonly=True) as tdb:
        with pytest.raises(ValueError, match="onto itself"):
            tdb.export(path, fmt=fmt)
        with pytest.raises(ValueError, match="onto itself"):
            tdb.export(tmp_path / "." / "t.sqlite", fmt=fmt)          # the same file by another name
        tdb.export(tmp_path / "out", fmt=fmt)
    assert path.read_bytes() == before
    assert (tmp_path / "out").stat().st_size > 0
    assert not list(tmp_path.glob(".out.*.tmp"))                    # written whole, then renamed


def test_cli_export_onto_itself_is_one_line_and_a_failing_exit(tmp_path, capsys):
    from flash_mla import cli
    path = tmp_path / "t.sqlite"
    db.TuningDB(path).close()
    before = path.read_bytes()
    with pytest.raises(SystemExit) as e:
        cli.main(["db", "export", "--db", str(path), "--out", str(path)])
    assert e.value.code != 0 and "onto itself" in str(e.value.code)
    assert path.read_bytes() == before
