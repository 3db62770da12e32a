"""The bench's peer plumbing on the CPU: fake peer packages named ``flash_mla`` in their own worker
processes, the reference check before any timing, the floor arithmetic and the peer table."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import pytest
import torch

from flash_mla.reference import mla_decode_reference
from flash_mla.testing import make_paged_kv
from flash_mla.tuner import bench
from flash_mla.tuner.measure import SCALE, Problem, Shape, floor_us, read_all
from flash_mla.tuner.peers import Peer, PeerError, check_peer_dir, measure_peer, open_peers

# A stand-alone MLA decode in plain torch (a peer cannot import this project: it has the same name).
# MODE: "good" computes the right answer, "wrong" perturbs it, "raise" fails, "badimport" fails to import.
FAKE = '''
import math, torch
MODE = "{mode}"
if MODE == "badimport":
    raise ImportError("this fake peer cannot be imported")
CALLS = 0

def get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k):
    return None, None

def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                           num_splits, softmax_scale=None, causal=False):
    global CALLS
    CALLS += 1
    print("fake peer prints to stdout; the protocol must survive it")
    if MODE == "raise":
        raise RuntimeError("fake peer failure")
    b, s_q, h_q, d = q.shape
    page = k_cache.shape[1]
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=q.dtype)
    lse = torch.full((b, h_q, s_q), float("inf"))
    for i in range(b):
        n = int(cache_seqlens[i])
        if n == 0:
            continue
        pages = block_table[i, : -(-n // page)].long()
        kv = k_cache[pages].reshape(-1, k_cache.shape[2], d)[:n, 0].float()      # h_kv == 1
        s = torch.einsum("shd,nd->shn", q[i].float(), kv) * softmax_scale
        l = torch.logsumexp(s, -1)
        out[i] = torch.einsum("shn,nd->shd", torch.softmax(s, -1), kv[:, :head_dim_v]).to(q.dtype)
        lse[i] = l.transpose(0, 1)
    if MODE == "wrong":
        out = out + 0.5
    return out, lse
'''


def _fake_peer(root, mode):
    d = root / f"fake_{mode}"
    (d / "flash_mla").mkdir(parents=True)
    (d / "flash_mla" / "__init__.py").write_text(textwrap.dedent(FAKE.format(mode=mode)))
    return d


def _problem():
    shape = Shape(2, 1, 16, 100)
    g = torch.Generator().manual_seed(3)
    lens = [100, 37]
    q, k, bt, sl = make_paged_kv(2, 1, 16, 1, lens, 64, torch.bfloat16, "cpu", g)
    ref_out, ref_lse = mla_decode_reference(q, k, bt, sl, 512, SCALE, False)
    return Problem(shape, "bf16", 64, lens, q, k, bt, sl, ref_out, ref_lse)


def test_good_peer_is_checked_then_timed(tmp_path):
    problem = _problem()
    with Peer(_fake_peer(tmp_path, "good"), log_path=tmp_path / "good.log") as peer:
        assert peer.module.endswith("fake_good/flash_mla/__init__.py")     # the peer, not this project
        r = measure_peer(peer, problem)
        assert r["ok"], r
        assert r["us"] > 0 and r["gbs"] > 0
        r2 = measure_peer(peer, problem)                                    # the worker serves many shapes
        assert r2["ok"]
    assert "fake peer prints" in (tmp_path / "good.log").read_text()


def test_wrong_peer_fails_the_check_and_has_no_time(tmp_path):
    with Peer(_fake_peer(tmp_path, "wrong")) as peer:
        r = measure_peer(peer, _problem())
    assert not r["ok"] and "us" not in r
    assert r["error"]["out_mismatches"] > 0


def test_raising_peer_reports_its_traceback(tmp_path):
    with Peer(_fake_peer(tmp_path, "raise")) as peer:
        r = measure_peer(peer, _problem())
        assert not r["ok"] and "fake peer failure" in r["error"]
        assert not peer.time_us()["ok"]                 # a failing call has no time; the worker lives on
        assert not measure_peer(peer, _problem())["ok"]


def test_overhead_needs_a_gpu_call_and_the_worker_survives_the_refusal(tmp_path):
    with Peer(_fake_peer(tmp_path, "good")) as peer:
        r = peer.overhead_us()                          # before any call
        assert not r["ok"] and "needs a 'run' on CUDA inputs first" in r["error"]
        assert measure_peer(peer, _problem())["ok"]
        r = peer.overhead_us()                          # CPU inputs: nothing to time on a GPU
        assert not r["ok"] and "CUDA" in r["error"]
        assert peer.time_us()["ok"]


def test_bad_peer_folders_are_one_clear_error(tmp_path):
    with pytest.raises(PeerError, match="no package 'flash_mla'"):
        check_peer_dir(tmp_path)
    with pytest.raises(PeerError, match="failed to import"):
        Peer(_fake_peer(tmp_path, "badimport"))
    good = _fake_peer(tmp_path, "good")
    with pytest.raises(PeerError, match="no package"):
        open_peers([good, tmp_path / "missing"])          # checked before any worker starts


def test_peers_get_unique_labels(tmp_path):
    good = _fake_peer(tmp_path, "good")
    peers = open_peers([good, good], log_dir=tmp_path / "logs")
    try:
        assert [p.label for p in peers] == ["fake_good", "fake_good#2"]
    finally:
        for p in peers:
            p.close()
    assert (tmp_path / "logs" / "peer-fake_good_2.log").exists()


def test_read_floor_pass_reads_everything_into_its_output():
    buf = torch.tensor([1.5, -0.5, 2.0], dtype=torch.bfloat16)
    out = torch.empty((), dtype=torch.float32)
    read_all(buf, out)
    assert out.item() == 3.0


def test_floor_is_the_larger_of_read_and_compute():
    assert floor_us(100.0, 0, 700.0) == 100.0
    nflop = 2 * 1088 * 128 * 2 * 8192 * 128          # b128 s_q2 h128 s_k 8192: compute-bound
    assert math.isclose(floor_us(300.0, nflop, 700.0), nflop / 700e6)
    assert floor_us(300.0, nflop, 700.0) > 300.0


def _row(shape, impl, us, ok=True, b=1, h_q=16):
    return {"shape": shape, "regime": "memory", "b": b, "s_q": 1, "h_q": h_q, "impl": impl, "ok": ok,
            "us": us if ok else None, "variant": "v"}


def test_peer_summary_and_table():
    rows = [
        _row("A", "default (x)", 50.0), _row("A", bench.TUNED, 40.0), _row("A", "peer p1", 30.0),
        _row("A", "peer p2", 45.0), _row("A", bench.FLOOR, 20.0),
        _row("B", "default (x)", 100.0, b=128, h_q=128), _row("B", "peer p1", 120.0, b=128, h_q=128),
        _row("B", "peer p2", 0, ok=False, b=128, h_q=128), _row("B", bench.FLOOR, 80.0, b=128, h_q=128),
    ]
    s = {x["shape"]: x for x in bench.peer_summary(rows)}
    a, b = s["A"], s["B"]
    assert a["ours_impl"] == bench.TUNED and a["ours_us"] == 40.0          # the tuned row is "ours"
    assert a["best_peer"] == "p1" and a["vs_best"] == 30.0 / 40.0
    assert a["ours_over_floor"] == 2.0 and a["best_over_floor"] == 1.5
    assert b["ours_impl"].startswith("default") and b["best_peer"] == "p1"  # no DB row: the default
    assert b["peers"]["p2"] is None and b["vs_best"] == 1.2                 # a failed peer is not "best"
    table = bench.format_peer_table(list(s.values()), {"copy_gbs": 3000, "gemm_tflops": 700, "device": "t"})
    assert "0.75" in table and "1.20" in table
    assert "b <= 8" in table and "ours >= best peer on   0" in table
    assert f"geomean vs best {math.sqrt(0.75 * 1.2):.3f}" in table           # the "all" group


def test_peer_worker_runs_from_an_installed_layout(tmp_path):
    """Installed (not editable), ``flash_mla`` in the peer's process is the peer's package alone: the worker's
    timing code must import nothing of this project (it once imported flash_mla.constants and failed there)."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"
    subprocess.run(["bash", str(root / "scripts" / "stage_site.sh"), str(site)], check=True)
    worker = site / "flash_mla" / "tuner" / "peer_worker.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-S", str(worker), str(_fake_peer(tmp_path, "good"))],
                          input=b"", capture_output=True, env={**env, "PYTHONPATH": _torch_only_path()})
    from flash_mla.tuner.peer_worker import read_msg
    import io
    reply = read_msg(io.BytesIO(proc.stdout))
    assert reply["ok"] and reply["ready"], reply


def _torch_only_path() -> str:
    """sys.path entries that hold torch and its dependencies but not this project (an editable install's
    finder would otherwise serve flash_mla.* submodules to the worker)."""
    import site as site_mod
    return os.pathsep.join(site_mod.getsitepackages())
