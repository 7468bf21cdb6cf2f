#!/bin/bash
# Resume the 6-layer d 192 LLaDA-layout training run from the checkpoint committed next to this
# script (model, optimizer, random states, curriculum level, log). Run from the repository root;
# it trains in the background on one core and checkpoints every 4 minutes to .train/llada/.
set -euo pipefail
here=$(dirname "$0")
mkdir -p .train/llada
[ -f .train/llada/ckpt.pt ] || cp "$here/ckpt.pt" .train/llada/ckpt.pt
[ -f .train/llada/log.txt ] || cp "$here/log.txt" .train/llada/log.txt
export PYTHONPATH=$PWD:$PWD/python OMP_NUM_THREADS=1
nohup python3 -m maskkv.quality.train --out .train/llada/model \
  --checkpoint .train/llada/ckpt.pt --checkpoint-minutes 4 \
  --n-layers 6 --d-model 192 --n-heads 4 --mlp 384 \
  --schedule adaptive --steps 40000 --batch-size 32 --lr 2e-3 \
  --min-prompt-len 48 --max-prompt-len 512 --threads 1 --log-every 50 --no-progress \
  >> .train/llada/log.txt 2>&1 &
echo "training in the background (pid $!), log: .train/llada/log.txt"
