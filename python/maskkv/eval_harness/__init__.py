"""maskkv in lm-evaluation-harness: the ``maskkv`` lm-eval model (``MaskKVLM``).

Needs the ``eval`` extra (``pip install maskkv[eval]``: lm-eval and accelerate). lm-eval finds
models by name in its registry, which is filled when the defining module is imported, and
lm-eval has no plugin hook that would import ours; so run lm-eval through this package, with
lm-eval's own arguments unchanged:

    python -m maskkv.eval_harness --model maskkv --model_args pretrained=DIR,method=maskkv \\
        --tasks gsm8k
    accelerate launch -m maskkv.eval_harness --model maskkv ...      # data parallel

or from Python: ``import maskkv.eval_harness`` and then ``lm_eval.simple_evaluate(model="maskkv",
...)``. ``TASKS_DIR`` holds the offline lm-eval tasks (``--include_path``).
"""

from pathlib import Path

from .model import CACHE_POLICY_KEYS, MODEL_ARGS, MaskKVLM, parse_model_args

#: lm-eval YAML tasks over the quality suite's synthetic data (``maskkv_passkey``, ...).
TASKS_DIR = Path(__file__).resolve().parent.parent / "quality" / "lm_eval_tasks"

__all__ = ["CACHE_POLICY_KEYS", "MODEL_ARGS", "TASKS_DIR", "MaskKVLM", "parse_model_args"]
