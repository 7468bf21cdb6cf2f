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
# STEP1_CAP/STEP1_ARGS, WHOLE_CAP/WHOLE_ARGS, SANITIZE_CAP and SANITIZERS
# (default "memcheck racecheck initcheck"; empty skips them). STAGES (default "ragged select
# step1 e2e whole") picks the benchmark stages of a full run; "llada2" (opt-in, caps
# LLADA2_ATTN_CAP / LLADA2_MOE_CAP / LLADA2_E2E_CAP / LLADA2_WHOLE_CAP) runs the LLaDA2 stage.
#   quick: install, GPU tests, sanitizers (a couple of minutes)
#   full (default): quick + micro-benchmarks + the end-to-end and whole-generation benchmarks
#   at LLaDA-8B shape. Order of priority when time is short: the engine GPU tests
#   (tests/test_gpu_engine.py), then bench_ragged (work-list vs grid planner), bench_select
#   (key-resident vs K-streaming score pass, serial vs parallel compaction), the step-1
#   profile, bench_e2e, bench_whole.
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
  pack
  return 0
}

pack() {  # (re)write the tarball after every stage: a run cut short still brings back its results
  tar -C "$OUT" -czf "$OUT/.pack.$BASHPID.tar.gz" logs results 2>/dev/null &&
    mv -f "$OUT/.pack.$BASHPID.tar.gz" "$OUT/gpu_session.tar.gz"
}

python3 -m pip install -q --no-build-isolation --no-deps -e . >"$LOGS/install.log" 2>&1
python3 - <<'PY' | tee "$RES/env.txt"
import subprocess, torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
print(subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
PY

# 1. Correctness on the GPU (the CPU suite runs in CI) and compute-sanitizer on each kernel
#    (padding, empty segments, forced split-K). Neither is timed, so they run side by side (the
#    sanitizers serialise their own launches); each stage keeps its own cap and log.
# -v: every result is logged with its name as it happens (a capped run still says which failed);
# the engine tests first.
sanitizers() {
  command -v compute-sanitizer >/dev/null || { echo "== no compute-sanitizer"; return 0; }
  for tool in ${SANITIZERS-memcheck racecheck initcheck}; do
    # racecheck is much slower (autotuning runs under it too): fewer cases, one config each.
    stage "sanitize_$tool" "${SANITIZE_CAP:-120}" compute-sanitizer --tool "$tool" \
      --error-exitcode 9 --print-limit 20 python3 benchmarks/sanitize_kernels.py \
      $([ "$tool" = racecheck ] && echo --quick --one-config)
  done
  return $status
}
sanitizers >"$LOGS/sanitizers.summary" 2>&1 &
sanitizer_pid=$!
TAIL=25 stage gpu_tests "${GPU_TEST_CAP:-240}" python3 -m pytest -v -m gpu -n 4 \
  -p no:cacheprovider --timeout 120 -rfE tests/test_gpu_engine.py tests
wait $sanitizer_pid || status=1
cat "$LOGS/sanitizers.summary"
[ "$MODE" = quick ] && { pack; exit $status; }

want() { [[ " ${STAGES:-ragged select step1 e2e whole} " == *" $1 "* ]]; }
# 3. Micro-benchmarks (each prints its table last and writes JSON + PNG).
want ragged && TAIL=30 stage bench_ragged "${RAGGED_CAP:-120}" \
  python3 benchmarks/bench_ragged_attention.py --out "$RES" ${RAGGED_ARGS:-}
want select && TAIL=30 stage bench_select "${SELECT_CAP:-150}" \
  python3 benchmarks/bench_select_and_gather.py --out "$RES" ${SELECT_ARGS:-}
# 4. Step 1 of MaskKV at 32k with and without the flash forward's LSE (profile).
want step1 && TAIL=30 stage profile_step1 "${STEP1_CAP:-120}" \
  python3 benchmarks/profile_gpu.py --parts step1 ${STEP1_ARGS:-}
# 5. End to end at LLaDA-8B shape (random weights).
want e2e && TAIL=40 stage bench_e2e "${E2E_CAP:-240}" \
  python3 benchmarks/bench_e2e.py --preset llada-8b --out "$RES" ${E2E_ARGS:-}
# 6. Whole generation at LLaDA-8B shape (NoCache, Fast-dLLM configuration, the paper's, MaskKV +
#    PromptCache / DualCache), total time, the same tokens per step for all.
want whole && TAIL=30 stage bench_whole "${WHOLE_CAP:-300}" python3 benchmarks/bench_e2e.py \
  --whole --preset llada-8b --prompt-lens 32768 --out "$RES" ${WHOLE_ARGS:-}
# 7. LLaDA2 (block-causal MoE) at the llada2-mini shape, opt-in: STAGES="llada2" (or add it to the
#    list). Block-causal attention candidates at 8k / 32k (chunked SDPA, per-block SDPA, the
#    [L, L] mask, FlexAttention); one MoE layer (loop, grouped, shared experts fused or not);
#    then end to end at 8k and 32k (NoCache, FullCache, MaskKV,
#    SnapKV; later step, its MoE floor, peak memory); then whole generation at 32k (NoCache, the
#    Fast-dLLM analogue, the exact committed-block cache, MaskKV + prompt / dual cache).
if want llada2; then
  TAIL=30 stage llada2_attention "${LLADA2_ATTN_CAP:-150}" bash -c \
    "cd benchmarks && python3 bench_block_causal.py --lens 8192,32768 --heads 16 --kv-heads 4 \
     --chunks 4096,1024,256 --out $RES"
  TAIL=20 stage llada2_moe "${LLADA2_MOE_CAP:-120}" bash -c \
    "cd benchmarks && python3 bench_moe.py --out $RES"
  TAIL=40 stage llada2_e2e "${LLADA2_E2E_CAP:-300}" python3 benchmarks/bench_e2e.py \
    --preset llada2-mini --prompt-lens 8192,32768 --methods nocache,fullcache,maskkv,snapkv \
    --out "$RES" ${LLADA2_E2E_ARGS:-}
  TAIL=30 stage llada2_whole "${LLADA2_WHOLE_CAP:-300}" python3 benchmarks/bench_e2e.py \
    --whole --preset llada2-mini --prompt-lens 32768 --out "$RES" ${LLADA2_WHOLE_ARGS:-}
fi
pack
exit $status
