#!/bin/bash
# Resume the third session's LLaDA-layout run "llada3" (4 layers, d 128; all five tasks plus
# kv_recall, masked-LM on the prompt, adaptive curriculum) from the checkpoint committed next to
# this script. Run from the repository root; it trains in the background on one core and
# checkpoints every 4 minutes to .train/llada3/. Its start (a fresh run of this command without
# the checkpoint) was the lab's stage-1 weights, ../mqar-lab/stage1 (see TRAINING.md).
set -euo pipefail
here=$(dirname "$0")
bash "$here/../resume.sh" "$here" .train/llada3 "-m maskkv.quality.train" \
  --init-from "$here/../mqar-lab/stage1" \
  --tasks kv_recall,kv_retrieval,kv_retrieval_qfirst,multi_needle,passkey,passkey_qfirst \
  --schedule adaptive --start-level 4 --steps 60000 --batch-size 32 --lr 2e-3 --prompt-mask 0.3
