#!/usr/bin/env bash
# GPU session steps, each logged under OUTDIR. Usage: bash bench/gpu_session.sh OUTDIR STEP...
# Steps: build (every variant), check (sampled matrix, every variant), full (whole matrix, default bf16
# variant), pytest (gpu-marked tests), memcheck (compute-sanitizer), quick (timings vs ceilings).
# Expects flash_mla importable (e.g. PYTHONPATH from scripts/stage_site.sh).
set -uo pipefail
out=${1:?usage: gpu_session.sh OUTDIR STEP...}; shift
export PYTHONUNBUFFERED=1
repo=$(pwd)
cd "$(mktemp -d)"     # keep the source folder off sys.path: flash_mla must come from the install
for step in "$@"; do
  case $step in
    build) python3 -m flash_mla.cli build --variants all --jobs "$(nproc)" > "$out/build.txt" 2>&1
           echo "build rc=$?"; tail -2 "$out/build.txt";;
    check) python3 -m flash_mla.cli check --variants all --cases 60 --out "$out/check_all.json" > "$out/check_all.txt" 2>&1
           echo "check rc=$?"; grep -A100 "^variant " "$out/check_all.txt";;
    full) python3 -m flash_mla.cli check --variants default --dtypes bf16 --page-sizes 64 --full \
            --out "$out/check_full.json" > "$out/check_full.txt" 2>&1
          echo "full rc=$?"; tail -4 "$out/check_full.txt";;
    pytest) python3 -m pytest -q -m gpu "$repo/tests" -p no:cacheprovider > "$out/pytest_gpu.txt" 2>&1
            echo "pytest rc=$?"; tail -5 "$out/pytest_gpu.txt";;
    memcheck) compute-sanitizer --tool memcheck --error-exitcode 9 python3 "$repo/bench/memcheck_cases.py" \
                > "$out/memcheck.txt" 2>&1; echo "memcheck rc=$?"; tail -5 "$out/memcheck.txt";;
    quick) python3 -m flash_mla.cli bench --grid quick --out "$out" > "$out/quick.txt" 2>"$out/quick_err.txt"
           echo "quick rc=$?"; grep -A200 "^device" "$out/quick.txt";;
    *) echo "unknown step $step"; exit 2;;
  esac
done
