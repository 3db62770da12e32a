"""``flash-mla`` command line: build variants, check them on the GPU, benchmark them."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _variants_by_key(spec: str):
    from flash_mla.codegen.variant import variants_by_key
    try:
        return variants_by_key(list(dict.fromkeys(spec.split(","))))
    except ValueError as e:
        raise SystemExit(str(e))


def _variants(args):
    from flash_mla.codegen.variant import default_variant, search_space
    if args.variants == "default":
        return [default_variant(d, ps) for d in args.dtypes for ps in args.page_sizes]
    if args.variants == "all":
        return [v for d in args.dtypes for ps in args.page_sizes for v in search_space(d, ps)]
    return _variants_by_key(args.variants)


def _unique_builds(variants):
    seen, out = set(), []
    for v in variants:
        if v.build_key not in seen:
            seen.add(v.build_key)
            out.append(v)
    return out


def _resource_cols(a):
    r = a.resources.get("decode_kernel")
    return (r.registers, r.spills) if r else ("-", "-")


def _db_winners(path):
    import json as _json
    from flash_mla import db
    from flash_mla.codegen.variant import Variant
    with db.TuningDB(path, readonly=True) as h:
        return [Variant.from_dict(_json.loads(r["variant_json"])) for r in h.winners()]


def _db_winners_all():
    """Winners of the user and shipped databases (to prebuild before timing)."""
    from flash_mla import db
    out = []
    for path in (db.user_db_path(), db.shipped_db_path()):
        if path is not None and path.exists():
            out += _db_winners(path)
    return out


def cmd_build(args) -> int:
    from flash_mla.codegen.build import build
    if args.from_db:       # every winner, and the default of every dtype and page size (the fallback)
        from flash_mla.codegen.variant import DTYPES, PAGE_SIZES, default_variant
        variants = _unique_builds(_db_winners(args.from_db) + [default_variant(d, p) for d in DTYPES
                                                               for p in PAGE_SIZES])
    else:
        variants = _unique_builds(_variants(args))
    t0 = time.time()
    print(f"building {len(variants)} variant binaries with {args.jobs} jobs ...", flush=True)
    arts = build(variants, jobs=args.jobs)
    print(f"{'binary':34} {'ok':>3} {'regs':>5} {'spill B':>8} {'smem B':>7}")
    for a in arts:
        regs, spills = _resource_cols(a)
        print(f"{a.variant.build_key:34} {'yes' if a.ok else 'NO':>3} {regs:>5} {spills:>8} {a.variant.smem_bytes():>7}")
    failed = [a for a in arts if not a.ok]
    # A built variant the tuner may not measure (spills, serialised wgmmas): a note here; with --from-db an error,
    # since the database would select it.
    rejected = [(a, why) for a in arts if a.ok and (why := a.rejection())]
    for a, why in rejected:
        print(f"{'error' if args.from_db else 'note'}: {a.variant.build_key}: {why}")
    for a in failed:
        print(f"--- {a.variant.build_key} failed:\n{a.error}", file=sys.stderr)
    print(f"{len(arts) - len(failed)}/{len(arts)} built in {time.time() - t0:.0f} s")
    return 1 if failed or (args.from_db and rejected) else 0


#: Modules of the ``tune`` extra each command needs (pip install 'flash-mla-tuned[tune]').
_EXTRA_MODULES = {"tune": ("optuna", "tqdm"), "bench": ("tqdm", "matplotlib")}


class ExtraMissing(RuntimeError):
    """A command needs the ``tune`` extra, which is not installed."""


def _require_extra(cmd: str) -> None:
    import importlib.util
    missing = [m for m in _EXTRA_MODULES.get(cmd, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise ExtraMissing(f"needs the tuning extra, which is not installed (missing: {', '.join(missing)}): "
                           f"pip install 'flash-mla-tuned[tune]'")


def _require_sm90():
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: running kernels needs an SM90 GPU (H100/H200/H800). "
                         "Use `flash-mla build --compile-only` to compile every variant without one.")
    cap = torch.cuda.get_device_capability()
    if cap != (9, 0):
        raise SystemExit(f"GPU {torch.cuda.get_device_name()} has compute capability {cap}; kernels need SM90")


def cmd_check(args) -> int:
    _require_sm90()
    import torch
    from flash_mla.codegen.build import build
    from flash_mla.tuner.check import check_variant, full_matrix, sampled_matrix
    variants = _variants(args)
    arts = {a.variant.build_key: a for a in build(_unique_builds(variants), jobs=args.jobs)}
    results, table = [], []
    for v in variants:
        a = arts[v.build_key]
        if not a.ok:
            table.append((v.key, "-", "-", 0, 0, "build failed"))
            continue
        cases = full_matrix() if args.full else sampled_matrix(args.cases, seed=args.seed)
        t0 = time.time()
        rows = check_variant(v, cases, seed=args.seed)
        bad = [r for r in rows if not r.get("ok")]
        worst = max((r.get("out_max_abs", 0.0) for r in rows), default=0.0)
        regs, spills = _resource_cols(a)
        table.append((v.key, regs, spills, len(rows), len(bad), f"{worst:.2e}"))
        results.append({"variant": v.as_dict(), "key": v.key, "rows": rows})
        print(f"{v.key}: {len(rows) - len(bad)}/{len(rows)} passed ({time.time() - t0:.0f} s)", flush=True)
        for r in bad[:5]:
            print("   FAIL", {k: r.get(k) for k in ("case", "out_max_abs", "out_mismatches", "out_nonfinite",
                                                   "lse_max_abs", "lse_mismatches", "lse_nonfinite", "error")})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, default=str)
    print(f"\n{'variant':36} {'regs':>5} {'spill':>6} {'cases':>6} {'fail':>5} {'max|out-ref|':>12}")
    for row in table:
        print(f"{row[0]:36} {row[1]:>5} {row[2]:>6} {row[3]:>6} {row[4]:>5} {row[5]:>12}")
    nfail = sum(r[4] for r in table) + sum(1 for r in table if r[5] == "build failed")
    print(f"variants: {len(table)}, failing cases: {nfail}")
    return 1 if nfail else 0


def cmd_bench(args) -> int:
    _require_sm90()
    from tqdm import tqdm
    from flash_mla.codegen.build import build
    from flash_mla.codegen.variant import default_variant, search_space
    from flash_mla.tuner import bench
    from flash_mla.tuner.measure import ceilings
    from flash_mla.tuner.peers import open_peers
    shapes = bench.GRIDS[args.grid]()
    if args.overhead:
        return _bench_overhead(args, shapes)
    if args.kv_fp8:
        return _bench_kv_fp8(args, shapes)
    impls = {f"default ({default_variant().key})": default_variant()}
    if not args.no_tuned:
        impls[bench.TUNED] = bench.tuned_variant
    if args.all_variants:
        impls.update({v.key: v for v in search_space("bf16", 64)})
    if args.variants:
        impls.update({v.key: v for v in _variants_by_key(args.variants) if (v.dtype, v.page_size) == ("bf16", 64)})
    # Peers first: a bad folder is one error (PeerError, reported by main) before anything is built.
    peers = open_peers(args.peer or [], log_dir=args.out)
    for p in peers:
        print(f"peer {p.label}: {p.module}", flush=True)
    try:
        fixed = [v for v in impls.values() if not callable(v)]
        arts = build(_unique_builds(fixed + (_db_winners_all() if not args.no_tuned else [])), jobs=args.jobs)
        failed = {a.variant.build_key for a in arts if not a.ok}
        impls = {k: v for k, v in impls.items() if callable(v) or v.build_key not in failed}
        print("measuring ceilings ...", flush=True)
        ceil = ceilings()
        per_shape = len(impls) + len(peers) + (1 if peers else 0) + (0 if args.no_reference else 1)
        with tqdm(total=len(shapes) * per_shape, desc="bench", unit="run") as bar:
            def progress(row):
                bar.update(1)
                if row and row.get("ok"):
                    bar.set_postfix_str(f"{row['shape']} {row['impl'][:20]} {row['us']:.0f}us")
            rows = bench.run(shapes, impls, include_reference=not args.no_reference, seed=args.seed,
                             progress=progress, peers=peers, ceil=ceil)
    finally:
        for p in peers:
            p.close()
    rows = [bench.with_ceilings(r, ceil) for r in rows]
    summary = bench.peer_summary(rows) if peers else None
    paths = bench.write_reports(rows, ceil, args.out, summary=summary)
    print(f"reports: {', '.join(str(p) for p in paths.values())}")
    print(bench.format_table(rows, ceil))
    for r in rows:
        if not r.get("ok"):
            print(f"FAILED {r['shape']} {r['impl']}: {str(r.get('error'))[-600:]}")
    if summary:
        print()
        print(bench.format_peer_table(summary, ceil))
    return 0 if all(r.get("ok") for r in rows) else 1


def _bench_kv_fp8(args, shapes) -> int:
    from flash_mla.codegen.build import build
    from flash_mla.codegen.variant import default_variant
    from flash_mla.tuner import bench
    from flash_mla.tuner.measure import ceilings
    fp8_default = default_variant(bench.FP8, 64)
    fp8 = {f"fp8 default ({fp8_default.key})": fp8_default}
    impls = {f"bf16 default ({default_variant().key})": default_variant()}
    if not args.no_tuned:
        impls["bf16 " + bench.TUNED] = bench.tuned_variant
        # first: the float8 call's selection (its DB winner, else the default), the ratios' numerator
        fp8 = {"fp8 selection (DB winner, else default)": lambda pr: bench.tuned_variant(pr) or fp8_default, **fp8}
    for v in _variants_by_key(args.variants) if args.variants else []:    # more variants of either dtype
        if v.page_size == 64 and v.dtype in ("bf16", bench.FP8):
            (impls if v.dtype == "bf16" else fp8)[v.key] = v
    fixed = [v for v in list(fp8.values()) + list(impls.values()) if not callable(v)]
    arts = build(_unique_builds(fixed + (_db_winners_all() if not args.no_tuned else [])), jobs=args.jobs)
    bad = [a for a in arts if not a.ok and a.variant.build_key in {v.build_key for v in fixed}]
    if bad:
        raise SystemExit(f"build failed: {bad[0].variant.key}: {bad[0].error[-400:]}")
    ceil = ceilings()
    rows = bench.kv_fp8_run(shapes, impls, fp8, seed=args.seed,
                            progress=lambda r: print(f"  {r['shape']} {r['impl']}: "
                                                     f"{'%.1f us' % r['us'] if r.get('ok') else 'FAILED'}", flush=True))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "kv_fp8.json", "w") as f:
        json.dump({"ceilings": ceil, "rows": rows}, f, indent=1, default=str)
    print(bench.format_kv_fp8_table(rows, ceil))
    failed = [r for r in rows if not r.get("ok")]
    for r in failed:
        print(f"FAILED {r['shape']} {r['impl']}: {str(r.get('error'))[-600:]}")
    return 1 if failed else 0


def _bench_overhead(args, shapes) -> int:
    from flash_mla.tuner import bench
    from flash_mla.tuner.peers import open_peers
    peers = open_peers(args.peer or [], log_dir=args.out)
    for p in peers:
        print(f"peer {p.label}: {p.module}", flush=True)
    try:
        rows = bench.overhead_run(shapes, peers, seed=args.seed,
                                  progress=lambda r: print(f"  {r['shape']} {r['impl']}: "
                                                           f"{'%.1f us eager' % r['eager'] if r.get('ok') else 'FAILED'}",
                                                           flush=True))
    finally:
        for p in peers:
            p.close()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "overhead.json", "w") as f:
        json.dump(rows, f, indent=1, default=str)
    print(bench.format_overhead_table(rows))
    for r in rows:
        if not r.get("ok"):
            print(f"FAILED {r['shape']} {r['impl']}: {str(r.get('error'))[-600:]}")
    return 0 if all(r.get("ok") for r in rows) else 1


def cmd_evaluate(args) -> int:
    from flash_mla.tuner import evaluate
    if args.combine:                              # shards' evaluate.json files -> one table, no GPU
        rows = []
        for path in args.combine:
            try:
                rows += json.loads(Path(path).read_text())["rows"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"flash-mla evaluate --combine: {path} is not an evaluate.json ({e})")
        _write_json_atomic(Path(args.out) / "evaluate.json", {"rows": rows, "summary": evaluate.summary(rows)})
        print(evaluate.format_table(rows))
        return 0
    _require_sm90()
    from flash_mla.codegen.build import build
    from flash_mla.codegen.variant import search_space
    from flash_mla.tuner.workloads import SUITES, suite
    workloads = evaluate.held_out() if not args.suites else [w for name in SUITES for w in suite(name)]
    if args.shard:
        k, n = args.shard
        workloads = workloads[k - 1::n]
    space = search_space("bf16", 64)
    arts = build(_unique_builds(space), jobs=args.jobs)
    failed = {a.variant.build_key for a in arts if not a.ok}
    space = [v for v in space if v.build_key not in failed]
    print(f"{len(workloads)} {'suite' if args.suites else 'held-out'} workloads x {len(space)} variants of the searched space"
          + (f" ({len(failed)} binaries failed to build)" if failed else ""), flush=True)
    rows = evaluate.evaluate(workloads, space, rep_ms=args.rep_ms, seed=args.seed,
                             progress=lambda w, what, us: print(f"  {w.shape.name} {what}: "
                                                               f"{'%.1f us' % us if us else 'FAILED'}", flush=True))
    _write_json_atomic(Path(args.out) / "evaluate.json", {"rows": rows, "summary": evaluate.summary(rows)})
    print(evaluate.format_table(rows))
    return 0 if all(r["hint_us"] and r["nohint_us"] and not r["n_failed"] for r in rows) else 1


def _workloads(args):
    from flash_mla.tuner.workloads import suite
    return [w for name in (args.suite or []) for w in suite(name)] + list(args.workload or [])


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line and exit 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _write_json_atomic(path: Path, obj) -> None:
    from flash_mla.codegen.build import write_atomic
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=1, default=str))


def _shard(text: str) -> tuple[int, int]:
    """K/N with 1 <= K <= N."""
    k, sep, n = text.partition("/")
    try:
        k, n = int(k), int(n)
    except ValueError:
        k = n = 0
    if not sep or n < 1 or not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N, got {text!r}")
    return k, n


def _int_at_least(text: str, lowest: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or v < lowest:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _gpu_list(text: str) -> str:
    """Comma-separated GPU indices (kept as text: worker processes receive it as is)."""
    parts = text.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU indices such as 0,1, got {text!r}")
    return text


_BOOLS = {"1": True, "true": True, "0": False, "false": False}


def _workload_spec(text: str):
    """``h_q=..,s_q=..,batch=..,mean_sk=..[,h_kv=..,causal=0|1,dtype=bf16|fp16,page_size=64|32]``."""
    from flash_mla.codegen.variant import DTYPES, PAGE_SIZES
    from flash_mla.tuner.workloads import Workload
    bad = argparse.ArgumentTypeError
    kv = {}
    for item in text.split(","):
        if "=" not in item:
            raise bad(f"malformed workload item {item!r} in {text!r}: expected name=value")
        k, v = (x.strip() for x in item.split("=", 1))
        kv[k] = v
    ints = ("h_q", "s_q", "batch", "mean_sk", "h_kv", "page_size")
    unknown = set(kv) - set(ints) - {"causal", "dtype"}
    if unknown:
        raise bad(f"unknown workload fields {sorted(unknown)} in {text!r}")
    missing = {"h_q", "s_q", "batch", "mean_sk"} - set(kv)
    if missing:
        raise bad(f"workload {text!r} lacks {sorted(missing)}")
    fields = {}
    for k in ints:
        if k in kv:
            try:
                fields[k] = _positive_int(kv[k])
            except argparse.ArgumentTypeError:
                raise bad(f"workload field {k} must be a positive integer, got {kv[k]!r}") from None
    if "causal" in kv:
        if kv["causal"].lower() not in _BOOLS:
            raise bad(f"workload field causal must be 0, 1, true or false, got {kv['causal']!r}")
        fields["causal"] = _BOOLS[kv["causal"].lower()]
    if "dtype" in kv:
        if kv["dtype"] not in DTYPES:
            raise bad(f"workload field dtype must be one of {DTYPES}, got {kv['dtype']!r}")
        fields["dtype"] = kv["dtype"]
    if fields.get("page_size", PAGE_SIZES[0]) not in PAGE_SIZES:
        raise bad(f"workload field page_size must be one of {PAGE_SIZES}, got {fields['page_size']}")
    if fields["h_q"] % fields.get("h_kv", 1):
        raise bad(f"workload h_q={fields['h_q']} is not a multiple of h_kv={fields['h_kv']}")
    return Workload(**fields)


def _default_db_path():
    from flash_mla import db
    return str(db.user_db_path() or "flash_mla_tuning.sqlite")


def cmd_tune(args) -> int:
    _require_sm90()
    import subprocess
    import torch
    from flash_mla.db import TuningDB
    from flash_mla.tuner import tune
    workloads = _workloads(args)
    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else [torch.cuda.current_device()]
    from flash_mla.tuner.claims import Claims
    if len(gpus) > 1 and args.worker_of is None:
        # One worker process per GPU on the shared study storage: Optuna's distributed mode. The storage's
        # tables and the claims table are created here, once, not by the workers racing each other.
        tune.open_storage(args.storage)
        Claims.for_storage(args.storage).close()
        procs = []
        for g in gpus:
            cmd = [sys.executable, "-m", "flash_mla.cli", *sys.argv[sys.argv.index("tune"):], "--gpus", str(g),
                   "--worker-of", args.gpus]
            procs.append(subprocess.Popen(cmd))
        return max(p.wait() for p in procs)
    hw = tune.run_info()
    gpu_name = hw["gpu_name"]
    storage = tune.open_storage(args.storage)
    claims = Claims.for_storage(args.storage)     # each variant measured by one worker of a shared study
    worker_index = args.worker_of.split(",").index(str(gpus[0])) if args.worker_of else 0
    with TuningDB(args.db) as db:
        run_id = db.add_run(hw)
        # Stored winners (any GPU) whose variants a new study measures right after the default.
        stored = tune.stored_winners(db)
        transfer_rows = () if args.no_transfer else stored
        # The variant space compiles in the background, the points each study measures first first; a study
        # waits only for the binaries it is about to measure (tune.SpaceBuild).
        first = [v for w in workloads for v in tune.first_points(w, transfer_rows, gpu_name)]
        failed = tune.start_space_build(workloads, first, jobs=args.jobs)
        print("compiling the variant space in the background, each study's first points first ...", flush=True)
        try:
            summary, no_hint = _run_studies(args, tune, storage, db, run_id, gpu_name, gpus, workloads, failed,
                                            claims, worker_index, stored, transfer_rows)
        finally:
            failed.close()
    for build_key, why in sorted(failed.rejected().items()):
        print(f"not measured: {build_key}: {why}", flush=True)
    _print_tune_summary(summary, no_hint)
    print(f"results in {args.db}; studies in {args.storage}")
    return 0


def _run_studies(args, tune, storage, db, run_id, gpu_name, gpus, workloads, failed, claims, worker_index, stored,
                 transfer_rows):
    """Each workload's study, recorded; then the winners for calls without a length hint."""
    from tqdm import tqdm
    summary = []
    for w in workloads:
        with tqdm(total=args.trials, desc=w.key, unit="trial") as bar:
            def on_trial(r):
                bar.update(1)
                best = f"{r['best_us']:.1f}us" if r["best_us"] else "-"
                bar.set_postfix_str(f"best {best}, last {r['variant']} {r['state']}")
            confirm = {k: v for k, v in (("confirm_top", args.confirm_top),
                                         ("confirm_rounds", args.confirm_rounds)) if v is not None}
            res = tune.tune_workload(w, storage, db, run_id, gpu_name, n_trials=args.trials,
                                     timeout_s=args.timeout, gpu=gpus[0], seed=args.seed,
                                     build_failed=failed, on_trial=on_trial, claims=claims,
                                     worker_index=worker_index, transfer_rows=transfer_rows, **confirm)
        tune.record(db, run_id, res, gpu_name)
        summary.append(res)
        if args.sweep:
            res.sweep = tune.sweep(w, storage, db, run_id, gpu_name, gpu=gpus[0], seed=args.seed,
                                   build_failed=failed)
            res.sweep["plot"] = tune.plot_search(Path(args.plots) / f"{w.key}.png", res, storage, gpu_name)
    # Calls without a length hint: one winner per group of workloads that differ only in length.
    no_hint = tune.no_hint_winners(summary, db, run_id, gpu_name, gpu=gpus[0], seed=args.seed,
                                   stored_rows=stored, build_failed=failed)
    return summary, no_hint


def _print_tune_summary(summary, no_hint) -> None:
    print(f"\n{'workload':44} {'best variant':28} {'tuned us':>9} {'default us':>10} {'speedup':>8}")
    for r in summary:
        if r.best is None:
            print(f"{r.workload.key:44} {'(no variant passed)':28}")
            continue
        d = r.default_us
        print(f"{r.workload.key:44} {r.best['variant'].key:28} {r.best['us']:9.1f} "
              f"{d if d is None else round(d, 1)!s:>10} {(d / r.best['us']) if d else float('nan'):7.2f}x")
        ti = r.best.get("trial_index")
        print(f"    first measured at search trial {'-' if ti is None else ti + 1} of {len(r.history)}")
        if r.choice is not None:
            ds = r.choice["default_spread"]
            print(f"    confirmed over {len(r.confirmed[r.choice['key']])} interleaved rounds: spread "
                  f"{r.choice['spread']:.1%} (default {'-' if ds is None else format(ds, '.1%')}); {r.choice['rule']}")
        sw = r.sweep
        if sw and sw["best_key"]:
            print(f"    exhaustive sweep: best {sw['best_key']} {sw['best_us']:.1f} us over {sw['n']} variants; "
                  f"study within 3% after {sw['trials_to_3pct']} measured trials; plot {sw.get('plot')}")
    if no_hint:
        print("\nwithout a length hint (geometric mean over each group's lengths: this run's and those stored for "
              "this GPU):")
        print(f"{'workload':44} {'variant':28} {'us':>9} {'default us':>10} {'vs best':>8}")
        for g in no_hint:
            d = g["default_us"]
            print(f"{g['key'].canonical:44} {g['variant'].key:28} {g['us']:9.1f} "
                  f"{d if d is None else round(d, 1)!s:>10} {g['score']:7.3f}x")


def cmd_db(args) -> int:
    import sqlite3
    from flash_mla import db
    if args.action == "merge":
        try:
            stats = db.merge(args.paths, args.into)
        except ValueError as e:
            raise SystemExit(f"flash-mla db merge: {e}")
        print(f"merged into {args.into}: {stats}")
        return 0
    path = args.db or db.user_db_path() or db.shipped_db_path()
    if path is None:
        raise SystemExit("no database: pass --db, set FLASH_MLA_TUNING_DB, or install a package with a shipped DB")
    try:
        h = db.TuningDB(path, readonly=True)
        h.winners()
    except sqlite3.DatabaseError as e:
        raise sqlite3.DatabaseError(f"{path} cannot be read as a tuning database: {e}") from None
    with h:
        if args.action == "show":
            print(f"{path}:")
            print(db.format_rows(h.show()))
        else:
            try:
                h.export(args.out, fmt=args.format)
            except ValueError as e:
                raise SystemExit(f"flash-mla db export: {e}")
            print(f"exported {path} to {args.out}")
    return 0


def main(argv=None) -> int:
    from flash_mla.codegen.variant import DTYPES, PAGE_SIZES
    from flash_mla.tuner.bench import GRIDS
    from flash_mla.tuner.workloads import SUITES
    ap = _Parser(prog="flash-mla", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--variants", default="default", help="'default', 'all' or comma-separated variant keys")
        p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
        p.add_argument("--page-sizes", nargs="+", type=int, default=list(PAGE_SIZES), choices=list(PAGE_SIZES))
        p.add_argument("--jobs", type=_positive_int, default=os.cpu_count() or 1, help="parallel nvcc jobs")

    p = sub.add_parser("build", help="compile variants (no GPU needed) and print the ptxas report")
    common(p)
    p.add_argument("--compile-only", action="store_true", help="accepted for clarity: build never needs a GPU")
    p.add_argument("--from-db", default=None, help="prebuild every winner of this tuning database and every default variant instead")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("check", help="build variants and check each against the reference on the GPU")
    common(p)
    p.add_argument("--full", action="store_true", help="the whole FlashMLA correctness matrix per variant")
    p.add_argument("--cases", type=_positive_int, default=48, help="sampled cases per variant (without --full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write per-case results as JSON here")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="time implementations over a shape grid against measured ceilings (SM90 GPU)")
    p.add_argument("--grid", choices=list(GRIDS), default="default",
                   help="default: memory-bound, compute-bound, MTP and fixed-length shapes; latency: its b <= 8 "
                        "shapes; memory: its h_q <= 32 shapes; compute: its h_q >= 64 shapes; quick: one shape per "
                        "regime; overhead: b1 shapes "
                        "and the quick grid")
    p.add_argument("--overhead", action="store_true",
                   help="host overhead instead of kernel time: per-call host, eager and CUDA-graph times of the "
                        "public API, the registered operator, the Python path and each --peer")
    p.add_argument("--kv-fp8", action="store_true",
                   help="a float8 e4m3 KV cache (the default bf16_e4m3 variant) beside the bf16 default and tuned "
                        "selection on each shape: times, fp8 / bf16 and the float8 kernel's bandwidth")
    p.add_argument("--variants", default=None, help="also these bf16 / page-64 variants (comma-separated keys)")
    p.add_argument("--all-variants", action="store_true", help="also every bf16 / page-64 variant of the space")
    p.add_argument("--no-reference", action="store_true", help="skip the torch reference baseline")
    p.add_argument("--no-tuned", action="store_true", help="skip the tuned selection (DB winners)")
    p.add_argument("--peer", action="append", metavar="DIR",
                   help="a folder holding a package 'flash_mla' with FlashMLA's classic API, checked and timed "
                        "beside ours in its own process (repeatable); adds the per-shape floor and ours / best peer")
    p.add_argument("--out", default="bench_out", help="folder for bench.csv, bench.json, bench.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=_positive_int, default=os.cpu_count() or 1, help="parallel nvcc jobs")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("evaluate", help="held-out workloads: the API's selection (with and without the length "
                       "hint) against the exhaustive best of the searched space (SM90 GPU)")
    p.add_argument("--out", default="evaluate_out", help="folder for evaluate.json")
    p.add_argument("--rep-ms", type=_positive_int, default=100, help="timing budget per measurement")
    p.add_argument("--suites", action="store_true",
                   help="the tuning suites' own workloads instead of the held-out ones (an exhaustive sweep of each)")
    p.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                   help="only workloads K, K+N, K+2N, ... (1-based) of the list, so that the sweep can be split over "
                        "several runs; join their evaluate.json files with --combine")
    p.add_argument("--combine", nargs="+", default=None, metavar="EVALUATE_JSON",
                   help="no measurement: join these evaluate.json files (shards) into one table and --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=_positive_int, default=os.cpu_count() or 1, help="parallel nvcc jobs")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("tune", help="Optuna search of the variant space per workload; winners into the tuning DB")
    tune_parser = p
    p.add_argument("--suite", action="append", choices=list(SUITES), help="named suite (repeatable)")
    p.add_argument("--workload", action="append", type=_workload_spec,
                   help="h_q=..,s_q=..,batch=..,mean_sk=..[,h_kv=..,causal=1,dtype=bf16,page_size=64] (repeatable)")
    p.add_argument("--trials", type=_positive_int, default=16, help="new measurements per workload")
    p.add_argument("--timeout", type=float, default=None, help="seconds per workload study (waits for its binaries to compile included)")
    p.add_argument("--storage", default="flash_mla_studies.journal",
                   help="Optuna storage: a journal file (default) or an RDB URL such as postgresql://...")
    p.add_argument("--db", default=None, help="tuning database to write (default: $FLASH_MLA_TUNING_DB or "
                   "./flash_mla_tuning.sqlite)")
    p.add_argument("--gpus", type=_gpu_list, default=None,
                   help="comma-separated GPU indices: one worker process per GPU")
    p.add_argument("--worker-of", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sweep", action="store_true", help="also measure every variant and report trials-to-3%%, "
                   "with a plot per study of its best-so-far beside random search's median (--plots)")
    p.add_argument("--plots", default="tune_plots", help="folder of the --sweep plots (default ./tune_plots)")
    p.add_argument("--no-transfer", action="store_true",
                   help="do not start new studies from the stored winners nearest to each workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--confirm-top", type=_positive_int, default=None,
                   help="best candidates re-measured beside the default after the search (default 2)")
    p.add_argument("--confirm-rounds", type=_non_negative_int, default=None,
                   help="interleaved confirmation rounds (default 5; 0: the lowest single time wins)")
    p.add_argument("--jobs", type=_positive_int, default=os.cpu_count() or 1, help="parallel nvcc jobs")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("db", help="inspect, export and merge tuning databases")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("show", help="print the winners")
    q.add_argument("--db", default=None)
    q = dsub.add_parser("export", help="write a database as JSON or CSV")
    q.add_argument("--db", default=None)
    q.add_argument("--out", required=True)
    q.add_argument("--format", choices=["json", "csv"], default="json")
    q = dsub.add_parser("merge", help="merge databases into one")
    q.add_argument("paths", nargs="+")
    q.add_argument("--into", required=True)
    p.set_defaults(func=cmd_db)

    args = ap.parse_args(argv)
    if args.cmd == "tune":
        if not (args.suite or args.workload):
            tune_parser.error("name at least one --suite or --workload")
        if args.timeout is not None and args.timeout <= 0:
            tune_parser.error(f"--timeout must be > 0 seconds, got {args.timeout}")
        if args.db is None:
            args.db = _default_db_path()
        from flash_mla.tuner.worker import injected_faults
        try:
            injected_faults()                   # a malformed fault-injection setting, before any GPU work
        except ValueError as e:
            print(f"flash-mla tune: {e}", file=sys.stderr)
            return 1
    try:
        _require_extra(args.cmd)
        return args.func(args)
    except _environment_errors() as e:
        # A setting, file or toolchain that cannot be used: one line and exit 1 ($FLASH_MLA_DEBUG=1: traceback).
        if os.environ.get("FLASH_MLA_DEBUG"):
            raise
        print(f"flash-mla {args.cmd}: {e}", file=sys.stderr)
        return 1


def _environment_errors() -> tuple:
    import sqlite3
    from flash_mla.codegen.build import BuildError
    from flash_mla.db import SchemaVersionError, UserDBError
    from flash_mla.tuner.peers import PeerError
    return (BuildError, UserDBError, SchemaVersionError, PeerError, ExtraMissing, sqlite3.DatabaseError,
            FileNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
