#!/bin/bash
# Resume the LLaDA-layout run "llada3" (4 layers, d 128; all five tasks plus kv_recall, masked-LM
# on the prompt, adaptive curriculum), the run of python/maskkv/assets/tiny-llada-kv, from the
# checkpoint committed next to this script. Run from the repository root; it trains in the
# background on one core and checkpoints every 4 minutes to .train/llada3/.
# Its history (TRAINING.md): started from the lab's stage-1 weights (../mqar-lab/stage1) with
# `--steps 60000` (cosine schedule over 60000 steps) and stopped at step 12743 (`--stop-at
# 12743`); then resumed with `--steps 14000`, so the last 1257 steps anneal the learning rate
# from 2.4e-4 to 2e-4 (the cosine's tail). This script continues that second phase.
set -euo pipefail
here=$(dirname "$0")
bash "$here/../resume.sh" "$here" .train/llada3 "-m maskkv.quality.train" \
  --init-from "$here/../mqar-lab/stage1" \
  --tasks kv_recall,kv_retrieval,kv_retrieval_qfirst,multi_needle,passkey,passkey_qfirst \
  --schedule adaptive --start-level 4 --steps 14000 --batch-size 32 --lr 2e-3 --prompt-mask 0.3
