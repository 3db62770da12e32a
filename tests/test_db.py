"""Tuning database: schema and versioning, runs / trials / winners, export, merge, buckets (CPU only)."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest

from flash_mla import db
from flash_mla.codegen.variant import Variant

H100 = {"gpu_name": "NVIDIA H100 80GB HBM3", "sm_count": 132, "cuda_version": "12.8",
        "driver_version": "570.86", "torch_version": "2.11.0", "package_version": "0.1.0",
        "hostname": "gpu-a"}
WL = {"dtype": "bf16", "h_q": 128, "h_kv": 1, "s_q": 1, "page_size": 64, "causal": False,
      "batch": 64, "mean_sk": 3000, "capacity_tokens": 4096}


def _run(tdb, **over):
    return tdb.add_run({**H100, **over})


# -- schema ----------------------------------------------------------------------------------------

def test_schema_created_with_version(tmp_path):
    path = tmp_path / "sub" / "t.sqlite"
    with db.TuningDB(path) as tdb:
        assert tdb.schema_version == db.SCHEMA_VERSION == 2
        assert {"meta", "runs", "trials", "winners"} <= set(tdb.db.table_names())
        assert tdb.db["winners"].pks == list(db.WORKLOAD_KEY)
    with db.open_db(path) as again:                 # reopening keeps the file as it is
        assert again.schema_version == 2
        assert again.runs() == [] and again.trials() == [] and again.winners() == []


def _db_with_schema_version(path, version):
    """A fresh database whose stored schema version is then overwritten with ``version``."""
    db.TuningDB(path).close()
    con = sqlite3.connect(path)
    con.execute("update meta set value = ? where key = 'schema_version'", (str(version),))
    con.commit()
    con.close()
    return path


def test_newer_schema_raises(tmp_path):
    path = _db_with_schema_version(tmp_path / "t.sqlite", 3)
    with pytest.raises(db.SchemaVersionError, match="schema version 3"):
        db.TuningDB(path)
    with pytest.raises(db.SchemaVersionError):
        db.TuningDB(path, readonly=True)


def test_absent_version_is_created(tmp_path):
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("create table notes (x text)")
    con.commit()
    con.close()
    with db.TuningDB(path, readonly=True) as ro:       # read-only: never written, reads as empty
        assert ro.schema_version == 0 and ro.winners() == [] and ro.trials() == []
    with db.TuningDB(path) as tdb:
        assert tdb.schema_version == 2
        assert {"notes", "runs", "trials", "winners"} <= set(tdb.db.table_names())


def _schema1_db(path):
    """A database as schema 1 wrote it (no provenance columns), with one run, trial and winner."""
    import sqlite_utils
    v1 = {t: {c: typ for c, typ in cols.items() if c not in db._V2_COLUMNS[t]} for t, cols in db.TABLES.items()}
    d = sqlite_utils.Database(path)
    d["meta"].insert({"key": "schema_version", "value": "1"}, pk="key")
    d["runs"].create(v1["runs"], pk="id")
    d["trials"].create(v1["trials"], pk="id")
    d["winners"].create(v1["winners"], pk=db.WORKLOAD_KEY)
    d["runs"].insert({"id": 1, "gpu_name": "NVIDIA H100 80GB HBM3", "sm_count": 132, "cuda_version": "13.0",
                      "hostname": "old", "created_at": "2026-11-01"})
    key = {"gpu_name": "NVIDIA H100 80GB HBM3", "sm_count": 132, "cuda_version": "13.0", "dtype": "bf16",
           "h_q": 128, "h_kv": 1, "s_q": 1, "head_dim": 576, "head_dim_v": 512, "page_size": 64, "causal": 0,
           "batch_bucket": 64, "seqlen_bucket": 4096}
    d["trials"].insert({"id": 1, "run_id": 1, "study": "s", "variant_key": Variant().key,
                        "variant_json": json.dumps(Variant().as_dict()), "state": "ok", "time_us": 9.0,
                        "created_at": "2026-11-01", **key})
    d["winners"].insert({**key, "variant_key": Variant().key, "variant_json": json.dumps(Variant().as_dict()),
                         "time_us": 9.0, "run_id": 1, "updated_at": "2026-11-01"})
    d.conn.close()
    return path


def test_schema1_file_is_read_as_is_and_migrated_on_write(tmp_path):
    path = _schema1_db(tmp_path / "v1.sqlite")
    with db.TuningDB(path, readonly=True) as ro:          # read-only: readable, never changed
        assert ro.schema_version == 1 and ro.winners()[0]["time_us"] == 9.0
        assert "time_spread" not in ro.winners()[0]
    with db.TuningDB(path) as tdb:                        # writable: the provenance columns are added
        assert tdb.schema_version == 2
        for table, cols in db._V2_COLUMNS.items():
            assert set(cols) <= set(tdb.db[table].columns_dict), table
        (w,) = tdb.winners()
        assert w["time_us"] == 9.0 and w["time_spread"] is None and w["source_hash"] is None
        assert tdb.trials()[0]["phase"] is None
    assert db.merge([_schema1_db(tmp_path / "v1b.sqlite")], tmp_path / "new.sqlite")["trials_added"] == 1


def test_readonly_missing_file_and_no_writes(tmp_path):
    with pytest.raises(FileNotFoundError):
        db.TuningDB(tmp_path / "nope.sqlite", readonly=True)
    assert not (tmp_path / "nope.sqlite").exists()
    path = tmp_path / "t.sqlite"
    db.TuningDB(path).close()
    with db.TuningDB(path, readonly=True) as ro, pytest.raises(PermissionError):
        ro.add_run(H100)


# -- runs, trials, winners -------------------------------------------------------------------------

def test_round_trip(tmp_path):
    with db.TuningDB(tmp_path / "t.sqlite") as tdb:
        rid = _run(tdb, cuda_version="12.8.1")
        run = tdb.runs()[0]
        assert run["id"] == rid and run["hostname"] == "gpu-a" and run["cuda_version"] == "12.8.1"
        assert run["created_at"].endswith("+00:00")
        v = Variant(block_n=32, stages=3)
        ok = tdb.add_trial(rid, "s1", v, WL, "ok", time_us=40.0, gbs=2500.0, tflops=300.0)
        bad = tdb.add_trial(rid, "s1", {"dtype": "bf16", "page_size": 64, "stages": 4}, WL, "failed_check",
                            time_us=12.0, error={"max_abs": 0.5})
        t_ok, t_bad = tdb.trials()
        assert (t_ok["id"], t_bad["id"]) == (ok, bad)
        assert t_ok["variant_key"] == v.key and t_ok["build_key"] == v.build_key
        assert json.loads(t_ok["variant_json"]) == v.as_dict()
        # a plain dict is stored as given, named by its content (the database does not interpret variants)
        assert json.loads(t_bad["variant_json"]) == {"dtype": "bf16", "page_size": 64, "stages": 4}
        assert t_bad["variant_key"].startswith("custom_") and t_bad["build_key"] == t_bad["variant_key"]
        assert t_ok["gpu_name"] == H100["gpu_name"] and t_ok["sm_count"] == 132
        assert t_ok["cuda_version"] == "12.8"           # keyed by major.minor
        assert (t_ok["head_dim"], t_ok["head_dim_v"], t_ok["causal"]) == (576, 512, 0)
        assert (t_ok["batch_bucket"], t_ok["seqlen_bucket"], t_ok["batch"], t_ok["mean_sk"]) == (64, 4096, 64, 3000)
        assert (t_ok["time_us"], t_ok["gbs"], t_ok["tflops"]) == (40.0, 2500.0, 300.0)
        assert t_bad["time_us"] is None and json.loads(t_bad["error"]) == {"max_abs": 0.5}
        assert [t["id"] for t in tdb.trials(state="ok")] == [ok]
        assert [t["id"] for t in tdb.trials(state=["ok", "failed_check"], study="s1")] == [ok, bad]
        assert tdb.trials(study="other") == []

        assert tdb.record_winner(ok, default_variant_key=Variant().key, default_time_us=50.0, n_trials=2)
        (w,) = tdb.winners()
        assert w["variant_key"] == v.key and w["time_us"] == 40.0 and w["run_id"] == rid
        assert (w["default_variant_key"], w["default_time_us"], w["n_trials"]) == (Variant().key, 50.0, 2)
        assert tdb.winners(gpu_name=H100["gpu_name"], cuda_version="12.8.4", causal=False) == [w]
        assert tdb.winners(dtype="fp16") == []
        (row,) = tdb.show()
        assert row["variant"] == v.key and row["speedup"] == pytest.approx(1.25)
        assert v.key in db.format_rows(tdb.show())
        assert db.format_rows([]) == "(no rows)"


def test_seqlen_bucket_sources(tmp_path):
    with db.TuningDB(tmp_path / "t.sqlite") as tdb:
        rid = _run(tdb)
        base = {k: WL[k] for k in ("dtype", "h_q", "h_kv", "s_q", "page_size", "causal", "batch")}
        ids = [tdb.add_trial(rid, None, Variant(), {**base, "mean_sk": 1000}, "ok", time_us=1.0),
               tdb.add_trial(rid, None, Variant(), {**base, "mean_sk": 1000, "max_sk": 3000}, "ok", time_us=1.0),
               tdb.add_trial(rid, None, Variant(), {**base, "max_sk": 3000}, "ok", time_us=1.0),
               tdb.add_trial(rid, None, Variant(), {**base, "mean_sk": 1000, "seqlen_bucket": 64}, "ok",
                             time_us=1.0),
               tdb.add_trial(rid, None, Variant(), {**base, "mean_sk": 1000, "seqlen_bucket": db.NO_HINT}, "ok",
                             time_us=1.0)]
        # the key buckets the mean length (max_sk only without one); an explicit bucket wins, NO_HINT too
        assert [t["seqlen_bucket"] for t in tdb.trials(id=ids)] == [1024, 1024, 4096, 64, db.NO_HINT]


def test_add_trial_validation(tmp_path):
    with db.TuningDB(tmp_path / "t.sqlite") as tdb:
        rid = _run(tdb)
        with pytest.raises(ValueError, match="state"):
            tdb.add_trial(rid, "s", Variant(), WL, "weird")
        with pytest.raises(ValueError, match="time_us"):
            tdb.add_trial(rid, "s", Variant(), WL, "ok")
        with pytest.raises(ValueError, match="unknown workload"):
            tdb.add_trial(rid, "s", Variant(), {**WL, "bogus": 1}, "crashed")
        with pytest.raises(ValueError, match="dtype"):
            tdb.add_trial(rid, "s", Variant(dtype="fp16"), WL, "crashed")
        with pytest.raises(ValueError, match="no run"):
            tdb.add_trial(rid + 10, "s", Variant(), WL, "crashed")
        with pytest.raises(ValueError, match="lacks"):
            tdb.add_trial(rid, "s", Variant(), {"h_q": 128}, "crashed")
        with pytest.raises(ValueError, match="unknown run"):
            tdb.add_run({**H100, "colour": "green"})
        assert tdb.trials() == []


def test_record_winner_keeps_faster(tmp_path):
    with db.TuningDB(tmp_path / "t.sqlite") as tdb:
        rid = _run(tdb)
        t10 = tdb.add_trial(rid, "s", Variant(stages=1), WL, "ok", time_us=10.0)
        t8 = tdb.add_trial(rid, "s", Variant(stages=2), WL, "ok", time_us=8.0)
        t12 = tdb.add_trial(rid, "s", Variant(stages=3), WL, "ok", time_us=12.0)
        t8b = tdb.add_trial(rid, "s", Variant(stages=4, block_n=32), WL, "ok", time_us=8.0)
        assert tdb.record_winner(t10) is True
        assert tdb.record_winner(t8) is True
        assert tdb.record_winner(t12) is False
        assert tdb.record_winner(t8b) is False            # a tie keeps the stored winner
        (w,) = tdb.winners()
        assert (w["variant_key"], w["time_us"]) == (Variant(stages=2).key, 8.0)
        # another bucket is another key
        t_other = tdb.add_trial(rid, "s", Variant(), {**WL, "batch": 1}, "ok", time_us=99.0)
        assert tdb.record_winner(t_other) is True
        assert len(tdb.winners()) == 2 and len(tdb.winners(batch_bucket=1)) == 1


def test_same_source_winners_compare_against_their_own_runs_default(tmp_path):
    with db.TuningDB(tmp_path / "t.sqlite") as tdb:
        rid = _run(tdb)
        first = tdb.add_trial(rid, "s", Variant(stages=1), WL, "ok", time_us=8.0, source_hash="aaaa")
        # another day: every time 10% higher, and a variant 10% faster than that day's default
        later = tdb.add_trial(rid, "s", Variant(stages=2), WL, "ok", time_us=8.5, source_hash="aaaa")
        worse = tdb.add_trial(rid, "s", Variant(stages=3), WL, "ok", time_us=7.9, source_hash="aaaa")
        assert tdb.record_winner(first, default_time_us=8.4) is True          # 0.952 of its default
        assert tdb.record_winner(later, default_time_us=9.4) is True          # 0.904: replaces, though slower
        assert tdb.record_winner(worse, default_time_us=8.0) is False         # 0.988
        assert tdb.winners()[0]["variant_key"] == Variant(stages=2).key
        # without the default's time on either side: absolute time
        fast = tdb.add_trial(rid, "s", Variant(stages=4, block_n=32), WL, "ok", time_us=8.4, source_hash="aaaa")
        assert tdb.record_winner(fast) is True                                # 8.4 < 8.5
        assert tdb.winners()[0]["variant_key"] == Variant(stages=4, block_n=32).key


def test_winner_of_new_kernel_source_replaces_a_faster_one_of_old_source(tmp_path):
    with db.TuningDB(tmp_path / "t.sqlite") as tdb:
        rid = _run(tdb)
        old = tdb.add_trial(rid, "s", Variant(stages=1), WL, "ok", time_us=8.0, source_hash="aaaa", phase="search")
        new = tdb.add_trial(rid, "s", Variant(stages=2), WL, "ok", time_us=9.0, source_hash="bbbb", phase="confirm",
                            seed=3, sm_clock_start_mhz=1980, sm_clock_end_mhz=1755)
        same = tdb.add_trial(rid, "s", Variant(stages=3), WL, "ok", time_us=9.5, source_hash="bbbb")
        assert tdb.record_winner(old) is True
        assert tdb.record_winner(new, time_us=9.1, n_repeats=3, time_spread=0.02, default_time_spread=0.01,
                                 rule="r") is True           # slower, but measured on the current kernels
        assert tdb.record_winner(same) is False               # same source: the faster stays
        (w,) = tdb.winners()
        assert (w["variant_key"], w["time_us"], w["source_hash"]) == (Variant(stages=2).key, 9.1, "bbbb")
        assert (w["n_repeats"], w["time_spread"], w["default_time_spread"], w["rule"]) == (3, 0.02, 0.01, "r")
        t = tdb.trials(id=new)[0]
        assert (t["phase"], t["seed"], t["sm_clock_start_mhz"], t["sm_clock_end_mhz"]) == ("confirm", 3, 1980, 1755)
        with pytest.raises(ValueError, match="phase"):
            tdb.add_trial(rid, "s", Variant(), WL, "ok", time_us=1.0, phase="warmup")


@pytest.mark.parametrize("state", [s for s in db.TRIAL_STATES if s != "ok"])
def test_record_winner_refuses_non_ok(tmp_path, state):
    with db.TuningDB(tmp_path / "t.sqlite") as tdb:
        rid = _run(tdb)
        tid = tdb.add_trial(rid, "s", Variant(), WL, state, time_us=1.0, error="boom")
        with pytest.raises(ValueError, match="ok"):
            tdb.record_winner(tid)
        with pytest.raises(ValueError, match="ok"):
            tdb.record_winner(tdb.trials(id=tid)[0])
        assert tdb.winners() == []


def test_record_winner_needs_full_key(tmp_path):
    with db.TuningDB(tmp_path / "t.sqlite") as tdb:
        rid = tdb.add_run({"hostname": "cpu-box"})       # no GPU: nothing can win
        tid = tdb.add_trial(rid, "s", Variant(), WL, "ok", time_us=1.0)
        with pytest.raises(ValueError, match="gpu_name"):
            tdb.record_winner(tid)
        with pytest.raises(ValueError, match="no trial"):
            tdb.record_winner(tid + 1)


# -- export ----------------------------------------------------------------------------------------

def _filled(path):
    tdb = db.TuningDB(path)
    rid = _run(tdb)
    tid = tdb.add_trial(rid, "s", Variant(), WL, "ok", time_us=10.0)
    tdb.add_trial(rid, "s", Variant(stages=3), WL, "timeout", error="hang")
    tdb.record_winner(tid)
    return tdb


def test_export_json(tmp_path):
    with _filled(tmp_path / "t.sqlite") as tdb:
        tdb.export(tmp_path / "all.json")
        doc = json.loads((tmp_path / "all.json").read_text())
        assert doc["schema_version"] == db.SCHEMA_VERSION
        assert len(doc["runs"]) == 1 and len(doc["trials"]) == 2 and len(doc["winners"]) == 1
        assert doc["winners"][0]["time_us"] == 10.0
        buf = io.StringIO()
        tdb.export(buf, "json", table="trials")
        assert set(json.loads(buf.getvalue())) == {"schema_version", "trials"}
        with pytest.raises(ValueError):
            tdb.export(buf, "xml")


def test_export_csv(tmp_path):
    with _filled(tmp_path / "t.sqlite") as tdb:
        tdb.export(tmp_path / "w.csv", fmt="csv")
        with open(tmp_path / "w.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 1 and rows[0]["variant_key"] == Variant().key and float(rows[0]["time_us"]) == 10.0
        assert list(rows[0]) == list(db.WINNER_COLUMNS)
        buf = io.StringIO()
        tdb.export(buf, fmt="csv", table="trials")
        rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
        assert [r["state"] for r in rows] == ["ok", "timeout"]


# -- merge -----------------------------------------------------------------------------------------

def _counts(path):
    with db.TuningDB(path, readonly=True) as t:
        return len(t.runs()), len(t.trials()), len(t.winners())


def test_merge(tmp_path):
    a, b, c = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "c.sqlite"
    with db.TuningDB(a) as ta:
        ra = _run(ta, hostname="host-a")
        fast_a = ta.add_trial(ra, "s", Variant(stages=1), WL, "ok", time_us=9.0)
        ta.add_trial(ra, "s", Variant(stages=3), WL, "crashed", error="segv")
        ta.record_winner(fast_a)
        only_a = ta.add_trial(ra, "s", Variant(), {**WL, "batch": 1}, "ok", time_us=5.0)
        ta.record_winner(only_a)
    with db.TuningDB(b) as tb:
        _run(tb, hostname="unused")                     # shifts ids: b's ids differ from a's
        rb = _run(tb, hostname="host-b")
        fast_b = tb.add_trial(rb, "s", Variant(split_overhead=2), WL, "ok", time_us=7.0)
        tb.record_winner(fast_b)

    stats = db.merge([a, b], c)
    assert stats == {"runs_added": 3, "trials_added": 4, "winners_written": 3, "sources_skipped": 0}
    with db.TuningDB(c, readonly=True) as tc:
        runs = {r["id"]: r["hostname"] for r in tc.runs()}
        assert sorted(runs.values()) == ["host-a", "host-b", "unused"]
        for t in tc.trials():                            # ids remapped: every trial points at its own run
            want = "host-b" if t["variant_key"] == Variant(split_overhead=2).key else "host-a"
            assert runs[t["run_id"]] == want
        assert len({t["id"] for t in tc.trials()}) == 4
        (w,) = tc.winners(batch_bucket=64)
        assert (w["variant_key"], w["time_us"]) == (Variant(split_overhead=2).key, 7.0)   # the faster one
        assert runs[w["run_id"]] == "host-b"
        (w1,) = tc.winners(batch_bucket=1)
        assert runs[w1["run_id"]] == "host-a"

    # beside c only its own lock file: no temporary copy or its lock left behind
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith(".")) == [".a.sqlite.lock",
                                                                                    ".b.sqlite.lock", ".c.sqlite.lock"]
    before = _counts(c)
    again = db.merge([a, b], c)                         # twice: nothing duplicated
    assert again == {"runs_added": 0, "trials_added": 0, "winners_written": 0, "sources_skipped": 0}
    assert _counts(c) == before
    assert db.merge([c], c)["sources_skipped"] == 1     # into itself: no-op
    assert _counts(c) == before
    with db.TuningDB(c) as tc:                          # a TuningDB as destination works too
        assert db.merge([a], tc)["trials_added"] == 0
    assert _counts(c) == before

    # a slower winner from a later source does not replace the faster one
    with db.TuningDB(tmp_path / "slow.sqlite") as ts:
        rs = _run(ts, hostname="slow")
        ts.record_winner(ts.add_trial(rs, "s", Variant(stages=4, block_n=32), WL, "ok", time_us=20.0))
    assert db.merge([tmp_path / "slow.sqlite"], c)["winners_written"] == 0
    with db.TuningDB(c, readonly=True) as tc:
        assert tc.winners(batch_bucket=64)[0]["time_us"] == 7.0


def test_merge_refuses_newer_source(tmp_path):
    src = _db_with_schema_version(tmp_path / "new.sqlite", 9)
    with pytest.raises(db.SchemaVersionError):
        db.merge([src], tmp_path / "dst.sqlite")


# -- helpers ---------------------------------------------------------------------------------------

def test_buckets():
    assert [db.bucket_batch(b) for b in (0, 1, 2, 3, 4, 5, 64, 65, 128)] == [1, 1, 2, 4, 4, 8, 64, 128, 128]
    with pytest.raises(ValueError):
        db.bucket_batch(-1)
    # nearest power of two in log scale: 4096's bucket is [2897, 5793)
    assert [db.bucket_seqlen(s) for s in (-5, 0, 1, 63, 64, 90, 91, 1000, 2896, 2897, 4096, 5792, 5793)] == \
        [64, 64, 64, 64, 64, 64, 128, 1024, 2048, 4096, 4096, 4096, 8192]
    assert db.bucket_seqlen(131072) == 131072 and db.bucket_seqlen(10 ** 7) == 131072
    assert db.cuda_major_minor("12.8.1") == "12.8" and db.cuda_major_minor("13.0") == "13.0"
    assert db.cuda_major_minor(None) is None


def test_current_hardware_cpu_safe():
    info = db.current_hardware()
    assert set(info) == set(db.RUN_COLUMNS) - {"id", "created_at"}
    import flash_mla
    import torch
    assert info["package_version"] == flash_mla.__version__
    assert info["torch_version"] == str(torch.__version__)
    if not torch.cuda.is_available():
        assert info["gpu_name"] is None and info["sm_count"] is None


def test_db_locations(tmp_path, monkeypatch):
    shipped = db.shipped_db_path()
    assert shipped is None or shipped.is_file()          # a missing shipped DB is simply absent
    monkeypatch.setenv(db.ENV_USER_DB, str(tmp_path / "env.sqlite"))
    try:
        db.set_user_db(None)
        assert db.user_db_path() == tmp_path / "env.sqlite"
        db.set_user_db(tmp_path / "call.sqlite")             # the call wins over the variable
        assert db.user_db_path() == tmp_path / "call.sqlite"
    finally:
        db.set_user_db(None)
    monkeypatch.delenv(db.ENV_USER_DB)
    assert db.user_db_path() is None
    assert not (tmp_path / "env.sqlite").exists() and not (tmp_path / "call.sqlite").exists()


def test_storage_imports_none_of_its_readers():
    """db.py is storage only: selection registers for user-DB changes instead of being imported by it, and variants
    come in as objects (key, build key, fields) or plain dicts, never interpreted through codegen."""
    import ast
    tree = ast.parse(Path(db.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "") + "." + a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
              for a in n.names}
    assert not any("selection" in n or "dispatch" in n or "codegen" in n for n in names), names
    from flash_mla import selection
    assert selection.clear_cache in db._user_db_listeners
