#!/bin/bash
# Continue a committed training run in the background on one core (called by each run's run.sh,
# from the repository root):
#   resume.sh RUN_FOLDER WORK_DIR ENTRY [ARGS...]
# copies RUN_FOLDER's ckpt.pt and log.txt to WORK_DIR (unless already there), then runs
# `python3 ENTRY --out WORK_DIR/model --checkpoint WORK_DIR/ckpt.pt ... ARGS`, appending to
# WORK_DIR/log.txt, checkpointing every 4 minutes. ENTRY is `-m maskkv.quality.train` or a script.
set -euo pipefail
run=$1 work=$2 entry=$3
shift 3
mkdir -p "$work"
[ -f "$work/ckpt.pt" ] || cp "$run/ckpt.pt" "$work/ckpt.pt"
[ -f "$work/log.txt" ] || cp "$run/log.txt" "$work/log.txt"
export PYTHONPATH=$PWD:$PWD/python OMP_NUM_THREADS=1
# shellcheck disable=SC2086  # ENTRY may be "-m module"
nohup python3 $entry --out "$work/model" --checkpoint "$work/ckpt.pt" --checkpoint-minutes 4 \
  --min-prompt-len 48 --max-prompt-len 512 --threads 1 --log-every 50 --no-progress \
  "$@" >> "$work/log.txt" 2>&1 &
echo "training in the background (pid $!), log: $work/log.txt"
