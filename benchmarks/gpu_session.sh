#!/usr/bin/env bash
# One prepared GPU run: install, every GPU test (with compute-sanitizer memcheck / initcheck
# beside them), then the measurements, each a stage with its own wall-clock cap, in priority
# order, stopping before the call's deadline.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh                   # every stage that fits
#   STAGES="whole maxprompt racecheck" OUT=/some/dir bash benchmarks/gpu_session.sh   # a subset
#   DRY_RUN=1 OUT=/tmp/x bash benchmarks/gpu_session.sh      # print the plan, run nothing
#
# A lent GPU machine allows at most 10 minutes per call and about 15 minutes of device time in
# all, machine start (2-3 min) included, so DEADLINE (default 560 s) bounds the whole script: a stage
# starts only if its estimate fits in the time left, and its cap is cut to the time left. What
# did not fit is listed at the end with the command that runs it in a second call. Logs land
# in $OUT/logs, JSON + PNG results in $OUT/results (commit them to benchmarks/results/<device>/),
# a per-stage summary in $OUT/results/session.json; $OUT/gpu_session.tar.gz is rewritten after
# every stage (a run cut short still brings back what it measured).
#
# Stages and their estimates on an H200 (H100: about 1.3x), from the runs recorded in
# benchmarks/results/NVIDIA-H200/ (install ~15 s before the first):
#   tests      every GPU test (-m gpu, engine and fused bodies first), memcheck and initcheck
#              (--quick) side by side: ~150 s, cap 240
#   later      later step vs its floor, fusion none / torch / triton / compile side by side
#              (LLaDA-8B, 32k, MaskKV; target <= 1.5x floor): ~80 s, cap 150
#   select     select_and_gather at P = 32k, M 256 / 1024, LLaDA-8B and Dream-7B, every score
#              kernel x top-k compaction (parallel / serial / fused) with and without the LSE,
#              vs one SDPA forward (targets 0.7x / 1.3x): ~50 s, cap 100
#   ragged     ragged_attention, Lq 256: full length (32k keys) and 8x skew, G = 1 and 7, 64- vs
#              128-row tiles vs dense and padded SDPA (target 60% of dense at full length):
#              ~50 s, cap 100
#   whole      whole generation at LLaDA-8B shape, 8k and 32k prompts, gen 256, block 32, 4
#              tokens per step for all: NoCache, Fast-dLLM config, MaskKV + DLLMCache /
#              PromptCache / DualCache, step 1's share and floor (targets >= 5x, >= 100x):
#              ~90 s, cap 200
#   maxprompt  longest prompt, FullCache vs MaskKV budget 256, by search with predicted and
#              measured peaks (target >= 8x); probe check at 32k, which also gives the peak
#              memory MaskKV / FullCache (target 0.5): ~90 s, cap 150
#   racecheck  compute-sanitizer racecheck --tiny --quick --one-config, to completion: ~120 s
#              (never measured: the full run did not finish in 110 s), cap 240
# Then, in later calls (STAGES="..." as the script prints), estimates not yet measured:
#   varlen     bench_ragged_varlen --preset gpu: 1-128 requests in one varlen call vs a loop of
#              per-request calls vs padded SDPA, FullCache 32k x 4: ~200 s, cap 300
#   serving    bench_serving at LLaDA-8B shape (4k/512 and 32k/256 prompts, budget 256, a KV
#              budget of 2 FullCache 32k requests), concurrency 1-128, MaskKV vs FullCache
#              (target >= 10x output tokens/s), each with the batched steps replayed as CUDA
#              graphs and eager, side by side: ~400 s, cap 480
#   llada2_*   the llada2-mini shape (block-causal MoE): step-1 attention candidates at 8k / 32k
#              (chunked SDPA, per-block SDPA, [L, L] mask, FlexAttention), one MoE layer (loop vs
#              grouped, shared expert fused or not), end to end at 8k / 32k, whole generation at
#              32k; each stage builds the 16B random model (about a minute)
# A new GPU benchmark: append a line to STAGE_LIST below the marked line.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-run}
LOGS="$OUT/logs"
RES="$OUT/results"
DEADLINE=${DEADLINE:-560}
mkdir -p "$LOGS" "$RES"
export PYTHONUNBUFFERED=1 MASKKV_BENCH_OUT="$RES" TRITON_DEFAULT_FP_FUSION=1
status=0
summary=()
skipped=()

# ---- the stage list: name | cap s | estimate s (H200) | command --------------------------------
# Run in this order while time is left; STAGES="a b" runs a subset (in this order).
STAGE_LIST=(
  "later|150|80|python3 benchmarks/bench_later_step.py --out $RES"
  "select|100|50|python3 benchmarks/bench_select_and_gather.py --out $RES --prompt-lens 32768 --backends triton"
  "ragged|100|50|python3 benchmarks/bench_ragged_attention.py --out $RES --lq 256 --cases full skew8x --impls ragged ragged_grid ragged_m128 padded_sdpa dense_sdpa"
  "whole|200|90|python3 benchmarks/bench_e2e.py --whole --preset llada-8b --prompt-lens 8192 --out $RES && python3 benchmarks/bench_e2e.py --whole --preset llada-8b --prompt-lens 32768 --out $RES"
  "maxprompt|150|90|python3 benchmarks/bench_max_prompt.py --out $RES"
  "racecheck|240|120|compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 20 python3 benchmarks/sanitize_kernels.py --tiny --quick --one-config"
  # ---- append new GPU benchmarks here: "name|cap|estimate|command" ----
  "varlen|300|200|python3 benchmarks/bench_ragged_varlen.py --preset gpu --out $RES"
  "serving|480|400|python3 benchmarks/bench_serving.py --preset llada-8b --methods maskkv,fullcache --no-static --concurrency 1,8,32,128 --time-limit 12 --cuda-graphs on,off --out $RES"
  "llada2_attention|150|90|python3 benchmarks/bench_block_causal.py --lens 8192,32768 --heads 16 --kv-heads 4 --chunks 4096,1024,256 --out $RES"
  "llada2_moe|120|60|python3 benchmarks/bench_moe.py --out $RES"
  "llada2_e2e|300|200|python3 benchmarks/bench_e2e.py --preset llada2-mini --prompt-lens 8192,32768 --methods nocache,fullcache,maskkv,snapkv --out $RES"
  "llada2_whole|300|200|python3 benchmarks/bench_e2e.py --whole --preset llada2-mini --prompt-lens 32768 --out $RES"
)

left() { echo $((DEADLINE - SECONDS)); }

pack() {  # (re)write the tarball after every stage: a run cut short still brings back its results
  tar -C "$OUT" -czf "$OUT/.pack.$BASHPID.tar.gz" logs results 2>/dev/null &&
    mv -f "$OUT/.pack.$BASHPID.tar.gz" "$OUT/gpu_session.tar.gz"
}

write_summary() {
  local IFS=,
  printf '{"device_seconds": %d, "deadline": %d, "stages": [%s], "skipped": [%s]}\n' \
    "$SECONDS" "$DEADLINE" "${summary[*]-}" "${skipped[*]-}" >"$RES/session.json"
}

stage() {  # stage NAME CAP ESTIMATE CMD: run CMD (bash -c) capped, log to $LOGS/NAME.log
  local name=$1 cap=$2 est=$3 cmd=$4
  if [ "$(left)" -lt "$est" ]; then
    echo "== $name: skipped ($(left) s left, needs ~$est s)"
    skipped+=("\"$name\"")
    return 0
  fi
  [ "$cap" -gt "$(($(left) - 5))" ] && cap=$(($(left) - 5))
  local t0=$SECONDS
  if [ -n "${DRY_RUN:-}" ]; then
    echo "$cmd" >"$LOGS/$name.log"
  else
    timeout --kill-after=5 "$cap" bash -c "$cmd" >"$LOGS/$name.log" 2>&1
  fi
  local rc=$?
  echo "== $name: rc=$rc, $((SECONDS - t0)) s (cap $cap s, estimate $est s)"
  tail -n "${TAIL:-25}" "$LOGS/$name.log"
  summary+=("{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"cap\": $cap}")
  [ $rc -ne 0 ] && status=1
  write_summary
  pack
  return 0
}

want() { [ -z "${STAGES:-}" ] || [[ " $STAGES " == *" $1 "* ]]; }

[ -n "${DRY_RUN:-}" ] || {
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$LOGS/install.log" 2>&1
python3 - <<'PY' | tee "$RES/env.txt"
import subprocess, torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
print(subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
PY
}

# 1. Every GPU test (the CPU suite runs in CI), the engine and fused-body tests first; -v names
#    each result as it happens (a capped run still says which failed). memcheck and initcheck
#    run beside them (neither is timed; the sanitizers serialise their own launches).
if want tests; then
  sanitizers() {  # in the background: results in $LOGS/sanitize_<tool>.{log,rc}
    command -v compute-sanitizer >/dev/null || [ -n "${DRY_RUN:-}" ] ||
      { echo "== no compute-sanitizer"; return 0; }
    for tool in ${SANITIZERS-memcheck initcheck}; do
      local t0=$SECONDS cmd="compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20"
      cmd+=" python3 benchmarks/sanitize_kernels.py --quick"
      if [ -n "${DRY_RUN:-}" ]; then echo "$cmd" >"$LOGS/sanitize_$tool.log"; else
        timeout --kill-after=5 120 $cmd >"$LOGS/sanitize_$tool.log" 2>&1; fi
      echo "$? $((SECONDS - t0))" >"$LOGS/sanitize_$tool.rc"
    done
  }
  sanitizers &
  sanitizer_pid=$!
  TAIL=30 stage tests 240 100 "python3 -m pytest -v -m gpu -n 4 -p no:cacheprovider \
    --timeout 200 -rfE tests/test_gpu_engine.py tests/test_gpu_fusion.py tests"
  wait $sanitizer_pid
  for rcfile in "$LOGS"/sanitize_*.rc; do
    [ -e "$rcfile" ] || continue
    read -r rc secs <"$rcfile"
    name=$(basename "$rcfile" .rc)
    echo "== $name: rc=$rc, $secs s (cap 120 s)"
    tail -n 8 "$LOGS/$name.log"
    summary+=("{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $secs, \"cap\": 120}")
    [ "$rc" -ne 0 ] && status=1
  done
  write_summary
  pack
fi

# 2. The measurements, in priority order, while time is left.
for entry in "${STAGE_LIST[@]}"; do
  IFS='|' read -r name cap est cmd <<<"$entry"
  want "$name" && stage "$name" "$cap" "$est" "$cmd"
done

write_summary
pack
if [ ${#skipped[@]} -gt 0 ]; then
  echo "== not run (time): ${skipped[*]}; next call:"
  echo "   STAGES=\"$(echo "${skipped[*]}" | tr -d '"')\" OUT=\$OUT bash benchmarks/gpu_session.sh"
fi
echo "== session: $SECONDS s, status $status"
exit $status
