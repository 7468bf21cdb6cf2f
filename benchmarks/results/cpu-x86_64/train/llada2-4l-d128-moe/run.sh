#!/bin/bash
# Resume the LLaDA2-layout run "llada2" (4 layers, d 128, 4 heads of 32, MHA; layer 0 dense, then
# MoE layers of 8 experts of 128 (top-2 within 2 of 4 groups) beside 2 shared experts of 128;
# block-causal attention in blocks of 32), the run of python/maskkv/assets/tiny-llada2-kv, from
# the checkpoint committed next to this script. Run from the repository root; it trains in the
# background on one core and checkpoints every 4 minutes to .train/llada2/.
# Its start: tiny-llada-kv converted by maskkv.quality.convert.llada2_state_from_llada
# (--init-from; not read when resuming). History (TRAINING.md, "The LLaDA2 layout"): `--steps
# 1500 --lr 5e-4` to step 451, then resumed with `--steps 700`, so the rest anneals the learning
# rate from 2.2e-4 to 5e-5. This script continues that phase (give a larger --steps to go on).
set -euo pipefail
here=$(dirname "$0")
bash "$here/../resume.sh" "$here" .train/llada2 "-m maskkv.quality.train" \
  --kind llada2 --init-from python/maskkv/assets/tiny-llada-kv \
  --tasks kv_recall,kv_retrieval,kv_retrieval_qfirst,multi_needle,passkey,passkey_qfirst \
  --schedule adaptive --start-level 42 --steps 700 --batch-size 32 --lr 5e-4 --prompt-mask 0.3
