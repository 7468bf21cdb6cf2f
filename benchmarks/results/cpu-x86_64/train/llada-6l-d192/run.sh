#!/bin/bash
# Resume the 6-layer d 192 LLaDA-layout training run from the checkpoint committed next to this
# script (model, optimizer, random states, curriculum level, log). Run from the repository root;
# it trains in the background on one core and checkpoints every 4 minutes to .train/llada/.
set -euo pipefail
here=$(dirname "$0")
bash "$here/../resume.sh" "$here" .train/llada "-m maskkv.quality.train" \
  --n-layers 6 --d-model 192 --n-heads 4 --mlp 384 \
  --schedule adaptive --steps 40000 --batch-size 32 --lr 2e-3
