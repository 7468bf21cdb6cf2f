#!/bin/bash
# Resume the 4-layer d 128 LLaDA-layout run "scratch4" (kv_recall + kv_retrieval, 1-4 pairs from
# the start) from the checkpoint committed next to this script (model, optimizer, random states,
# curriculum level, log). Run from the repository root; it trains in the background on one core
# and checkpoints every 4 minutes to .train/scratch4/. Check it with
#   python3 -m maskkv.quality.train --probe --checkpoint .train/scratch4/ckpt.pt
# The committed run was scheduled for 20000 steps (cosine learning rate); --steps 60000 continues
# it as a warm restart (the rate rises back to the cosine value at step / 60000).
set -euo pipefail
here=$(dirname "$0")
bash "$here/../resume.sh" "$here" .train/scratch4 "-m maskkv.quality.train" \
  --n-layers 4 --d-model 128 --n-heads 4 --mlp 256 --tasks kv_recall,kv_retrieval \
  --schedule adaptive --start-level 4 --steps 60000 --batch-size 32 --lr 2e-3
