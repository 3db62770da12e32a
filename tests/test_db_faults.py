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


def _db_with_winner(path, t=10.0):
    with db.TuningDB(path) as tdb:
        rid = tdb.add_run(H100)
        tdb.record_winner(tdb.add_trial(rid, "s", Variant(), WL, "ok", time_us=t))


@pytest.mark.parametrize("kind", ["corrupt", "foreign"])
def test_merge_refuses_what_is_not_a_tuning_db_and_writes_nothing(tmp_path, kind):
    import sqlite3
    target, good, bad = tmp_path / "target.sqlite", tmp_path / "good.sqlite", tmp_path / "bad.sqlite"
    _db_with_winner(target, 20.0)
    _db_with_winner(good, 5.0)
    if kind == "corrupt":
        bad.write_bytes(b"garbage" * 1000)
    else:                                           # some other program's sqlite file
        with sqlite3.connect(bad) as c:
            c.execute("create table foo (x)")
    before_target, before_bad = target.read_bytes(), bad.read_bytes()
    with pytest.raises(ValueError, match="bad.sqlite is not a tuning database"):
        db.merge([good, bad], target)               # the good source is not merged either
    assert target.read_bytes() == before_target and bad.read_bytes() == before_bad   # nothing stamped
    with pytest.raises(ValueError):
        db.merge([bad], tmp_path / "new.sqlite")
    assert not (tmp_path / "new.sqlite").exists()  # no empty target left behind
    assert not list(tmp_path.glob(".*.merging"))


def test_a_merge_killed_midway_leaves_the_target_byte_identical(tmp_path, monkeypatch):
    target, src = tmp_path / "target.sqlite", tmp_path / "src.sqlite"
    _db_with_winner(target, 20.0)
    _db_with_winner(src, 5.0)
    before = target.read_bytes()
    real = db._merge_one

    def dies_halfway(s, out, stats):
        real(s, out, stats)                          # rows written into the working copy ...
        raise KeyboardInterrupt("killed")            # ... then the process is interrupted
    monkeypatch.setattr(db, "_merge_one", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        db.merge([src], target)
    assert target.read_bytes() == before
    assert not list(tmp_path.glob(".*.merging"))
    monkeypatch.setattr(db, "_merge_one", real)
    stats = db.merge([src], target)
    assert stats["winners_written"] == 1
    with db.TuningDB(target, readonly=True) as t:
        assert t.winners()[0]["time_us"] == 5.0


def test_cli_merge_of_a_foreign_file_is_one_line(tmp_path):
    from flash_mla import cli
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"garbage" * 1000)
    with pytest.raises(SystemExit) as e:
        cli.main(["db", "merge", str(bad), "--into", str(tmp_path / "t.sqlite")])
    assert "bad.sqlite is not a tuning database" in str(e.value.code) and "\n" not in str(e.value.code)
    assert not (tmp_path / "t.sqlite").exists()


def _opener(path, barrier):
    barrier.wait()                                  # every process opens the new file at the same moment
    with db.TuningDB(path) as tdb:
        assert tdb.schema_version == db.SCHEMA_VERSION and tdb.winners() == []


def test_processes_creating_one_new_file_at_once_all_open_it(tmp_path):
    # Without the creation lock SQLite answered some of them "database is locked" (tuner workers on a new DB).
    ctx = mp.get_context("fork")
    for i in range(6):
        path = tmp_path / f"new{i}.sqlite"
        barrier = ctx.Barrier(8)
        procs = [ctx.Process(target=_opener, args=(path, barrier)) for _ in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0] * 8
