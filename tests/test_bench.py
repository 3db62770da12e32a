"""Benchmark pieces that need no GPU: byte/FLOP accounting, the shape grid, report writing."""

from __future__ import annotations

import csv
import json

from flash_mla.tuner import bench
from flash_mla.tuner.measure import Shape, attended_pairs, flops, traffic_bytes


def test_bytes_follow_anchors_formula():
    s = Shape(128, 1, 16, 16384)
    lens = [16384] * 128
    want = 128 * (1 * 16 * 576 * 2 + 16384 * 1 * 576 * 2 + 1 * 16 * 512 * 2)
    assert traffic_bytes(s, lens) == want
    # mean s_k of the actual (varlen) lengths is what counts
    assert traffic_bytes(s, [1000, 3000]) == 2 * (16 * 576 * 2 + 2000 * 576 * 2 + 16 * 512 * 2)


def test_a_shape_spec_parses_as_the_bench_scripts_take_it():
    assert Shape.from_spec("16,1,128,4096,fixed") == Shape(16, 1, 128, 4096, varlen=False)
    assert Shape.from_spec("128,2,128,8192,causal") == Shape(128, 2, 128, 8192, causal=True)
    assert Shape.from_spec("1,1,32,1024").name == "b1 sq1 hq32 sk1024"


def test_flops_count_only_attended_pairs():
    s = Shape(1, 2, 128, 100)
    assert attended_pairs(s, [100]) == 200
    assert flops(s, [100]) == 2 * 1088 * 128 * 200
    c = Shape(1, 4, 16, 10, causal=True)
    assert attended_pairs(c, [10]) == 7 + 8 + 9 + 10
    assert attended_pairs(c, [2]) == 0 + 0 + 1 + 2           # rows that see nothing count nothing
    assert flops(Shape(3, 1, 16, 0), [0, 0, 0]) == 0


def test_grid_covers_the_issue_shapes():
    names = {s.name for s in bench.default_grid()}
    for b in (1, 8, 32, 128):
        for h in (16, 32):
            for sk in (1024, 4096, 16384):
                assert Shape(b, 1, h, sk).name in names
    for sq in (1, 2):
        for sk in (4096, 8192, 16384, 32768):
            assert Shape(128, sq, 128, sk).name in names
    for sk in (4096, 8192, 16384, 32768):
        assert Shape(128, 2, 128, sk, causal=True).name in names
    assert any(s.s_q == 4 and s.causal for s in bench.default_grid())
    assert len(names) == len(bench.default_grid())                   # no duplicates
    assert Shape(128, 1, 16, 16384).regime == "memory" and Shape(128, 2, 128, 8192).regime == "compute"


def test_latency_grid_is_the_small_batch_part_of_the_default_grid():
    lat = bench.GRIDS["latency"]()
    assert lat and all(s.b <= 8 for s in lat)
    assert set(lat) == {s for s in bench.default_grid() if s.b <= 8}
    assert set(bench.GRIDS) == {"default", "quick", "latency", "memory", "overhead", "compute"}
    assert set(bench.GRIDS["memory"]()) == {s for s in bench.default_grid() if s.h_q <= 32}
    assert set(bench.GRIDS["compute"]()) == {s for s in bench.default_grid() if s.h_q >= 64}
    assert len(bench.GRIDS["memory"]()) + len(bench.GRIDS["compute"]()) == len(bench.default_grid())


def _rows():
    ceil = {"copy_gbs": 3000.0, "gemm_tflops": 700.0, "device": "test"}
    rows = [
        {"shape": "b128 sq1 hq16 sk16384", "regime": "memory", "impl": "default", "variant": "v", "ok": True,
         "us": 900.0, "gbs": 2700.0, "tflops": 80.0},
        {"shape": "b128 sq1 hq16 sk16384", "regime": "memory", "impl": "torch reference", "variant": "", "ok": True,
         "us": 9000.0, "gbs": 270.0, "tflops": 8.0},
        {"shape": "b128 sq2 hq128 sk8192", "regime": "compute", "impl": "default", "variant": "v", "ok": False},
    ]
    return [bench.with_ceilings(r, ceil) for r in rows], ceil


def test_ceiling_fractions_and_table():
    rows, ceil = _rows()
    assert abs(rows[0]["pct_copy"] - 90.0) < 1e-9 and abs(rows[0]["pct_gemm"] - 80 / 7) < 1e-9
    assert "pct_copy" not in rows[2]
    table = bench.format_table(rows, ceil)
    assert "copy 3000 GB/s" in table and "FAILED reference check" in table and "90%" in table


def test_reports_written(tmp_path):
    rows, ceil = _rows()
    paths = bench.write_reports(rows, ceil, tmp_path)
    with open(paths["csv"]) as f:
        got = list(csv.DictReader(f))
    assert len(got) == 3 and got[0]["impl"] == "default" and float(got[0]["us"]) == 900.0
    data = json.loads(paths["json"].read_text())
    assert data["ceilings"]["copy_gbs"] == 3000.0 and len(data["rows"]) == 3
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overhead_grid_and_table():
    from flash_mla.tuner.bench import GRIDS, format_overhead_table, quick_grid
    grid = GRIDS["overhead"]()
    assert all(s.b == 1 for s in grid[:6]) and grid[6:] == quick_grid()
    rows = [{"shape": "b1 sq1 hq16 sk1024", "impl": "ours: api", "ok": True, "host": 6.0, "eager": 15.5, "graph": 14.0},
            {"shape": "b1 sq1 hq16 sk1024", "impl": "peer x", "ok": False, "error": "boom"}]
    t = format_overhead_table(rows)
    line = next(ln for ln in t.splitlines() if "ours: api" in ln)
    assert line.split()[-4:] == ["6.0", "15.5", "14.0", "1.5"]
    assert "FAILED" in next(ln for ln in t.splitlines() if "peer x" in ln)


def test_kv_fp8_table():
    ceil = {"copy_gbs": 3000.0, "gemm_tflops": 700.0, "device": "X"}
    rows = [
        {"shape": "b8 sq1 hq16 sk4096", "impl": "bf16 default", "dtype": "bf16", "ok": True, "us": 40.0, "gbs": 1000.0},
        {"shape": "b8 sq1 hq16 sk4096", "impl": "bf16 tuned", "dtype": "bf16", "ok": False, "error": "x"},
        {"shape": "b8 sq1 hq16 sk4096", "impl": "fp8 selection", "dtype": bench.FP8, "ok": True, "us": 30.0,
         "gbs": 600.0},
        {"shape": "b8 sq1 hq16 sk4096", "impl": "fp8 default (k)", "dtype": bench.FP8, "ok": True, "us": 35.0,
         "gbs": 500.0},
        {"shape": "b1 sq1 hq16 sk1024", "impl": "bf16 default", "dtype": "bf16", "ok": True, "us": 10.0, "gbs": 1.0},
    ]
    t = bench.format_kv_fp8_table(rows, ceil)
    lines = t.splitlines()
    assert lines[0].startswith("device X: copy 3000 GB/s") and "fp8/x = fp8 us / x us" in lines[0]
    row = next(ln for ln in lines if ln.startswith("b8 sq1"))
    # bf16 40.0 | tuned failed (-) | fp8 30.0 | fp8/bf16 0.75 | - | 600 GB/s = 20% of copy | the default 35.0
    assert row.split() == ["b8", "sq1", "hq16", "sk4096", "40.0", "-", "30.0", "0.75", "-", "600", "20%", "35.0"]
    short = next(ln for ln in lines if ln.startswith("b1 sq1"))     # no float8 row: dashes, no crash
    assert short.split()[4:8] == ["10.0", "-", "-", "-"]


def test_bytes_of_a_float8_cache():
    s = Shape(4, 1, 16, 1000)
    assert traffic_bytes(s, [1000] * 4, kv_elem=1) == 4 * (16 * 576 * 2 + 1000 * 576 * 1 + 16 * 512 * 2)
