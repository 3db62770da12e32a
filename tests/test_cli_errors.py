"""Command-line usage errors: one line on stderr and exit 2, before any GPU or compiler is touched (CPU)."""

from __future__ import annotations

import pytest

from flash_mla import cli


@pytest.mark.parametrize("argv,says", [
    (["tune", "--suite", "nope"], "invalid choice: 'nope'"),
    (["tune", "--workload", "h_q=16,s_q=1,batch"], "malformed workload item 'batch'"),
    (["tune", "--workload", "h_q=-5,s_q=1,batch=4,mean_sk=2048"], "h_q must be a positive integer, got '-5'"),
    (["tune", "--workload", "h_q=16,s_q=1,batch=4,mean_sk=2048,causal=yes"], "causal must be 0, 1, true or false"),
    (["tune", "--workload", "h_q=16,s_q=1,batch=4,mean_sk=2048,dtype=fp32"], "dtype must be one of"),
    (["tune", "--workload", "h_q=16,s_q=1,batch=4,mean_sk=2048,page_size=16"], "page_size must be one of"),
    (["tune", "--workload", "h_q=16,s_q=1,batch=4,mean_sk=2048,colour=3"], "unknown workload fields ['colour']"),
    (["tune", "--workload", "h_q=16,s_q=1,batch=4"], "lacks ['mean_sk']"),
    (["tune", "--workload", "h_q=6,s_q=1,batch=4,mean_sk=64,h_kv=4"], "not a multiple of h_kv=4"),
    (["tune", "--suite", "dsv3-tp8", "--trials", "0"], "expected a positive integer, got '0'"),
    (["tune", "--suite", "dsv3-tp8", "--gpus", "x,y"], "comma-separated GPU indices"),
    (["tune", "--suite", "dsv3-tp8", "--timeout", "-1"], "--timeout must be > 0"),
    (["tune"], "name at least one --suite or --workload"),
    (["build", "--page-sizes", "16"], "invalid choice: 16"),
    (["build", "--jobs", "0"], "expected a positive integer"),
    (["check", "--cases", "-2"], "expected a positive integer"),
    (["bench", "--grid", "huge"], "invalid choice: 'huge'"),
    (["evaluate", "--shard", "3/2"], "expected K/N with 1 <= K <= N, got '3/2'"),
    (["evaluate", "--shard", "1"], "expected K/N with 1 <= K <= N, got '1'"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err, err


def test_a_valid_workload_spec_parses_strictly():
    w = cli._workload_spec("h_q=64,s_q=2,batch=8,mean_sk=4096,h_kv=2,causal=TRUE,dtype=fp16,page_size=32")
    assert (w.h_q, w.s_q, w.batch, w.mean_sk, w.h_kv, w.causal, w.dtype, w.page_size) == \
        (64, 2, 8, 4096, 2, True, "fp16", 32)
    assert cli._workload_spec("h_q=16,s_q=1,batch=4,mean_sk=2048,causal=0").causal is False


@pytest.mark.parametrize("argv,missing", [(["tune", "--suite", "dsv3-tp8"], "optuna"),
                                          (["bench", "--grid", "quick"], "matplotlib")])
def test_tuning_commands_without_the_tune_extra_say_how_to_install_it(argv, missing, monkeypatch, capsys, tmp_path):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"missing: {missing}" in err and "flash-mla-tuned[tune]" in err, err


def test_serving_import_loads_no_tuning_module():
    import subprocess
    import sys
    code = ("import sys, flash_mla; from flash_mla import dispatch, selection, db; "
            "print(sorted(m for m in ('optuna', 'matplotlib') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@pytest.mark.parametrize("from_db", [True, False])
def test_build_from_db_fails_where_the_database_selects_a_spilling_variant(from_db, monkeypatch, capsys, tmp_path):
    from flash_mla.codegen import build as build_mod, ptxas
    from flash_mla.codegen.variant import default_variant
    from flash_mla.db import shipped_db_path
    report = ("ptxas info    : Compiling entry function '_ZN3ns13decode_kernelE' for 'sm_90a'\n"
              "ptxas info    : Function properties for _ZN3ns13decode_kernelE\n"
              "    40 bytes stack frame, 44 bytes spill stores, 44 bytes spill loads\n"
              "ptxas info    : Used 168 registers, used 10 barriers\n")

    def fake_build(variants, jobs=None):
        arts = []
        for i, v in enumerate(variants):
            a = build_mod.Artifact(variant=v, directory=tmp_path / str(i), ok=True)
            a.directory.mkdir()
            if v == default_variant("bf16", 64):             # one variant spills, the others are clean
                a.report_path.write_text(report)
                a.resources = ptxas.parse(report)
            arts.append(a)
        return arts

    monkeypatch.setattr(build_mod, "build", fake_build)
    argv = ["build", "--from-db", str(shipped_db_path())] if from_db else \
        ["build", "--variants", default_variant("bf16", 64).key]
    assert cli.main(argv) == (1 if from_db else 0)
    out = capsys.readouterr().out
    assert f"{'error' if from_db else 'note'}: {default_variant('bf16', 64).build_key}: the decode kernel spills" in out


def test_evaluate_combines_shards_into_one_table(tmp_path, capsys):
    import json
    def row(i, ratio):
        return {"shape": f"s{i}", "best": "v", "best_us": 100.0, "default_us": 100.0, "hint_variant": "v",
                "hint_us": 100.0 * ratio, "hint_ratio": ratio, "nohint_variant": "v", "nohint_us": 100.0,
                "nohint_ratio": 1.0}
    for k, rows in ((1, [row(0, 1.0), row(2, 1.1)]), (2, [row(1, 1.02)])):
        (tmp_path / f"e{k}.json").write_text(json.dumps({"rows": rows}))
    assert cli.main(["evaluate", "--combine", str(tmp_path / "e1.json"), str(tmp_path / "e2.json"),
                     "--out", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "evaluate.json").read_text())
    assert [r["shape"] for r in merged["rows"]] == ["s0", "s2", "s1"]
    assert merged["summary"]["hint"]["within_3pct"] == 2 and merged["summary"]["hint"]["measured"] == 3
    assert "within 3% of the best on 2/3 workloads" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--combine", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")])
    assert "is not an evaluate.json" in str(e.value.code)
