"""The tuning database: measured trials and the winning variant per GPU and workload, in SQLite.

One file holds three tables, created and versioned by this module (the schema lives here, not in the
file; ``SCHEMA_VERSION`` is stored in the ``meta`` table):

``runs``
    one row per tuning session: the hardware and software it ran on (see :func:`current_hardware`), and
    (schema 2) the nvcc and CUTLASS versions and the kernel source hash its variants were built from.
``trials``
    one row per measured (variant, workload): ``state`` is one of :data:`TRIAL_STATES`; ``time_us``,
    ``gbs`` and ``tflops`` are set only for ``'ok'`` trials, ``error`` says what went wrong otherwise.
    Schema 2 adds the provenance of each measurement: ``phase`` (:data:`TRIAL_PHASES`), the length draw's
    ``seed``, the kernel ``source_hash`` and the GPU's SM clock at the start and end of the measurement.
``winners``
    the chosen variant per *workload key* (:data:`WORKLOAD_KEY`): GPU name and SM count,
    CUDA version (major.minor), dtype, h_q, h_kv, s_q, head dims, page size, causal flag, batch bucket
    and sequence-length bucket. Only an ``'ok'`` trial can become a winner. A winner is replaced by a
    faster one, or by any winner measured on different kernel source (``source_hash``: older timings do
    not describe the current kernels). Schema 2 records how the winner was chosen: ``n_repeats``
    interleaved repeats, the relative spread (max - min) / median of the winner's and the default's
    repeats, and ``rule`` (why the winner, possibly the default itself, was kept).

Two databases are consulted at run time (:mod:`flash_mla.selection`): the *shipped* one inside the
package (``flash_mla/tuning_db/flash_mla.sqlite``, absent until one is shipped: a missing file reads as
empty and is never created implicitly) and the *user* one, named by the ``FLASH_MLA_TUNING_DB``
environment variable or by :func:`set_user_db` (the call wins over the variable).

Typical use by a tuner::

    from flash_mla import db
    tdb = db.TuningDB("my.sqlite")                       # created with the current schema if absent
    run_id = tdb.add_run(db.current_hardware())
    wl = dict(dtype="bf16", h_q=128, h_kv=1, s_q=1, page_size=64, causal=False,
              batch=64, mean_sk=4096, capacity_tokens=8192)
    tid = tdb.add_trial(run_id, "study-1", variant, wl, "ok", time_us=41.0)   # a codegen Variant
    tdb.record_winner(tid, default_variant_key=..., default_time_us=..., n_trials=...)

Buckets (:mod:`flash_mla.workload_key`, their one home): ``batch_bucket = bucket_batch(batch)`` and
``seqlen_bucket = bucket_seqlen(mean KV length)``, or ``NO_HINT`` (0) for the winners of calls whose
caller gives no length hint. A trial's workload names ``mean_sk`` (else ``max_sk``, else
``capacity_tokens`` is bucketed); an explicit ``seqlen_bucket`` / ``batch_bucket`` wins.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import sqlite3
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import sqlite_utils

from .workload_key import (HEAD_DIM, HEAD_DIM_V, NO_HINT, SEQLEN_BUCKET_MAX, SEQLEN_BUCKET_MIN,  # noqa: F401
                           bucket_batch, bucket_seqlen)

SCHEMA_VERSION = 2

#: Environment variable naming the user tuning database.
ENV_USER_DB = "FLASH_MLA_TUNING_DB"
#: File name of the shipped database inside the ``flash_mla.tuning_db`` package.
SHIPPED_DB_NAME = "flash_mla.sqlite"


TRIAL_STATES = ("ok", "failed_check", "build_failed", "invalid", "crashed", "timeout")
#: What a measurement was for: the search, the interleaved confirmation of its best candidates and the
#: default, the exhaustive sweep, the hint-free winners' cross-measurements.
TRIAL_PHASES = ("search", "confirm", "bucket", "sweep", "no_hint")

#: Primary key of ``winners``: everything that changes which variant is fastest.
WORKLOAD_KEY = ("gpu_name", "sm_count", "cuda_version", "dtype", "h_q", "h_kv", "s_q", "head_dim",
                "head_dim_v", "page_size", "causal", "batch_bucket", "seqlen_bucket")

RUN_COLUMNS = {
    "id": int, "gpu_name": str, "sm_count": int, "cuda_version": str, "driver_version": str,
    "torch_version": str, "package_version": str, "hostname": str, "created_at": str,
    # schema 2
    "nvcc_version": str, "cutlass_version": str, "source_hash": str,
}
_KEY_TYPES = {
    "gpu_name": str, "sm_count": int, "cuda_version": str, "dtype": str, "h_q": int, "h_kv": int,
    "s_q": int, "head_dim": int, "head_dim_v": int, "page_size": int, "causal": int,
    "batch_bucket": int, "seqlen_bucket": int,
}
TRIAL_COLUMNS = {
    "id": int, "run_id": int, "study": str, "variant_key": str, "variant_json": str, "build_key": str,
    **_KEY_TYPES,
    "batch": int, "mean_sk": float, "state": str, "time_us": float, "gbs": float, "tflops": float,
    "error": str, "created_at": str,
    # schema 2
    "phase": str, "seed": int, "source_hash": str, "sm_clock_start_mhz": int, "sm_clock_end_mhz": int,
}
WINNER_COLUMNS = {
    **_KEY_TYPES,
    "variant_key": str, "variant_json": str, "time_us": float, "default_variant_key": str,
    "default_time_us": float, "run_id": int, "n_trials": int, "updated_at": str,
    # schema 2
    "n_repeats": int, "time_spread": float, "default_time_spread": float, "rule": str, "source_hash": str,
}
TABLES = {"runs": RUN_COLUMNS, "trials": TRIAL_COLUMNS, "winners": WINNER_COLUMNS}
#: Columns each schema version added, per table (the migration adds them to an older file).
_V2_COLUMNS = {
    "runs": ("nvcc_version", "cutlass_version", "source_hash"),
    "trials": ("phase", "seed", "source_hash", "sm_clock_start_mhz", "sm_clock_end_mhz"),
    "winners": ("n_repeats", "time_spread", "default_time_spread", "rule", "source_hash"),
}

# Keys a workload dict given to add_trial may carry.
_WORKLOAD_FIELDS = set(_KEY_TYPES) | {"batch", "mean_sk", "capacity_tokens", "max_sk"}

PathLike = Union[str, os.PathLike]


class UserDBError(RuntimeError):
    """The user tuning database that a setting names cannot be used (a folder, an unreadable file)."""


def open_user_db(path: Path) -> Optional["TuningDB"]:
    """Open the user database read-only; None when the file does not exist (it reads as empty).

    Anything else that is unusable is one :class:`UserDBError` naming the setting and the path."""
    origin = "flash_mla.db.set_user_db" if _user_db_override is not None else f"${ENV_USER_DB}"
    if not path.exists():
        return None
    if not path.is_file():
        raise UserDBError(f"{origin} points at {path}, which is not a file (expected a tuning database)")
    handle = None
    try:
        handle = TuningDB(path, readonly=True)
        handle.winners()                            # sqlite reads lazily: make a damaged file fail here
        return handle
    except (sqlite3.DatabaseError, OSError) as e:
        if handle is not None:
            handle.close()
        raise UserDBError(f"{origin} points at {path}, which cannot be read as a tuning database: {e}") from None


class SchemaVersionError(RuntimeError):
    """The database was written by a newer flash_mla with a schema this version cannot read."""


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------

def cuda_major_minor(version: Optional[str]) -> Optional[str]:
    """``"12.8.1"`` -> ``"12.8"``; ``None`` stays ``None``. The DB keys CUDA by major.minor."""
    if version is None:
        return None
    parts = str(version).strip().split(".")
    return ".".join(parts[:2])


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def current_hardware() -> dict:
    """Hardware and software of this machine, in the shape :meth:`TuningDB.add_run` takes.

    Never fails on a CPU-only machine: the GPU fields are then ``None``.
    """
    info = {"gpu_name": None, "sm_count": None, "cuda_version": None, "driver_version": None,
            "torch_version": None, "package_version": None, "hostname": socket.gethostname(),
            # the toolchain and kernel source: filled by the tuner (flash_mla.tuner.tune.run_info)
            "nvcc_version": None, "cutlass_version": None, "source_hash": None}
    try:
        import torch
        info["torch_version"] = str(torch.__version__)
        info["cuda_version"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            info["gpu_name"] = props.name
            info["sm_count"] = int(props.multi_processor_count)
            info["driver_version"] = _driver_version()
    except Exception:  # pragma: no cover - a broken CUDA setup must not stop bookkeeping
        pass
    try:
        import flash_mla
        info["package_version"] = flash_mla.__version__
    except Exception:  # pragma: no cover
        try:
            from importlib.metadata import version
            info["package_version"] = version("flash-mla-tuned")
        except Exception:
            pass
    return info


def _driver_version() -> Optional[str]:
    """The NVIDIA driver version (``580.159.04``) from NVML, or None where NVML is not installed or fails."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        return None


def _variant_fields(variant: Any) -> tuple[str, str, str, dict]:
    """(variant_key, build_key, variant_json, fields) of a variant: an object with ``key``, ``build_key`` and
    ``as_dict()`` (``flash_mla.codegen.variant.Variant``), or a plain dict of fields, stored as given and named by
    its content (``custom_<digest>``). The database stores variants; it does not interpret them."""
    if all(hasattr(variant, a) for a in ("key", "build_key", "as_dict")):
        d = variant.as_dict()
        return variant.key, variant.build_key, json.dumps(d, sort_keys=True), d
    if isinstance(variant, Mapping):
        d = dict(variant)
        vjson = json.dumps(d, sort_keys=True)
        digest = hashlib.sha256(vjson.encode()).hexdigest()[:16]
        return f"custom_{digest}", f"custom_{digest}", vjson, d
    raise TypeError(f"variant must be a Variant or a dict, got {type(variant).__name__}")


def _ro_connection(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)


# ---------------------------------------------------------------------------------------------------
# the database
# ---------------------------------------------------------------------------------------------------

BUSY_TIMEOUT_MS = 60_000


def _lock_path(path: Path) -> Path:
    """The lock file of a database file: ``.NAME.lock`` beside it."""
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive inter-process lock on a database file: its :func:`_lock_path` file, held by flock for the
    block (schema creation and migration, merges)."""
    with open(_lock_path(path), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class TuningDB:
    """One tuning database file.

    ``TuningDB(path)`` opens ``path`` for writing, creating it (and its parent folder) with the current
    schema if needed and migrating an older schema. ``TuningDB(path, readonly=True)`` opens an existing
    file without ever writing to it; a file without the tables reads as empty. Either way a file with a
    newer schema version raises :class:`SchemaVersionError`. Usable as a context manager.
    """

    def __init__(self, path: PathLike, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"tuning database {self.path} does not exist")
            self.db = sqlite_utils.Database(_ro_connection(self.path))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite_utils.Database(self.path)
            # Concurrent writers (one tuner worker per GPU) wait for each other instead of failing. The
            # journal stays the rollback kind: a WAL file could not be opened read-only from an install
            # folder the reader cannot write, which is where a shipped database lives.
            self.db.conn.execute(f"pragma busy_timeout = {BUSY_TIMEOUT_MS}")
        if readonly:
            self._check_and_migrate()
        else:
            # Processes opening one new file at once (tuner workers) create or migrate its schema one at a time,
            # under the lock merge() uses beside the file: SQLite answers a writer that would deadlock (one
            # reading the version, another creating the tables) with "database is locked" at once, without
            # the busy timeout.
            with _file_lock(self.path):
                self._check_and_migrate()

    # -- lifecycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> "TuningDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TuningDB({str(self.path)!r}{', readonly=True' if self.readonly else ''})"

    # -- schema -------------------------------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        """Version stored in the file; 0 when it has none (not created by this module)."""
        if not self.db["meta"].exists():
            return 0
        rows = list(self.db.query("select value from meta where key = 'schema_version'"))
        return int(rows[0]["value"]) if rows else 0

    def _check_and_migrate(self) -> None:
        found = self.schema_version
        if found > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"tuning database {self.path} has schema version {found}, newer than the version this "
                f"flash_mla understands ({SCHEMA_VERSION}); upgrade flash_mla or use a database it wrote")
        if found == SCHEMA_VERSION or self.readonly:
            return
        with self.db.conn:
            # Version 0 (absent) creates everything at the current version; 1 -> 2 adds provenance columns.
            if found == 0:
                self._create()
            else:
                for table, cols in _V2_COLUMNS.items():
                    have = set(self.db[table].columns_dict)
                    for c in cols:
                        if c not in have:
                            self.db[table].add_column(c, TABLES[table][c])
            self.db["meta"].insert({"key": "schema_version", "value": str(SCHEMA_VERSION)}, pk="key",
                                   replace=True)

    def _create(self) -> None:
        db = self.db
        db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
        db["runs"].create(RUN_COLUMNS, pk="id", not_null={"created_at"}, if_not_exists=True)
        db["trials"].create(TRIAL_COLUMNS, pk="id", foreign_keys=[("run_id", "runs", "id")],
                            not_null={"run_id", "variant_key", "variant_json", "state", "created_at"},
                            if_not_exists=True)
        db["winners"].create(WINNER_COLUMNS, pk=WORKLOAD_KEY, foreign_keys=[("run_id", "runs", "id")],
                             not_null=set(WORKLOAD_KEY) | {"variant_key", "variant_json", "time_us"},
                             if_not_exists=True)
        db["trials"].create_index(["run_id"], if_not_exists=True)
        db["trials"].create_index(["study"], if_not_exists=True)
        db["trials"].create_index(["variant_key"], if_not_exists=True)

    def _require_writable(self) -> None:
        if self.readonly:
            raise PermissionError(f"tuning database {self.path} is open read-only")

    # -- writing ------------------------------------------------------------------------------------
    def add_run(self, info: Optional[Mapping[str, Any]] = None) -> int:
        """Record a tuning session; ``info`` as from :func:`current_hardware` (its default). Returns the id."""
        self._require_writable()
        info = dict(current_hardware() if info is None else info)
        unknown = set(info) - (set(RUN_COLUMNS) - {"id"})
        if unknown:
            raise ValueError(f"unknown run fields: {sorted(unknown)}")
        row = {c: info.get(c) for c in RUN_COLUMNS if c != "id"}
        if row["driver_version"] is not None:
            row["driver_version"] = str(row["driver_version"])
        row["created_at"] = row["created_at"] or _now()
        with self.db.conn:
            return int(self.db["runs"].insert(row).last_pk)

    def add_trial(self, run_id: int, study: Optional[str], variant: Any, workload: Mapping[str, Any],
                  state: str, time_us: Optional[float] = None, gbs: Optional[float] = None,
                  tflops: Optional[float] = None, error: Optional[str] = None, *, phase: Optional[str] = None,
                  seed: Optional[int] = None, source_hash: Optional[str] = None,
                  sm_clock_start_mhz: Optional[int] = None, sm_clock_end_mhz: Optional[int] = None) -> int:
        """Record one measurement and return its id.

        Args:
            run_id: from :meth:`add_run`; the trial's GPU name, SM count and CUDA version default to the
                run's.
            study: name of the search (e.g. the Optuna study) or ``None``.
            variant: a ``Variant`` or the dict of its fields.
            workload: ``dtype`` (default: the variant's), ``h_q``, ``h_kv``, ``s_q``, ``page_size``
                (default: the variant's), ``causal``, ``batch``, ``mean_sk``; optionally ``head_dim`` (576),
                ``head_dim_v`` (512), ``max_sk`` or ``capacity_tokens`` (bucketed into ``seqlen_bucket``
                when ``mean_sk`` is absent), explicit ``batch_bucket`` / ``seqlen_bucket``, and
                ``gpu_name`` / ``sm_count`` / ``cuda_version`` to override the run's.
            state: one of :data:`TRIAL_STATES`.
            time_us, gbs, tflops: the measurement; ``time_us`` is required for, and only kept for, ``'ok'``.
            error: what went wrong (text; anything else is stored as its JSON / ``str``).
            phase: one of :data:`TRIAL_PHASES` (what the measurement was for), or ``None``.
            seed, source_hash, sm_clock_start_mhz, sm_clock_end_mhz: provenance: the length draw's seed,
                the kernel source hash, the GPU's SM clock before and after the measurement.
        """
        self._require_writable()
        if state not in TRIAL_STATES:
            raise ValueError(f"state must be one of {TRIAL_STATES}, got {state!r}")
        if phase is not None and phase not in TRIAL_PHASES:
            raise ValueError(f"phase must be one of {TRIAL_PHASES}, got {phase!r}")
        if state == "ok" and time_us is None:
            raise ValueError("an 'ok' trial needs time_us")
        run = self._run(run_id)
        vkey, bkey, vjson, vdict = _variant_fields(variant)
        key = self._workload_key(workload, vdict, run)
        wl = dict(workload)
        if error is not None and not isinstance(error, str):
            try:
                error = json.dumps(error, sort_keys=True, default=str)
            except (TypeError, ValueError):
                error = str(error)
        ok = state == "ok"
        row = {
            "run_id": int(run_id), "study": study, "variant_key": vkey, "variant_json": vjson,
            "build_key": bkey, **key,
            "batch": None if wl.get("batch") is None else int(wl["batch"]),
            "mean_sk": None if wl.get("mean_sk") is None else float(wl["mean_sk"]),
            "state": state,
            "time_us": float(time_us) if ok else None,
            "gbs": float(gbs) if ok and gbs is not None else None,
            "tflops": float(tflops) if ok and tflops is not None else None,
            "error": error, "created_at": _now(),
            "phase": phase, "seed": None if seed is None else int(seed), "source_hash": source_hash,
            "sm_clock_start_mhz": None if sm_clock_start_mhz is None else int(sm_clock_start_mhz),
            "sm_clock_end_mhz": None if sm_clock_end_mhz is None else int(sm_clock_end_mhz),
        }
        with self.db.conn:
            return int(self.db["trials"].insert(row).last_pk)

    def _run(self, run_id: int) -> dict:
        try:
            return self.db["runs"].get(int(run_id))
        except sqlite_utils.db.NotFoundError:
            raise ValueError(f"no run with id {run_id} in {self.path}") from None

    @staticmethod
    def _workload_key(workload: Mapping[str, Any], vdict: Mapping[str, Any], run: Mapping[str, Any]) -> dict:
        unknown = set(workload) - _WORKLOAD_FIELDS
        if unknown:
            raise ValueError(f"unknown workload fields: {sorted(unknown)} (allowed: {sorted(_WORKLOAD_FIELDS)})")
        wl = dict(workload)
        for f in ("dtype", "page_size"):
            if f in vdict and f in wl and wl[f] != vdict[f]:
                raise ValueError(f"workload {f}={wl[f]!r} but the variant is built for {vdict[f]!r}")
            wl.setdefault(f, vdict.get(f))
        for f in ("gpu_name", "sm_count", "cuda_version"):
            wl.setdefault(f, run.get(f))
        wl.setdefault("head_dim", HEAD_DIM)
        wl.setdefault("head_dim_v", HEAD_DIM_V)
        if wl.get("batch_bucket") is None and wl.get("batch") is not None:
            wl["batch_bucket"] = bucket_batch(wl["batch"])
        if wl.get("seqlen_bucket") is None:
            for src in ("mean_sk", "max_sk", "capacity_tokens"):
                if wl.get(src) is not None:
                    wl["seqlen_bucket"] = bucket_seqlen(float(wl[src]))
                    break
        missing = [f for f in ("dtype", "h_q", "h_kv", "s_q", "page_size", "causal", "batch_bucket",
                               "seqlen_bucket") if wl.get(f) is None]
        if missing:
            raise ValueError(f"workload lacks {missing}")
        key = {}
        for f, typ in _KEY_TYPES.items():
            v = wl.get(f)
            if v is not None:
                v = int(bool(v)) if f == "causal" else typ(v)
            key[f] = v
        key["cuda_version"] = cuda_major_minor(key["cuda_version"])
        return key

    def record_winner(self, trial: Union[int, Mapping[str, Any]], *, default_variant_key: Optional[str] = None,
                      default_time_us: Optional[float] = None, n_trials: Optional[int] = None,
                      time_us: Optional[float] = None, n_repeats: Optional[int] = None,
                      time_spread: Optional[float] = None, default_time_spread: Optional[float] = None,
                      rule: Optional[str] = None) -> bool:
        """Make an ``'ok'`` trial the winner of its workload key unless a faster (or equally fast) one
        measured on the same kernel source is stored: faster relative to the default variant's time of its own
        run where both rows have one, else in absolute time (a stored winner of other source is replaced when
        this one is newer). ``trial`` is a trial id of this DB or a trial row (dict with the trials columns).

        ``default_variant_key`` / ``default_time_us`` record what the default variant achieves on the
        same workload (for reports), ``n_trials`` how many trials the search ran. The winner's
        ``run_id`` and ``source_hash`` are the trial's, taken as is. ``time_us`` replaces the trial's time
        (e.g. the median of repeats); ``n_repeats``, ``time_spread``, ``default_time_spread`` and ``rule``
        say how the winner was chosen (see the module docstring).

        Returns True when the row was written. Raises ValueError for a trial that is not ``'ok'`` or
        lacks a time or a full workload key (a GPU name, SM count and CUDA version included).
        """
        self._require_writable()
        if isinstance(trial, Mapping):
            t = dict(trial)
        else:
            try:
                t = self.db["trials"].get(int(trial))
            except sqlite_utils.db.NotFoundError:
                raise ValueError(f"no trial with id {trial} in {self.path}") from None
        if t.get("state") != "ok":
            raise ValueError(f"only an 'ok' trial can become a winner; trial {t.get('id')} is {t.get('state')!r}")
        if t.get("time_us") is None:
            raise ValueError(f"trial {t.get('id')} has no time_us")
        row = {f: t.get(f) for f in WORKLOAD_KEY}
        opt = lambda x: None if x is None else float(x)       # noqa: E731
        row.update(variant_key=t["variant_key"], variant_json=t["variant_json"],
                   time_us=float(t["time_us"] if time_us is None else time_us),
                   default_variant_key=default_variant_key, default_time_us=opt(default_time_us),
                   run_id=t.get("run_id"), n_trials=n_trials, updated_at=_now(),
                   n_repeats=n_repeats, time_spread=opt(time_spread), default_time_spread=opt(default_time_spread),
                   rule=rule, source_hash=t.get("source_hash"))
        return self._upsert_winner(row)

    def _upsert_winner(self, row: dict) -> bool:
        missing = [f for f in WORKLOAD_KEY if row.get(f) is None]
        if missing:
            raise ValueError(f"a winner needs the full workload key; missing {missing}")
        row = dict(row)
        row["causal"] = int(bool(row["causal"]))
        row["cuda_version"] = cuda_major_minor(row["cuda_version"])
        where = " and ".join(f"[{f}] = ?" for f in WORKLOAD_KEY)
        cols = list(WINNER_COLUMNS)
        conn = self.db.conn
        # Read and write in one IMMEDIATE transaction: a concurrent writer cannot slip in between the
        # comparison and the write (which would let a slower winner overwrite a faster one).
        conn.execute("begin immediate")
        try:
            old = conn.execute(f"select time_us, source_hash, updated_at, default_time_us from winners where {where}",
                               [row[f] for f in WORKLOAD_KEY]).fetchone()
            if old is not None:
                same_source = old[1] is None or row.get("source_hash") is None or old[1] == row["source_hash"]
                # Same kernel source: the faster stays, relative to the default variant measured in each row's own
                # run where both rows have that time (runs on other days or machines differ by a few percent in
                # absolute time), else in absolute time. Other source: the newer stays (older timings do not
                # describe the current kernels).
                if same_source:
                    new_default = row.get("default_time_us")
                    if old[3] and new_default:
                        keep_old = old[0] / old[3] <= row["time_us"] / new_default
                    else:
                        keep_old = old[0] <= row["time_us"]
                else:
                    keep_old = (old[2] or "") >= (row.get("updated_at") or "")
                if keep_old:
                    conn.execute("rollback")
                    return False
            conn.execute(f"insert or replace into winners ({', '.join(f'[{c}]' for c in cols)}) "
                         f"values ({', '.join('?' for _ in cols)})", [row.get(c) for c in cols])
            conn.execute("commit")
        except BaseException:
            if conn.in_transaction:
                conn.execute("rollback")
            raise
        return True

    # -- reading ------------------------------------------------------------------------------------
    def _select(self, table: str, filters: Mapping[str, Any], order: str) -> list[dict]:
        cols = TABLES[table]
        unknown = set(filters) - set(cols)
        if unknown:
            raise ValueError(f"unknown {table} columns: {sorted(unknown)}")
        if not self.db[table].exists():
            return []
        clauses, params = [], []
        for c, v in filters.items():
            if c == "causal" and isinstance(v, bool):
                v = int(v)
            if c == "cuda_version" and table != "runs" and isinstance(v, str):
                v = cuda_major_minor(v)
            if v is None:
                clauses.append(f"[{c}] is null")
            elif isinstance(v, (list, tuple, set, frozenset)):
                v = list(v)
                clauses.append(f"[{c}] in ({', '.join('?' * len(v))})" if v else "0")
                params.extend(v)
            else:
                clauses.append(f"[{c}] = ?")
                params.append(v)
        sql = f"select * from [{table}]"
        if clauses:
            sql += " where " + " and ".join(clauses)
        return list(self.db.query(sql + f" order by {order}", params))

    def runs(self, **filters: Any) -> list[dict]:
        """Rows of ``runs`` whose columns equal the given values (a list/tuple value means "one of")."""
        return self._select("runs", filters, "id")

    def trials(self, **filters: Any) -> list[dict]:
        """Rows of ``trials`` matching the filters (e.g. ``state='ok'``, ``study='s1'``), by id."""
        return self._select("trials", filters, "id")

    def winners(self, **filters: Any) -> list[dict]:
        """Rows of ``winners`` matching the filters (e.g. ``gpu_name=..., dtype='bf16'``), by key."""
        return self._select("winners", filters, ", ".join(f"[{f}]" for f in WORKLOAD_KEY))

    def show(self, **filters: Any) -> list[dict]:
        """Winners as display rows (key, variant, time, default time, speedup over the default)."""
        out = []
        for w in self.winners(**filters):
            r = {f: w[f] for f in WORKLOAD_KEY if f not in ("head_dim", "head_dim_v")}
            r["causal"] = bool(r["causal"])
            r["variant"] = w["variant_key"]
            r["time_us"] = w["time_us"]
            r["default_time_us"] = w["default_time_us"]
            r["speedup"] = (w["default_time_us"] / w["time_us"]
                            if w["default_time_us"] and w["time_us"] else None)
            r["n_trials"] = w["n_trials"]
            out.append(r)
        return out

    # -- export -------------------------------------------------------------------------------------
    def export(self, dest: Union[PathLike, io.TextIOBase], fmt: str = "json", *, table: Optional[str] = None) -> None:
        """Write the database to ``dest`` (a path or a text file object).

        ``fmt='json'``: ``{"schema_version": 1, "runs": [...], "trials": [...], "winners": [...]}``
        (only ``table`` if given). ``fmt='csv'``: one table with a header row, ``winners`` by default.
        """
        if fmt not in ("json", "csv"):
            raise ValueError(f"fmt must be 'json' or 'csv', got {fmt!r}")
        if table is not None and table not in TABLES:
            raise ValueError(f"table must be one of {sorted(TABLES)}, got {table!r}")
        getters = {"runs": self.runs, "trials": self.trials, "winners": self.winners}
        if hasattr(dest, "write"):
            self._export_to(dest, fmt, table, getters)
            return
        dest = Path(dest)
        if dest.exists() and dest.resolve() == self.path.resolve():
            raise ValueError(f"refusing to export {self.path} onto itself: name another output file")
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")      # written whole, then renamed
        try:
            with open(tmp, "w", newline="" if fmt == "csv" else None, encoding="utf-8") as f:
                self._export_to(f, fmt, table, getters)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _export_to(f, fmt, table, getters) -> None:
        if fmt == "json":
            names = [table] if table else list(TABLES)
            doc = {"schema_version": SCHEMA_VERSION, **{n: getters[n]() for n in names}}
            json.dump(doc, f, indent=1, sort_keys=False)
            f.write("\n")
        else:
            name = table or "winners"
            w = csv.DictWriter(f, fieldnames=list(TABLES[name]))
            w.writeheader()
            w.writerows(getters[name]())


def open_db(path: PathLike, *, readonly: bool = False) -> TuningDB:
    """Open (and for writing, create or migrate) the tuning database at ``path``."""
    return TuningDB(path, readonly=readonly)


def merge(src_paths: Iterable[PathLike], dst: Union[PathLike, TuningDB]) -> dict:
    """Merge the databases ``src_paths`` into ``dst`` (created if absent).

    Runs and trials are united: each gets a fresh id in ``dst`` (trials and winners follow their run),
    and a row identical to one already in ``dst`` (every column but the ids) is not added again, so
    merging the same source twice adds nothing. For a workload key present on both sides the rule of
    :meth:`TuningDB.record_winner` decides (same kernel source: the faster relative to its own run's default,
    else in absolute time; other source: the newer). A source that is ``dst`` itself is skipped. Every source
    is opened read-only and checked before anything is written: a missing source raises FileNotFoundError, one
    with a newer schema SchemaVersionError, a file that is not a tuning database (no schema of this module, or not
    sqlite at all) ValueError naming it.

    ``dst`` given as a path is never half-merged: the merge goes into a temporary copy, under a lock
    beside ``dst``, which then replaces ``dst`` by rename; a failure or a kill leaves ``dst`` as it was.

    Returns counts: ``runs_added``, ``trials_added``, ``winners_written``, ``sources_skipped``.
    """
    if isinstance(dst, TuningDB):
        return _merge_into(src_paths, dst)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dst):
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.merging")
        try:
            if dst.exists():
                shutil.copyfile(dst, tmp)
            with TuningDB(tmp) as out:
                stats = _merge_into(src_paths, out, dst_real=dst.resolve())
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
            # the temporary copy's own lock file (TuningDB(tmp) took it); dst's stays, as every flock file does
            _lock_path(tmp).unlink(missing_ok=True)
    return stats


def _merge_into(src_paths: Iterable[PathLike], out: TuningDB, dst_real: Optional[Path] = None) -> dict:
    stats = {"runs_added": 0, "trials_added": 0, "winners_written": 0, "sources_skipped": 0}
    dst_real = dst_real or out.path.resolve()
    sources = []
    try:
        for src_path in src_paths:                      # check every source before writing anything
            src_path = Path(src_path)
            if src_path.resolve() == dst_real or (src_path.exists() and dst_real.exists()
                                                  and os.path.samefile(src_path, dst_real)):
                stats["sources_skipped"] += 1
                continue
            try:
                src = TuningDB(src_path, readonly=True)
                sources.append(src)
                version = src.schema_version
                src.winners()
            except sqlite3.DatabaseError as e:
                raise ValueError(f"{src_path} is not a tuning database ({e})") from None
            if version == 0:
                raise ValueError(f"{src_path} is not a tuning database (no schema version): nothing merged")
        for src in sources:
            _merge_one(src, out, stats)
    finally:
        for src in sources:
            src.close()
    return stats


def _merge_one(src: TuningDB, out: TuningDB, stats: dict) -> None:
    run_cols = [c for c in RUN_COLUMNS if c != "id"]
    trial_cols = [c for c in TRIAL_COLUMNS if c != "id"]
    existing_runs = {tuple(r.get(c) for c in run_cols): r["id"] for r in out.runs()}
    existing_trials = {tuple(t.get(c) for c in trial_cols) for t in out.trials()}
    run_map: dict[int, int] = {}
    with out.db.conn:
        for r in src.runs():
            sig = tuple(r.get(c) for c in run_cols)             # a schema-1 source lacks the newer columns
            if sig not in existing_runs:
                existing_runs[sig] = int(out.db["runs"].insert({c: r.get(c) for c in run_cols}).last_pk)
                stats["runs_added"] += 1
            run_map[r["id"]] = existing_runs[sig]
        new_trials = []
        for t in src.trials():
            row = {c: t.get(c) for c in trial_cols}
            row["run_id"] = run_map.get(t["run_id"], t["run_id"])
            sig = tuple(row[c] for c in trial_cols)
            if sig in existing_trials:
                continue
            new_trials.append(row)
            existing_trials.add(sig)
        out.db["trials"].insert_all(new_trials, batch_size=1000)    # batched, not one statement per row
        stats["trials_added"] += len(new_trials)
    for w in src.winners():
        w = dict(w)
        if w.get("run_id") is not None:
            w["run_id"] = run_map.get(w["run_id"])
        if out._upsert_winner(w):
            stats["winners_written"] += 1


# ---------------------------------------------------------------------------------------------------
# where the databases live
# ---------------------------------------------------------------------------------------------------

_user_db_override: Optional[Path] = None


def shipped_db_path() -> Optional[Path]:
    """Path of the database shipped inside the package, or ``None`` when the package has none."""
    try:
        res = resources.files("flash_mla.tuning_db") / SHIPPED_DB_NAME
    except ModuleNotFoundError:  # pragma: no cover
        return None
    if not res.is_file():
        return None
    try:
        return Path(os.fspath(res))
    except TypeError:  # pragma: no cover - a zipped install: not supported for the shipped DB
        return None


_user_db_listeners: list = []


def on_user_db_change(callback) -> None:
    """Call ``callback()`` whenever :func:`set_user_db` changes the user database (a reader that caches what
    it read, such as :mod:`flash_mla.selection`, registers here; this module imports none of its readers)."""
    if callback not in _user_db_listeners:
        _user_db_listeners.append(callback)


def set_user_db(path: Optional[PathLike]) -> None:
    """Use ``path`` as the user tuning database (``None``: back to ``$FLASH_MLA_TUNING_DB``).

    Readers registered with :func:`on_user_db_change` (the selection caches) are told, so the next call looks
    again.
    """
    global _user_db_override
    _user_db_override = None if path is None else Path(path)
    for callback in list(_user_db_listeners):
        callback()


def user_db_path() -> Optional[Path]:
    """The user database: the path given to :func:`set_user_db`, else ``$FLASH_MLA_TUNING_DB``, else None.
    The file need not exist (a missing one reads as empty)."""
    if _user_db_override is not None:
        return _user_db_override
    env = os.environ.get(ENV_USER_DB)
    return Path(env).expanduser() if env else None


def format_rows(rows: list[dict]) -> str:
    """Plain-text table of ``rows`` (e.g. from :meth:`TuningDB.show`) for a terminal."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])

    def cell(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


__all__ = [
    "SCHEMA_VERSION", "TRIAL_STATES", "WORKLOAD_KEY", "ENV_USER_DB", "SchemaVersionError", "TuningDB",
    "open_db", "merge", "bucket_batch", "bucket_seqlen", "cuda_major_minor", "current_hardware",
    "shipped_db_path", "set_user_db", "on_user_db_change", "user_db_path", "format_rows",
]
