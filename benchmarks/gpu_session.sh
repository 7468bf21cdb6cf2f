#!/usr/bin/env bash
# One call on a GPU machine: install, GPU tests, kernel + end-to-end benchmarks, memcheck.
# Usage (repository root, on the GPU box): OUT=/some/dir bash benchmarks/gpu_session.sh [quick]
# Results land in $OUT (JSON + PNG + logs); commit them under benchmarks/results/<device>/.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MASKKV_BENCH_OUT="$OUT"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -2
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
PY
# 1. Correctness on the GPU (the CPU suite runs in CI).
python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
# 2. Memory checker on one small call of each kernel.
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --print-limit 20 python3 - <<'PY' 2>&1 | tail -8 | tee "$OUT/memcheck.log"
import torch, maskkv_kernels as mk
q = torch.randn(2, 8, 64, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(2, 2, 1100, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
lens = torch.tensor([1000, 700])
for hb in ("uniform", "prompt_preference", "adakv"):
    c = mk.select_and_gather(q, k, v, 100, prompt_len=1000, prompt_lens=lens, head_budget=hb, backend="triton")
    mk.ragged_attention(q, c, k[:, :, 1000:], v[:, :, 1000:], backend="triton")
torch.cuda.synchronize()
print("memcheck run finished")
PY
fi
[ "${1:-}" = quick ] && exit 0
# 3. Benchmarks (each prints its table last and writes JSON + PNG into $OUT).
python3 benchmarks/bench_select_and_gather.py 2>&1 | tee "$OUT/bench_select.log" | tail -30
python3 benchmarks/bench_ragged_attention.py 2>&1 | tee "$OUT/bench_ragged.log" | tail -30
python3 benchmarks/bench_e2e.py --preset llada-8b 2>&1 | tee "$OUT/bench_e2e.log" | tail -30
