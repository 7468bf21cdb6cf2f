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
mkdir -p .train/scratch4
[ -f .train/scratch4/ckpt.pt ] || cp "$here/ckpt.pt" .train/scratch4/ckpt.pt
[ -f .train/scratch4/log.txt ] || cp "$here/log.txt" .train/scratch4/log.txt
export PYTHONPATH=$PWD:$PWD/python OMP_NUM_THREADS=1
nohup python3 -m maskkv.quality.train --out .train/scratch4/model \
  --checkpoint .train/scratch4/ckpt.pt --checkpoint-minutes 4 \
  --n-layers 4 --d-model 128 --n-heads 4 --mlp 256 --tasks kv_recall,kv_retrieval \
  --schedule adaptive --start-level 4 --steps 60000 --batch-size 32 --lr 2e-3 \
  --min-prompt-len 48 --max-prompt-len 512 --threads 1 --log-every 50 --no-progress \
  >> .train/scratch4/log.txt 2>&1 &
echo "training in the background (pid $!), log: .train/scratch4/log.txt"
