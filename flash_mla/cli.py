"""``flash-mla`` command line: build variants, check them on the GPU, benchmark them."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _variants(args):
    from flash_mla.codegen.variant import Variant, default_variant, full_space, search_space
    if args.variants == "default":
        return [default_variant(d, ps) for d in args.dtypes for ps in args.page_sizes]
    if args.variants == "all":
        vs = [v for d in args.dtypes for ps in args.page_sizes for v in search_space(d, ps)]
    else:
        keys = set(args.variants.split(","))
        vs = [v for v in full_space() if v.key in keys]
        missing = keys - {v.key for v in vs}
        if missing:
            raise SystemExit(f"unknown variant keys: {sorted(missing)}")
    return vs


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


def cmd_build(args) -> int:
    from flash_mla.codegen.build import build
    variants = _unique_builds(_variants(args))
    t0 = time.time()
    print(f"building {len(variants)} variant binaries with {args.jobs} jobs ...", flush=True)
    arts = build(variants, jobs=args.jobs)
    print(f"{'binary':34} {'ok':>3} {'regs':>5} {'spill B':>8} {'smem B':>7}")
    for a in arts:
        regs, spills = _resource_cols(a)
        print(f"{a.variant.build_key:34} {'yes' if a.ok else 'NO':>3} {regs:>5} {spills:>8} {a.variant.smem_bytes():>7}")
    failed = [a for a in arts if not a.ok]
    for a in failed:
        print(f"--- {a.variant.build_key} failed:\n{a.error}", file=sys.stderr)
    print(f"{len(arts) - len(failed)}/{len(arts)} built in {time.time() - t0:.0f} s")
    return 1 if failed else 0


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
    shapes = bench.quick_grid() if args.grid == "quick" else bench.default_grid()
    impls = {f"default ({default_variant().key})": default_variant()}
    if args.all_variants:
        impls.update({v.key: v for v in search_space("bf16", 64)})
    arts = build(_unique_builds(list(impls.values())), jobs=args.jobs)
    failed = {a.variant.build_key for a in arts if not a.ok}
    impls = {k: v for k, v in impls.items() if v.build_key not in failed}
    print("measuring ceilings ...", flush=True)
    ceil = ceilings()
    total = len(shapes) * (len(impls) + (0 if args.no_reference else 1))
    with tqdm(total=total, desc="bench", unit="run") as bar:
        def progress(row):
            bar.update(1)
            if row.get("ok"):
                bar.set_postfix_str(f"{row['shape']} {row['impl'][:20]} {row['us']:.0f}us")
        rows = bench.run(shapes, impls, include_reference=not args.no_reference, seed=args.seed, progress=progress)
    rows = [bench.with_ceilings(r, ceil) for r in rows]
    paths = bench.write_reports(rows, ceil, args.out)
    print(f"reports: {', '.join(str(p) for p in paths.values())}")
    print(bench.format_table(rows, ceil))
    return 0 if all(r.get("ok") for r in rows) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="flash-mla", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--variants", default="default", help="'default', 'all' or comma-separated variant keys")
        p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
        p.add_argument("--page-sizes", nargs="+", type=int, default=[64, 32])
        p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc jobs")

    p = sub.add_parser("build", help="compile variants (no GPU needed) and print the ptxas report")
    common(p)
    p.add_argument("--compile-only", action="store_true", help="accepted for clarity: build never needs a GPU")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("check", help="build variants and check each against the reference on the GPU")
    common(p)
    p.add_argument("--full", action="store_true", help="the whole FlashMLA correctness matrix per variant")
    p.add_argument("--cases", type=int, default=48, help="sampled cases per variant (without --full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write per-case results as JSON here")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="time implementations over a shape grid against measured ceilings (SM90 GPU)")
    p.add_argument("--grid", choices=["default", "quick"], default="default")
    p.add_argument("--all-variants", action="store_true", help="also every bf16 / page-64 variant of the space")
    p.add_argument("--no-reference", action="store_true", help="skip the torch reference baseline")
    p.add_argument("--out", default="bench_out", help="folder for bench.csv, bench.json, bench.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc jobs")
    p.set_defaults(func=cmd_bench)

    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
