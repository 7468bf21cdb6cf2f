#!/usr/bin/env bash
# One call on a GPU machine: install, GPU tests, compute-sanitizer, kernel + end-to-end benchmarks.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh [quick|full]
#
# Every stage has its own wall-clock cap (a stuck stage cannot eat the others' time) and writes
# its log into $OUT/logs; JSON + PNG results land in $OUT/results. The whole tree is packed into
# $OUT/gpu_session.tar.gz as well, for transports that bring back only a few files. Commit the
# results under benchmarks/results/<device>/. Caps and arguments come from the environment:
# GPU_TEST_CAP, SELECT_CAP/SELECT_ARGS, RAGGED_CAP/RAGGED_ARGS, E2E_CAP/E2E_ARGS,
# WHOLE_CAP/WHOLE_ARGS, and SANITIZERS
# (default "memcheck racecheck initcheck"; empty skips them).
#   quick: install, GPU tests, sanitizers (a couple of minutes)
#   full (default): quick + micro-benchmarks + the end-to-end and whole-generation benchmarks
#   at LLaDA-8B shape. Order of priority when time is short: the engine GPU tests
#   (tests/test_gpu_engine.py), then bench_ragged (work-list vs grid planner), bench_select
#   (key-resident vs K-streaming score pass), bench_e2e, bench_whole.
set -uo pipefail
MODE=${1:-full}
OUT=${OUT:-benchmarks/results/gpu-run}
LOGS="$OUT/logs"
RES="$OUT/results"
mkdir -p "$LOGS" "$RES"
export PYTHONUNBUFFERED=1 MASKKV_BENCH_OUT="$RES"
status=0

stage() {  # stage NAME SECONDS CMD...: run CMD with a cap, log to $LOGS/NAME.log, echo a summary
  local name=$1 cap=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=5 "$cap" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $((SECONDS - t0)) s (cap $cap s)"
  tail -n "${TAIL:-12}" "$LOGS/$name.log"
  [ $rc -ne 0 ] && status=1
  return 0
}

python3 -m pip install -q --no-build-isolation --no-deps -e . >"$LOGS/install.log" 2>&1
python3 - <<'PY' | tee "$RES/env.txt"
import subprocess, torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
print(subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
PY

# 1. Correctness on the GPU (the CPU suite runs in CI).
# -v: every result is logged with its name as it happens (a capped run still says which failed);
# the engine tests first.
TAIL=25 stage gpu_tests "${GPU_TEST_CAP:-240}" python3 -m pytest -v -m gpu -n 4 \
  -p no:cacheprovider --timeout 120 -rfE tests/test_gpu_engine.py tests

# 2. compute-sanitizer on each kernel: padding, empty segments, forced split-K.
if command -v compute-sanitizer >/dev/null; then
  for tool in ${SANITIZERS-memcheck racecheck initcheck}; do
    stage "sanitize_$tool" 120 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      --print-limit 20 python3 benchmarks/sanitize_kernels.py
  done
fi
[ "$MODE" = quick ] && { tar -C "$OUT" -czf "$OUT/gpu_session.tar.gz" logs results; exit $status; }

# 3. Micro-benchmarks (each prints its table last and writes JSON + PNG).
TAIL=30 stage bench_select "${SELECT_CAP:-150}" python3 benchmarks/bench_select_and_gather.py \
  --out "$RES" ${SELECT_ARGS:-}
TAIL=30 stage bench_ragged "${RAGGED_CAP:-120}" python3 benchmarks/bench_ragged_attention.py \
  --out "$RES" ${RAGGED_ARGS:-}
# 4. End to end at LLaDA-8B shape (random weights).
TAIL=40 stage bench_e2e "${E2E_CAP:-240}" python3 benchmarks/bench_e2e.py --preset llada-8b \
  --out "$RES" ${E2E_ARGS:-}
# 5. Whole generation at LLaDA-8B shape (NoCache, Fast-dLLM configuration, the paper's, MaskKV +
#    PromptCache / DualCache), total time, the same tokens per step for all.
TAIL=30 stage bench_whole "${WHOLE_CAP:-300}" python3 benchmarks/bench_e2e.py --whole \
  --preset llada-8b --prompt-lens 32768 --out "$RES" ${WHOLE_ARGS:-}
tar -C "$OUT" -czf "$OUT/gpu_session.tar.gz" logs results
exit $status
