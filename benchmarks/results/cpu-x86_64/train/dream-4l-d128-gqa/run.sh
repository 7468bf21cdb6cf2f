#!/bin/bash
# Resume the Dream-layout run "dream3" (4 layers, d 128, 4 query heads sharing 2 KV heads; all
# five tasks plus kv_recall, masked-LM on the prompt, 512-token prompts from the start), the run
# of python/maskkv/assets/tiny-dream-kv, from the checkpoint committed next to this script. Run
# from the repository root; it trains in the background on one core and checkpoints every 4
# minutes to .train/dream3/.
# Its start: the LLaDA-layout run llada3 at step 10909 (init-llada-step10909/, exported with
# `python -m maskkv.quality.train --checkpoint <llada3 ckpt> --out DIR --export-only`),
# converted to the Dream layout by maskkv.quality.convert (--init-from). History (TRAINING.md):
# `--steps 20000 --lr 1e-3` to step 1688 (`--stop-at 1688`), then resumed with `--steps 3000`,
# so the rest anneals the learning rate from 4.6e-4 to 1e-4. This script continues that phase.
set -euo pipefail
here=$(dirname "$0")
bash "$here/../resume.sh" "$here" .train/dream3 "-m maskkv.quality.train" \
  --kind dream --n-kv-heads 2 --init-from "$here/init-llada-step10909" \
  --tasks kv_recall,kv_retrieval,kv_retrieval_qfirst,multi_needle,passkey,passkey_qfirst \
  --schedule adaptive --start-level 42 --steps 3000 --batch-size 32 --lr 1e-3 --prompt-mask 0.3
