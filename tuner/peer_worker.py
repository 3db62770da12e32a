"""Peer worker: one process per peer implementation, run as a script (never imported as part of our package).

Usage: ``python peer_worker.py PEER_DIR``. ``PEER_DIR`` holds a package named ``flash_mla`` with FlashMLA's
classic API (``get_mla_metadata``, ``flash_mla_with_kvcache``); it goes first on ``sys.path`` so that
``import flash_mla`` gives the peer, not this project (every peer package has that name, which is why each
lives in its own process). Requests and replies are length-prefixed pickles on stdin / the original
stdout (the peer's own prints go to stderr). CUDA tensors arrive as CUDA IPC handles: the peer runs on the
very inputs the parent drew. Replies carry CPU tensors.

Requests: ``{"op": "run", "inputs": {...}}`` -> ``{"ok": True, "out", "lse"}`` (one call; the parent checks it
against the reference), ``{"op": "time", "rep_ms": int}`` -> ``{"ok": True, "us"}`` (the last inputs, replayed
from a CUDA graph by the same timing code as the project's variants; on CPU inputs the median wall time of a
few calls, for tests of this plumbing only), ``{"op": "overhead"}`` -> ``{"ok": True, "host", "eager", "graph"}`` (per-call
times of the last inputs' call, eager and under a CUDA graph: tuner/timing.py's ``overhead_us``). Any failure replies ``{"ok": False, "error": text}``.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import struct
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def read_msg(f):
    head = f.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(f.read(n))


def write_msg(f, blob: bytes) -> None:
    f.write(struct.pack("<Q", len(blob)) + blob)
    f.flush()


def _measure_module():
    """The project's timing code (tuner/timing.py), loaded by path: it imports nothing of the project, so it
    runs beside a peer package that is also named ``flash_mla``."""
    spec = importlib.util.spec_from_file_location("_fmla_peer_timing", os.path.join(HERE, "timing.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                    # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _wall_median_us(fn, n: int = 5) -> float:
    import time
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times)[n // 2]


def main(peer_dir: str) -> int:
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                                   # the peer's prints must not corrupt the protocol
    sys.stdout = sys.stderr
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
    sys.path.insert(0, os.path.abspath(peer_dir))
    proto_in = sys.stdin.buffer
    try:
        import torch
        import flash_mla as peer
        origin = os.path.dirname(os.path.dirname(os.path.abspath(peer.__file__)))
        if origin != os.path.abspath(peer_dir):
            raise ImportError(f"'import flash_mla' found {peer.__file__}, not the package in {peer_dir}")
        measure = _measure_module()
        write_msg(proto_out, pickle.dumps({"ok": True, "ready": True, "module": peer.__file__}))
    except Exception:
        write_msg(proto_out, pickle.dumps({"ok": False, "error": traceback.format_exc()}))
        return 1

    call, on_gpu = None, False
    while True:
        msg = read_msg(proto_in)
        if msg is None:
            return 0
        try:
            if msg["op"] == "run":
                a = msg["inputs"]
                q, k, bt, sl = a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"]
                _, s_q, h_q, _ = q.shape
                h_kv = k.shape[2]
                meta, splits = peer.get_mla_metadata(sl, s_q * h_q // h_kv, h_kv)

                def call(q=q, k=k, bt=bt, sl=sl, meta=meta, splits=splits, a=a):
                    return peer.flash_mla_with_kvcache(q, k, bt, sl, a["head_dim_v"], meta, splits,
                                                       softmax_scale=a["softmax_scale"], causal=a["causal"])

                on_gpu = q.is_cuda
                out, lse = call()
                if on_gpu:
                    torch.cuda.synchronize()
                reply = {"ok": True, "out": out.detach().cpu(), "lse": lse.detach().float().cpu()}
            elif msg["op"] == "time":
                if call is None:
                    raise RuntimeError("'time' before any 'run'")
                us = measure.graph_time_us(call, msg.get("rep_ms", 200)) if on_gpu else _wall_median_us(call)
                reply = {"ok": True, "us": us}
            elif msg["op"] == "overhead":
                if call is None or not on_gpu:
                    raise RuntimeError("'overhead' needs a 'run' on CUDA inputs first")
                reply = {"ok": True, **measure.overhead_us(call)}
            else:
                raise ValueError(f"unknown op {msg['op']!r}")
        except Exception:
            reply = {"ok": False, "error": traceback.format_exc()}
        write_msg(proto_out, pickle.dumps(reply))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: peer_worker.py PEER_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
