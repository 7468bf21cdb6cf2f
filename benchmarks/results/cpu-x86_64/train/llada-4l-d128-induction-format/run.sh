#!/bin/bash
# Resume the run "offset1": as llada-4l-d128-recall, but with the key-value tasks in the
# "induction" format of experiment.py (pairs "foxK4$. ", question "?fox" right before the answer).
# Run from the repository root; background, one core, checkpoints to .train/offset1/. Check it
# with: python3 <this folder>/experiment.py --probe --checkpoint .train/offset1/ckpt.pt
# The committed run was scheduled for 20000 steps (cosine learning rate); --steps 60000 continues
# it as a warm restart (the rate rises back to the cosine value at step / 60000).
set -euo pipefail
here=$(dirname "$0")
mkdir -p .train/offset1
[ -f .train/offset1/ckpt.pt ] || cp "$here/ckpt.pt" .train/offset1/ckpt.pt
[ -f .train/offset1/log.txt ] || cp "$here/log.txt" .train/offset1/log.txt
export PYTHONPATH=$PWD:$PWD/python OMP_NUM_THREADS=1
nohup python3 "$here/experiment.py" --out .train/offset1/model \
  --checkpoint .train/offset1/ckpt.pt --checkpoint-minutes 4 \
  --n-layers 4 --d-model 128 --n-heads 4 --mlp 256 --tasks kv_recall,kv_retrieval \
  --schedule adaptive --start-level 4 --steps 60000 --batch-size 32 --lr 2e-3 \
  --min-prompt-len 48 --max-prompt-len 512 --threads 1 --log-every 50 --no-progress \
  >> .train/offset1/log.txt 2>&1 &
echo "training in the background (pid $!), log: .train/offset1/log.txt"
