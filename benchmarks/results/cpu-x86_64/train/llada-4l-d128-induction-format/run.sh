#!/bin/bash
# Resume the run "offset1": as llada-4l-d128-recall, but with the key-value tasks in the
# "induction" format of experiment.py (pairs "foxK4$. ", question "?fox" right before the answer).
# Run from the repository root; background, one core, checkpoints to .train/offset1/. Check it
# with: python3 <this folder>/experiment.py --probe --checkpoint .train/offset1/ckpt.pt
# The committed run was scheduled for 20000 steps (cosine learning rate); --steps 60000 continues
# it as a warm restart (the rate rises back to the cosine value at step / 60000).
set -euo pipefail
here=$(dirname "$0")
bash "$here/../resume.sh" "$here" .train/offset1 "$here/experiment.py" \
  --n-layers 4 --d-model 128 --n-heads 4 --mlp 256 --tasks kv_recall,kv_retrieval \
  --schedule adaptive --start-level 4 --steps 60000 --batch-size 32 --lr 2e-3
