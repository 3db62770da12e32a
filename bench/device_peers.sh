#!/usr/bin/env bash
# One device call for the project beside its peers. On the development machine first:
#   bash ../shared/peers/stage.sh && cp ../shared/peers/device_setup.sh .peers/   (peers, git-ignored)
#   pip download the runtime wheels the GPU image lacks into .whl/ (sqlite-utils, optuna and their needs)
# then run, carrying .peers, .whl (and .cache to reuse binaries built here):
#   bash bench/device_peers.sh OUTDIR STEP...
# Steps: check-wide (sampled matrix, default variant of every merge x dtype x page size), full-wide (whole
# matrix, bf16 / page 64 default wide_pdl variant), memcheck, racecheck, bench:GRID[:KEYS] (flash-mla bench
# with the three peers; KEYS = extra variants), profile:KEYS (per-kernel times of those variants). Logs go to OUTDIR; each step prints its table.
set -uo pipefail
out=${1:?usage: device_peers.sh OUTDIR STEP...}; shift
repo=$(pwd)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
bash scripts/stage_site.sh /tmp/fmla-site
source .peers/device_setup.sh                      # starts FlashMLA's build in the background
export PYTHONPATH=/tmp/fmla-site:/tmp/site:$PYTHONPATH
export FLASH_MLA_CUTLASS_INCLUDE=/tmp/peer-cutlass/cutlass_library/source/include
export FLASH_MLA_CACHE_DIR=$repo/.cache/flash_mla FLASHINFER_JIT_DIR=/tmp/fi-jit
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
cd "$(mktemp -d)"                                   # flash_mla must come from /tmp/fmla-site
wide_defaults=$(python3 -c "
import dataclasses
from flash_mla.codegen.variant import default_variant as d
print(','.join(dataclasses.replace(d(t, p), merge=m).key for t in ('bf16', 'fp16') for p in (64, 32)
               for m in ('separate', 'wide_pdl')))")
for step in "$@"; do
  case $step in
    check-wide) python3 -m flash_mla.cli check --variants "$wide_defaults" --jobs 8 --out "$out/check.json" \
                  > "$out/check.txt" 2>&1; echo "check rc=$?"; grep -A20 "^variant " "$out/check.txt";;
    full-wide) python3 -m flash_mla.cli check --variants "$(echo "$wide_defaults" | cut -d, -f2)" --full \
                 > "$out/full.txt" 2>&1; echo "full rc=$?"; tail -3 "$out/full.txt";;
    memcheck|racecheck|synccheck) compute-sanitizer --tool $step --error-exitcode 9 python3 \
                 "$repo/bench/memcheck_cases.py" "$(echo "$wide_defaults" | cut -d, -f2)" > "$out/$step.txt" 2>&1
               echo "$step rc=$?"; tail -6 "$out/$step.txt";;
    profile:*) IFS=: read -r _ keys <<< "$step"
               python3 "$repo/bench/profile_kernels.py" "$keys" 1,1,32,1024 1,1,16,16384 1,1,128,4096,fixed \
                 8,1,16,4096 128,1,16,16384 > "$out/profile.txt" 2>&1; echo "profile rc=$?"; cat "$out/profile.txt";;
    bench:*) IFS=: read -r _ grid keys <<< "$step"
             echo "waiting for FlashMLA's build ..."; wait $PEERS_BUILD_PID; tail -2 /tmp/peer-flashmla-build.log
             python3 -m flash_mla.cli bench --grid "$grid" --no-reference --jobs 8 ${keys:+--variants "$keys"} \
               --peer "$PEER_FLASHMLA_DIR" --peer "$PEER_FLASHINFER_DIR" --peer "$PEER_FA3MLA_DIR" \
               --out "$out" > "$out/bench-$grid.txt" 2> "$out/bench-$grid.err"
             echo "bench rc=$?"; grep -B2 -A200 "^device" "$out/bench-$grid.txt" | tail -120;;
    *) echo "unknown step $step"; exit 2;;
  esac
done
