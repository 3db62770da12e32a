#!/usr/bin/env bash
# One device call for the project beside its peers. On the development machine first:
#   bash ../shared/peers/stage.sh && cp ../shared/peers/device_setup.sh .peers/   (peers, git-ignored)
#   pip download the runtime wheels the GPU image lacks into .whl/ (sqlite-utils, optuna and their needs)
# then run, carrying .peers, .whl (and .cache to reuse binaries built here):
#   bash bench/device_peers.sh OUTDIR STEP...
# Steps: check-wide (sampled matrix, default variant of every merge x dtype x page size), check:KEYS, full-wide (whole
# matrix, bf16 / page 64 default wide_pdl variant), memcheck[:KEY], racecheck[:KEY], synccheck[:KEY], bench:GRID[:KEYS] (flash-mla bench
# with the three peers; KEYS = extra variants), bench2:GRID[:KEYS] (the same beside FlashInfer and FA3-MLA only, no FlashMLA build), profile:KEYS[:SHAPES] (per-kernel times of those variants; SHAPES space-separated b,s_q,h_q,sk[,fixed][,causal]),
# ncu:KEY:SHAPE (Nsight Compute sections of one decode launch), ncupipe:KEY:SHAPE (tensor pipe, shared memory, L2, DRAM), ncupeer:PEER:SHAPE (the same metrics for
# every kernel of bench/peer_once.py's two calls of a peer, PEER = fa3 / flashinfer), trace:SHAPE[:KEY] (qreg phase cycles), timeline:SHAPES[:KEY] (nsplit start-up
# stamps of every CTA, SHAPES space-separated), ncusrc:KEY:SHAPE (stall samples per SASS instruction, CSV), tune:SUITES:TRIALS[:notransfer] (into OUTDIR/tuned[-notransfer].sqlite), tunewl:WORKLOAD[+WORKLOAD...]:TRIALS[:notransfer] (the same for workloads given as flash-mla tune --workload specs), usedb (later steps select from OUTDIR/tuned.sqlite first),
# ab:GROUPS:SHAPES[:ROUNDS] (bench/ab_rounds.py: groups "A,B;C,D", each against its first variant, interleaved rounds),
# packcache[:DTYPE:PAGE] (flash-mla build of that searched space, default bf16 / 64, then the whole binary cache as
# OUTDIR/cache.tar.xz.aa, .ab, ... (15 MiB parts; the bf16 / page-64 space's 120 binaries: one 8.6 MB part). Put the
# parts in .cachexz/ (git-ignored) and carry .cachexz: every later call unpacks them into
# .cache before its steps, so nothing of that space is compiled again; the cache is content-addressed, so after a
# kernel source change the archived binaries are simply not found and are rebuilt; the same archive can be made on the
# development machine when its nvcc and CUTLASS are the device's (the cache folder's hash includes both: compare the
# nvcc / cutlass columns of a device run's runs table): FLASH_MLA_CACHE_DIR=/tmp/pc/flash_mla flash-mla build --variants
# all --dtypes bf16 --page-sizes 64 --jobs 2, then tar cf - -C /tmp/pc flash_mla | xz -6 | split -b 15M - .cachexz/cache.tar.xz.),
# savecache (the binary cache as it is, packed the same way: after a tune step, the binaries its space build made),
# probe (bench/probe_wgmma.cu: P V and Q K^T of the qreg schedule alone, cycles per tile against the peak),
# tunefault:WORKLOAD:TRIALS:FAULTS (a tuner run with $FLASH_MLA_TUNER_FAULT=FAULTS into OUTDIR/fault.sqlite),
# flashmla-tests (FlashMLA's tests/test_flash_mla.py against this package, bf16 and fp16), pytest (-m gpu), pytest:EXPR (-m gpu -k EXPR),
# oob (a length past the block table under compute-sanitizer, without and with FLASH_MLA_CHECK_VALUES=1),
# evaluate[:K/N[:REP_MS]] (flash-mla evaluate: the API's selection on held-out workloads against the searched space's best;
# K/N: every N-th workload from the K-th, its evaluate.json as OUTDIR/evaluate-KofN.json for flash-mla evaluate
# --combine; REP_MS: its --rep-ms),
# overhead[:GRID] (flash-mla bench --overhead: per-call host / eager / graph times beside FlashMLA and FA3-MLA), overhead0[:GRID] (ours alone),
# full:KEYS (flash-mla check --full: the whole matrix for those variants), kvfp8:GRID[:KEYS] (flash-mla bench --kv-fp8, KEYS: more bf16 / fp8 variants),
# freshcache (later steps build into an empty binary cache, as on a machine that never built a variant),
# coldstart (import, warm_up and first calls with no nvcc or CUTLASS reachable: binaries from the carried cache).
# Logs go to OUTDIR; each step prints its table.
set -uo pipefail
out=${1:?usage: device_peers.sh OUTDIR STEP...}; shift
repo=$(pwd)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
bash scripts/stage_site.sh /tmp/fmla-site
if [[ " $* " == *" bench:"* || " $* " == *" bench2:"* || " $* " == *" overhead:"* || " $* " == *" ncupeer:"* ]]; then
  source .peers/device_setup.sh                    # peers; starts FlashMLA's build in the background
  if [[ " $* " != *" bench:"* && " $* " != *" overhead:"* ]]; then   # bench2 only: no FlashMLA, stop its build
    kill $PEERS_BUILD_PID 2>/dev/null; pkill -f "setup.py build_ext" 2>/dev/null; pkill -x nvcc 2>/dev/null; true
  fi
else
  python3 -m zipfile -e .peers/whl/nvidia_cutlass-*.whl /tmp/peer-cutlass
fi
if compgen -G ".cachexz/cache.tar.xz.*" > /dev/null; then   # binaries built on an earlier machine (packcache)
  mkdir -p .cache && cat .cachexz/cache.tar.xz.* | xz -d | tar xf - -C .cache || exit 1
fi
export PYTHONPATH=/tmp/fmla-site:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export FLASH_MLA_CUTLASS_INCLUDE=/tmp/peer-cutlass/cutlass_library/source/include
export FLASH_MLA_CACHE_DIR=$repo/.cache/flash_mla FLASHINFER_JIT_DIR=/tmp/fi-jit
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
final=$out; out=$final/logs; mkdir -p "$out"         # everything but the bench tables goes into one archive
pack_cache() {   # the binary cache as OUTDIR/cache.tar.xz.aa, .ab, ... (15 MiB parts) for .cachexz/
  tar cf - -C "$repo/.cache" flash_mla | xz -T16 -6 | split -b 15M - "$final/cache.tar.xz."
  echo "binary cache: $(ls "$repo/.cache/flash_mla" | wc -l) entries"; ls -la "$final"/cache.tar.xz.*
}
trap 'cp "$out"/bench-*.txt "$out"/bench.json "$final"/ 2>/dev/null; tar czf "$final/logs.tgz" -C "$out" .' EXIT
cd "$(mktemp -d)"                                   # flash_mla must come from /tmp/fmla-site
wide_defaults=$(python3 -c "
import dataclasses
from flash_mla.codegen.variant import default_variant as d
print(','.join(dataclasses.replace(d(t, p), merge=m).key for t in ('bf16', 'fp16') for p in (64, 32)
               for m in ('separate', 'wide_pdl')))")
# Tensor pipe, shared memory, L2 / DRAM and issue metrics of the ncupipe and ncupeer steps.
pipe_metrics=sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,\
sm__inst_executed_pipe_tensor_op_hmma.avg.pct_of_peak_sustained_active,\
l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed,\
l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,lts__t_sectors.avg.pct_of_peak_sustained_elapsed,\
dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
smsp__issue_active.avg.pct_of_peak_sustained_active
for step in "$@"; do
  case $step in
    check-wide) python3 -m flash_mla.cli check --variants "$wide_defaults" --jobs 8 --out "$out/check.json" \
                  > "$out/check.txt" 2>&1; echo "check rc=$?"; grep -A20 "^variant " "$out/check.txt";;
    full-wide) python3 -m flash_mla.cli check --variants "$(echo "$wide_defaults" | cut -d, -f2)" --full \
                 > "$out/full.txt" 2>&1; echo "full rc=$?"; tail -3 "$out/full.txt";;
    memcheck*|racecheck*|synccheck*) IFS=: read -r tool key <<< "$step"   # TOOL[:KEY], default: the wide default
               compute-sanitizer --tool $tool --error-exitcode 9 python3 "$repo/bench/memcheck_cases.py" \
                 "${key:-$(echo "$wide_defaults" | cut -d, -f2)}" > "$out/$tool-${key:-default}.txt" 2>&1
               echo "$step rc=$?"; tail -6 "$out/$tool-${key:-default}.txt";;
    full:*) IFS=: read -r _ keys <<< "$step"
            python3 -m flash_mla.cli check --variants "$keys" --full --jobs 8 > "$out/full-keys.txt" 2>&1
            echo "full check rc=$?"; grep -A20 "^variant " "$out/full-keys.txt"; tail -2 "$out/full-keys.txt";;
    coldstart) mkdir -p /tmp/no-cuda /tmp/no-cutlass     # no nvcc, no CUTLASS: binaries from the cache only
               env PATH=$(echo "$PATH" | tr ':' '\n' | grep -v -i cuda | paste -sd:) FLASH_MLA_CUDA_HOME=/tmp/no-cuda \
                 FLASH_MLA_CUTLASS_INCLUDE=/tmp/no-cutlass python3 "$repo/bench/cold_start.py" > "$out/coldstart.txt" 2>&1
               echo "coldstart rc=$?"; cat "$out/coldstart.txt" | tail -8;;
    kvfp8:*) IFS=: read -r _ grid keys <<< "$step"
             python3 -m flash_mla.cli bench --kv-fp8 --grid "$grid" --jobs 8 ${keys:+--variants "$keys"} --out "$out" \
               > "$out/kvfp8-$grid.txt" 2>&1
             echo "bench --kv-fp8 rc=$?"; grep -B1 -A80 "^device" "$out/kvfp8-$grid.txt"; grep FAILED "$out/kvfp8-$grid.txt" | head;;
    check:*) IFS=: read -r _ keys <<< "$step"
             # (bounded: a kernel that never completes would otherwise take the whole call)
             timeout 300 python3 -m flash_mla.cli check --variants "$keys" --jobs 8 > "$out/check-keys.txt" 2>&1
             echo "check rc=$?"; grep -A20 "^variant " "$out/check-keys.txt";;
    profile:*) IFS=: read -r _ keys shapes <<< "$step"
               python3 "$repo/bench/profile_kernels.py" "$keys" ${shapes:-1,1,32,1024 1,1,16,4096 1,1,16,16384 \
                 1,1,128,4096,fixed 8,1,16,4096} > "$out/profile.txt" 2>&1; echo "profile rc=$?"; cat "$out/profile.txt";;
    ncu:*) IFS=: read -r _ key shape <<< "$step"
           ncu --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
             --section SchedulerStats --section MemoryWorkloadAnalysis -k regex:decode_kernel -c 1 \
             --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
             python3 "$repo/bench/profile_kernels.py" --once "$key" "$shape" > "$out/ncu-$shape.txt" 2>&1
           echo "ncu rc=$?"; grep -E "Duration|Elapsed Cycles|stalled_.* [1-9]|Stall|Warp Cycles|Issued|Throughput|Registers|Block Size|Grid Size|Waves|Dynamic Shared|Hit Rate|One or More|No Eligible" "$out/ncu-$shape.txt" | head -60;;
    ncupipe:*) IFS=: read -r _ key shape <<< "$step"   # tensor pipe, shared memory, L2 / DRAM of one decode launch
           ncu -k regex:decode_kernel -c 1 --metrics "$pipe_metrics" \
             python3 "$repo/bench/profile_kernels.py" --once "$key" "$shape" > "$out/ncupipe-$key-$shape.txt" 2>&1
           echo "ncupipe rc=$?"; echo "$key $shape"; grep -E "^ +[a-z]+__" "$out/ncupipe-$key-$shape.txt";;
    packcache*) IFS=: read -r _ dtype page <<< "$step"   # build a searched space, pack the whole cache for carrying
          python3 -m flash_mla.cli build --variants all --dtypes "${dtype:-bf16}" --page-sizes "${page:-64}" --jobs 16 \
            > "$out/build.txt" 2>&1
          echo "packcache build rc=$?"; tail -1 "$out/build.txt"
          pack_cache;;
    savecache) pack_cache;;   # the binary cache as it is (what earlier steps built, e.g. a tune step's space build)
    ab:*) IFS=: read -r _ groups shapes rounds <<< "$step"   # interleaved A/B rounds (bench/ab_rounds.py)
          timeout 400 python3 "$repo/bench/ab_rounds.py" --rounds "${rounds:-3}" "$groups" $shapes > "$out/ab.txt" 2>&1
          echo "ab rc=$?"; cat "$out/ab.txt";;
    trace:*) IFS=: read -r _ shape key <<< "$step"     # qreg phase cycles from the trace build (bench/trace_qreg.py)
           python3 "$repo/bench/trace_qreg.py" "$shape" $key > "$out/trace-$shape.txt" 2>&1
           echo "trace rc=$?"; tail -16 "$out/trace-$shape.txt";;
    timeline:*) IFS=: read -r _ shapes key <<< "$step"  # nsplit start-up stamps of every CTA (bench/timeline.py)
           for shape in $shapes; do
             python3 "$repo/bench/timeline.py" "$shape" $key > "$out/timeline-$shape.txt" 2>&1
             echo "timeline $shape rc=$?"; tail -22 "$out/timeline-$shape.txt"
           done;;
    ncupeer:*) IFS=: read -r _ peer shape <<< "$step"  # the ncupipe metrics for every kernel of bench/peer_once.py
           case $peer in flashinfer) dir=$PEER_FLASHINFER_DIR;; *) dir=$PEER_FA3MLA_DIR;; esac
           python3 "$repo/bench/peer_once.py" "$dir" "$shape" > /dev/null 2>&1   # a first run: JIT builds, caches
           ncu --target-processes all --metrics "$pipe_metrics" \
             python3 "$repo/bench/peer_once.py" "$dir" "$shape" > "$out/ncupeer-$peer-$shape.txt" 2>&1
           echo "ncupeer rc=$?"; echo "$peer $shape"; grep -E "^  [A-Za-z_].*\(|^ +[a-z]+__" "$out/ncupeer-$peer-$shape.txt" | tail -40;;
    ncusrc:*) IFS=: read -r _ key shape <<< "$step"     # per-SASS-instruction stall samples of one decode launch
           tag=$(echo "$key-$shape" | tr -c 'A-Za-z0-9_\n-' '_')
           ncu --section WarpStateStats --section SourceCounters -k regex:decode_kernel -c 1 -o "$out/src-$tag" \
             python3 "$repo/bench/profile_kernels.py" --once "$key" "$shape" > "$out/ncusrc-$tag.log" 2>&1
           echo "ncu rc=$?"; ncu -i "$out/src-$tag.ncu-rep" --page source --csv --print-source sass \
             > "$final/sass-$tag.csv" 2>> "$out/ncusrc-$tag.log"; echo "source page rc=$?"; wc -c "$final/sass-$tag.csv";;
    oob) PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 "$repo/bench/oob_demo.py" \
           > "$out/oob-default.txt" 2>&1
         echo "default mode: rc=$?, $(grep -c "Invalid __global__ read" "$out/oob-default.txt") invalid global reads"
         grep -m1 -A2 "Invalid __global__ read" "$out/oob-default.txt"; grep "decode ran\|ERROR SUMMARY" "$out/oob-default.txt"
         FLASH_MLA_CHECK_VALUES=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
           python3 "$repo/bench/oob_demo.py" > "$out/oob-checked.txt" 2>&1
         echo "FLASH_MLA_CHECK_VALUES=1: rc=$?"; grep "value check\|ERROR SUMMARY" "$out/oob-checked.txt";;
    pytest) python3 -m pytest -q -m gpu "$repo/tests" -p no:cacheprovider > "$out/pytest_gpu.txt" 2>&1
            echo "pytest -m gpu rc=$?"; tail -3 "$out/pytest_gpu.txt";;
    pytest:*) expr=${step#pytest:}                 # the GPU tests whose names match EXPR (pytest -k)
            python3 -m pytest -q -m gpu -k "$expr" "$repo/tests" -p no:cacheprovider > "$out/pytest_gpu_k.txt" 2>&1
            echo "pytest -m gpu -k $expr rc=$?"; tail -15 "$out/pytest_gpu_k.txt";;
    flashmla-tests) for dt in bf16 fp16; do    # FlashMLA's own test file against this package (48 cases each)
                      python3 "$repo/.peers/flashmla-9edee0c/tests/test_flash_mla.py" --dtype $dt > "$out/fmla-test-$dt.txt" 2>&1
                      echo "FlashMLA tests/test_flash_mla.py --dtype $dt: rc=$?, $(grep -c "TFLOPS" "$out/fmla-test-$dt.txt") cases passed"
                    done;;
    probe) nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)   # the two GEMMs of qreg alone (bench/probe_wgmma.cu)
           "$nvcc" -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I "$repo/templates" \
             -I "$FLASH_MLA_CUTLASS_INCLUDE" -I "$(dirname "$nvcc")/../include/cccl" "$repo/bench/probe_wgmma.cu" \
             -o /tmp/probe_wgmma > "$out/probe-build.txt" 2>&1 && /tmp/probe_wgmma > "$out/probe.txt" 2>&1
           echo "probe rc=$?"; cat "$out/probe.txt"; tail -3 "$out/probe-build.txt";;
    freshcache) export FLASH_MLA_CACHE_DIR=/tmp/fresh-cache/flash_mla   # later steps compile into an empty cache
           echo "binary cache for later steps: $FLASH_MLA_CACHE_DIR (empty)";;
    usedb) export FLASH_MLA_TUNING_DB=$final/tuned.sqlite   # later steps select from this run's tuned rows first
           echo "user tuning DB: $FLASH_MLA_TUNING_DB";;
    tune:*|tunewl:*) IFS=: read -r kind items trials nt <<< "$step"   # SUITES or WORKLOAD[+WORKLOAD...], then
            if [[ $kind == tune ]]; then targets=$(for x in ${items//,/ }; do echo --suite $x; done)   # TRIALS[:notransfer]
            else targets=$(for x in ${items//+/ }; do echo --workload $x; done); fi           # (own DB, studies, log)
            python3 -m flash_mla.cli tune $targets --trials "$trials" \
              ${nt:+--no-transfer} --db "$final/tuned${nt:+-$nt}.sqlite" --storage "$out/studies${nt:+-$nt}.journal" \
              --jobs 16 > "$out/tune${nt:+-$nt}.txt" 2>&1
            echo "tune${nt:+ --no-transfer} rc=$?"; grep -A80 "^workload" "$out/tune${nt:+-$nt}.txt";;
    tunefault:*) IFS=: read -r _ wl trials faults <<< "$step"   # WORKLOAD:TRIALS:KIND:KEY[,KIND:KEY] (injected faults)
            FLASH_MLA_TUNER_FAULT="$faults" python3 -m flash_mla.cli tune --workload "$wl" --trials "$trials" \
              --db "$final/fault.sqlite" --storage "$out/fault.journal" --jobs 16 > "$out/tunefault.txt" 2>&1
            echo "tune with $faults injected: rc=$?"; grep -A8 "^workload" "$out/tunefault.txt"
            python3 -c "
import sqlite3, sys; c = sqlite3.connect(sys.argv[1])
for r in c.execute('select variant_key, state, time_us, substr(error, 1, 60) from trials order by id'): print(*r)
print('winners:', *c.execute('select variant_key from winners'))" "$final/fault.sqlite";;
    bench:*) IFS=: read -r _ grid keys <<< "$step"
             python3 -m flash_mla.cli build --from-db /tmp/fmla-site/flash_mla/tuning_db/flash_mla.sqlite --jobs 8 \
               > "$out/build.txt" 2>&1; tail -1 "$out/build.txt"   # the tuned selection's binaries, beside FlashMLA's build
             echo "waiting for FlashMLA's build ..."; wait $PEERS_BUILD_PID; tail -1 /tmp/peer-flashmla-build.log
             python3 -m flash_mla.cli bench --grid "$grid" --no-reference --jobs 8 ${keys:+--variants "$keys"} \
               --peer "$PEER_FLASHMLA_DIR" --peer "$PEER_FLASHINFER_DIR" --peer "$PEER_FA3MLA_DIR" \
               --out "$out" > "$out/bench-$grid.txt" 2> "$out/bench-$grid.err"
             echo "bench rc=$?"; grep -B2 -A200 "^device" "$out/bench-$grid.txt" | tail -120;;
    bench2:*) IFS=: read -r _ grid keys <<< "$step"   # as bench, beside FlashInfer and FA3-MLA only (no FlashMLA build)
             python3 -m flash_mla.cli build --from-db /tmp/fmla-site/flash_mla/tuning_db/flash_mla.sqlite --jobs 8 \
               > "$out/build.txt" 2>&1; tail -1 "$out/build.txt"
             python3 -m flash_mla.cli bench --grid "$grid" --no-reference --jobs 8 ${keys:+--variants "$keys"} \
               --peer "$PEER_FLASHINFER_DIR" --peer "$PEER_FA3MLA_DIR" \
               --out "$out" > "$out/bench-$grid.txt" 2> "$out/bench-$grid.err"
             echo "bench rc=$?"; grep -B2 -A200 "^device" "$out/bench-$grid.txt" | tail -120;;
    overhead:*) IFS=: read -r _ grid <<< "$step"   # host overhead: ours (C++ launcher, torch.ops, Python path), FlashMLA, FA3-MLA
             echo "waiting for FlashMLA's build ..."; wait $PEERS_BUILD_PID; tail -1 /tmp/peer-flashmla-build.log
             python3 -m flash_mla.cli bench --overhead --grid "${grid:-overhead}" --peer "$PEER_FLASHMLA_DIR" \
               --peer "$PEER_FA3MLA_DIR" --out "$out" > "$out/overhead-${grid:-overhead}.txt" 2>&1
             echo "overhead rc=$?"; grep -A80 "^per call" "$out/overhead-${grid:-overhead}.txt"; grep FAILED "$out/overhead-${grid:-overhead}.txt" | head;;
    overhead0:*) IFS=: read -r _ grid <<< "$step"   # host overhead of ours alone (no peers, no FlashMLA build)
             python3 -m flash_mla.cli bench --overhead --grid "${grid:-overhead}" --out "$out" \
               > "$out/overhead0-${grid:-overhead}.txt" 2>&1
             echo "overhead rc=$?"; grep -A80 "^per call" "$out/overhead0-${grid:-overhead}.txt"; grep FAILED "$out/overhead0-${grid:-overhead}.txt" | head;;
    evaluate-suites) python3 -m flash_mla.cli evaluate --suites --jobs 16 --rep-ms 50 --out "$out/suites" > "$out/evaluate-suites.txt" 2>&1
              echo "evaluate --suites rc=$?"; grep -A40 "^ratio = " "$out/evaluate-suites.txt";;
    evaluate|evaluate:*) IFS=: read -r _ shard rep <<< "$step"   # held-out workloads; K/N: one shard, REP: --rep-ms
              python3 -m flash_mla.cli evaluate --jobs 16 ${rep:+--rep-ms "$rep"} ${shard:+--shard "$shard"} --out "$out" \
                > "$out/evaluate.txt" 2>&1
              echo "evaluate${shard:+ shard $shard} rc=$?"; grep -A40 "^ratio = " "$out/evaluate.txt"
              [[ -n $shard ]] && cp "$out/evaluate.json" "$final/evaluate-${shard/\//of}.json";;
    *) echo "unknown step $step"; exit 2;;
  esac
done
