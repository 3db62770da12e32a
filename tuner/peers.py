"""Peer implementations beside ours in ``flash-mla bench --peer DIR``.

A peer is a folder holding a package named ``flash_mla`` with FlashMLA's classic API. Every such package
has the same name as this project, so each peer runs in its own worker process (``peer_worker.py``, started
as a script) that imports only the peer. The worker receives the bench's own inputs through CUDA IPC (no
copy, the same bytes our variants read), runs the peer once, and the result is checked here against the
reference exactly like our variants (:func:`flash_mla.testing.compare`). Only a peer that passes is timed,
by the same CUDA-graph timing code, in the same run.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

from .peer_worker import read_msg, write_msg

WORKER = Path(__file__).with_name("peer_worker.py")


class PeerError(RuntimeError):
    """A peer folder that cannot be used, or a worker that died."""


def check_peer_dir(directory) -> Path:
    d = Path(directory).expanduser().resolve()
    if not (d / "flash_mla" / "__init__.py").is_file():
        raise PeerError(f"--peer {directory}: no package 'flash_mla' there (expected {d / 'flash_mla' / '__init__.py'})")
    return d


def peer_label(directory: Path, taken: set) -> str:
    """Readable, unique label: the folder name (``flashmla-9edee0c``, ``flashinfer_shim`` ...)."""
    base = Path(directory).name
    label, i = base, 2
    while label in taken:
        label, i = f"{base}#{i}", i + 1
    return label


class _IpcPickler(pickle.Pickler):
    """CUDA tensors travel as IPC handles (torch.multiprocessing's reducer); everything else by value."""

    def reducer_override(self, obj):
        import torch
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            from torch.multiprocessing.reductions import reduce_tensor
            return reduce_tensor(obj)
        return NotImplemented


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    _IpcPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


class Peer:
    """One peer implementation in its worker process; close() (or a with-block) ends the process."""

    def __init__(self, directory, label: str | None = None, log_path=None, env=None):
        self.directory = check_peer_dir(directory)
        self.label = label or self.directory.name
        self._log = open(log_path, "ab") if log_path else None
        self._proc = subprocess.Popen([sys.executable, str(WORKER), str(self.directory)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log if self._log else None, env=env)
        hello = self._recv()
        if not hello.get("ok"):
            self.close()
            raise PeerError(f"peer {self.label} ({self.directory}) failed to import:\n{hello.get('error')}")
        self.module = hello["module"]
        self._inputs = None

    def _recv(self) -> dict:
        msg = read_msg(self._proc.stdout)
        if msg is None:
            code = self._proc.wait()
            raise PeerError(f"peer {self.label}: worker exited with code {code}"
                            + (f" (log: {self._log.name})" if self._log else ""))
        return msg

    def _ask(self, request: dict) -> dict:
        write_msg(self._proc.stdin, _dumps(request))
        return self._recv()

    def run(self, q, k_cache, block_table, cache_seqlens, head_dim_v: int, softmax_scale: float, causal: bool):
        """One call of the peer on these tensors: ``{"ok", "out", "lse"}`` or ``{"ok": False, "error"}``.

        The tensors must stay alive until the next ``run`` (the worker holds IPC views of them)."""
        self._inputs = dict(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                            head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=bool(causal))
        return self._ask({"op": "run", "inputs": self._inputs})

    def time_us(self, rep_ms: int = 200) -> dict:
        """Time the last ``run`` call: ``{"ok", "us"}``."""
        return self._ask({"op": "time", "rep_ms": rep_ms})

    def overhead_us(self) -> dict:
        """Host, eager and CUDA-graph per-call times of the last ``run`` call: ``{"ok", "host", "eager", "graph"}``."""
        return self._ask({"op": "overhead"})

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._inputs = None
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def measure_peer(peer: Peer, problem, rep_ms: int = 200) -> dict:
    """Reference check first (as for our variants), then CUDA-graph timing; a failing peer has no time."""
    from flash_mla.testing import compare
    from .measure import HEAD_DIM_V, SCALE
    shape = problem.shape
    r = peer.run(problem.q, problem.k_cache, problem.block_table, problem.cache_seqlens, HEAD_DIM_V, SCALE,
                 shape.causal)
    if not r.get("ok"):
        return {"ok": False, "error": r.get("error", "")[-2000:]}
    dev = problem.ref_out.device
    out, lse = r["out"].to(dev), r["lse"].to(dev)
    if out.shape != problem.ref_out.shape or lse.shape != problem.ref_lse.shape:
        return {"ok": False, "error": f"shapes out {tuple(out.shape)} lse {tuple(lse.shape)}, expected "
                                      f"{tuple(problem.ref_out.shape)} and {tuple(problem.ref_lse.shape)}"}
    verdict = compare(out, problem.ref_out, lse, problem.ref_lse, problem.q.dtype)
    verdict.pop("tolerances", None)
    if not verdict["ok"]:
        return {"ok": False, "error": verdict}
    t = peer.time_us(rep_ms)
    if not t.get("ok"):
        return {"ok": False, "error": t.get("error", "")[-2000:]}
    us = t["us"]
    return {"ok": True, "us": us, "gbs": problem.nbytes / us / 1e3, "tflops": problem.nflop / us / 1e6}


def open_peers(dirs, log_dir=None) -> list[Peer]:
    """Start one worker per peer folder (checked first: a bad folder is one clear error before any work)."""
    checked = [check_peer_dir(d) for d in dirs]
    peers, taken = [], set()
    try:
        for d in checked:
            label = peer_label(d, taken)
            taken.add(label)
            log = (Path(log_dir) / f"peer-{label.replace('#', '_')}.log") if log_dir else None
            if log:
                log.parent.mkdir(parents=True, exist_ok=True)
            peers.append(Peer(d, label, log_path=log, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
    except BaseException:
        for p in peers:
            p.close()
        raise
    return peers
