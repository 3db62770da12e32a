"""Measurement in a separate process, so a crash, hang or illegal address costs one trial, not the study.

Protocol: the child (``python -m flash_mla.tuner.worker``) reads one JSON request per line on stdin,
``{"variant": {...}, "shape": {...}, "seed": n}``, and answers one JSON line on stdout:
``{"state": "ok", "us": ..., "gbs": ..., "tflops": ...}`` or ``{"state": "failed_check", "error": ...}``, both
with the SM clock before and after the measurement (``sm_clock_start_mhz``, ``sm_clock_end_mhz``; None where
NVML cannot be read).
The parent (:class:`Worker`) restarts the child after a crash or a time-out.

Fault injection (a testing aid, for the tuner's own tests and for a tuner run on a GPU):
``FLASH_MLA_TUNER_FAULT=KIND:KEY[,KIND:KEY...]`` makes the child fault on a request for the variant ``KEY``
(its ``Variant.key``) instead of measuring it. KIND is ``segv`` (the child dies of SIGSEGV, as a crash in
the driver or a library would kill it), ``exit`` (the child exits with status 7) or ``hang`` (it never
answers, so the parent's time-out fires). Unset, nothing changes.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

FAULT_ENV = "FLASH_MLA_TUNER_FAULT"
FAULT_KINDS = ("segv", "exit", "hang")


def injected_faults(spec: str | None = None) -> dict[str, str]:
    """``{variant key: kind}`` from ``$FLASH_MLA_TUNER_FAULT`` (or ``spec``); a malformed entry is a ValueError."""
    spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
    faults = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        kind, sep, key = item.partition(":")
        if not sep or kind not in FAULT_KINDS or not key:
            raise ValueError(f"{FAULT_ENV}: {item!r} is not KIND:VARIANT_KEY with KIND one of {', '.join(FAULT_KINDS)}")
        faults[key] = kind
    return faults


def _fault(kind: str) -> None:
    if kind == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "exit":
        os._exit(7)
    while True:                        # hang
        time.sleep(3600)


class Worker:
    def __init__(self, gpu: int | None = None, timeout_s: float = 120.0):
        self.gpu = gpu
        self.timeout_s = timeout_s
        self.proc = None
        self._lines: queue.Queue = queue.Queue()

    def _start(self):
        env = dict(os.environ)
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        self.proc = subprocess.Popen([sys.executable, "-m", "flash_mla.tuner.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None, text=True, env=env, bufsize=1)
        self._lines = queue.Queue()
        out, q = self.proc.stdout, self._lines
        threading.Thread(target=lambda: [q.put(line) for line in out] + [q.put(None)], daemon=True).start()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def measure(self, variant: dict, shape: dict, seed: int = 0) -> dict:
        """One trial. Never raises for kernel trouble: returns a state of ok / failed_check / crashed / timeout."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps({"variant": variant, "shape": shape, "seed": seed}) + "\n")
            self.proc.stdin.flush()
            line = self._lines.get(timeout=self.timeout_s)
        except queue.Empty:
            self.stop()
            return {"state": "timeout", "error": f"no answer within {self.timeout_s:.0f} s"}
        except (BrokenPipeError, OSError) as e:
            self.stop()
            return {"state": "crashed", "error": str(e)}
        if line is None:
            code = self.proc.wait()
            self.proc = None
            return {"state": "crashed", "error": f"worker exited with code {code}"}
        return json.loads(line)


def sm_clock_mhz() -> int | None:
    """The current SM clock of this process's GPU (NVML, through torch), or None where it cannot be read."""
    try:
        import torch
        return int(torch.cuda.clock_rate(torch.cuda.current_device()))
    except Exception:
        return None


def serve() -> None:
    """Child side: keep problems per shape (inputs + reference) and answer requests until stdin closes."""
    from flash_mla.codegen.variant import Variant
    from .measure import Shape, make_problem, measure_variant
    faults = injected_faults()
    problems = {}
    out = sys.stdout
    sys.stdout = sys.stderr            # anything else printed must not corrupt the protocol
    for line in sys.stdin:
        req = json.loads(line)
        variant = Variant.from_dict(req["variant"])
        if variant.key in faults:
            _fault(faults[variant.key])
        shape = Shape(**req["shape"])
        key = (shape, variant.dtype, variant.page_size, req.get("seed", 0))
        try:
            if key not in problems:
                problems.clear()       # one problem at a time keeps GPU memory bounded
                problems[key] = make_problem(shape, variant.dtype, variant.page_size, req.get("seed", 0))
            clock0 = sm_clock_mhz()
            r = measure_variant(variant, problems[key])
            clocks = {"sm_clock_start_mhz": clock0, "sm_clock_end_mhz": sm_clock_mhz()}
            res = {"state": "ok", **{k: r[k] for k in ("us", "gbs", "tflops")}, **clocks} if r["ok"] else \
                {"state": "failed_check", "error": json.dumps(r["error"], default=str)[:2000], **clocks}
        except Exception as e:
            # The CUDA context may be poisoned (illegal address): answer, then exit so the parent
            # starts a fresh worker for the next trial.
            out.write(json.dumps({"state": "crashed", "error": f"{type(e).__name__}: {e}"[:2000]}) + "\n")
            out.flush()
            os._exit(3)
        out.write(json.dumps(res) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
