"""End-to-end benchmark: random-weight LLaDA / Dream models at preset shapes, every method side by
side, the numbers of DESIGN.md's "Performance contract".

What is measured per (method, prompt length), all in one process so that ratios are side by side:

- step-1 time and the median time of the later (cached) denoising steps, from
  ``maskkv.generate``'s own per-step timer (CUDA synchronised);
- speedup of the later steps against NoCache and against FullCache;
- prompt KV bytes of the whole prompt versus what the method keeps, kept tokens per KV head;
- peak device memory (CUDA);
- on CUDA, the later step's floor ``max(weight bytes / copy bandwidth, response FLOPs / matmul
  rate)``, both ceilings measured in the same run, and later-step time / floor;
- optionally (CUDA) the longest prompt that fits for FullCache versus MaskKV.

Weights are random (there is no hub here, and speed does not depend on the values). Why random
weights are still fair: every step runs the same kernels on the same shapes as the real model;
only which tokens get revealed differs, and the number revealed per step is fixed by the
schedule.

Layer profile for MaskKV / SqueezeAttention: by default one profile is calibrated on a short
random prompt (``maskkv.calibrate.calibrate``; a second or so) so that the profile-driven layer
schedules run with non-uniform budgets, as they do with a real model. A random model's profile
says nothing about quality; it only shapes the budgets. ``profile="uniform"`` skips it (both
methods then fall back to uniform layer budgets, which is just as fast).

>>> from maskkv import bench
>>> result = bench.run_e2e("tiny", methods=["nocache", "fullcache", "maskkv"])  # doctest: +SKIP
>>> print(bench.format_table(result.rows))                                     # doctest: +SKIP
"""

from __future__ import annotations

from ..tables import format_rows
from . import memory
from .cli import (
    add_bench_arguments,
    add_bench_parser,
    result_payload,
    run_from_args,
    run_whole_from_args,
)
from .presets import (
    DEFAULT_METHODS,
    PRESETS,
    Preset,
    build_model,
    device_name,
    environment,
    model_config,
    random_prompt,
    weight_bytes,
)
from .report import (
    format_search,
    format_table,
    format_targets,
    plot_results,
    report,
)
from .result import BenchResult, check_targets
from .runner import (
    later_step_need,
    max_prompt_search,
    measure_ceilings,
    run_e2e,
    step_floor,
)

__all__ = [
    "DEFAULT_METHODS",
    "PRESETS",
    "BenchResult",
    "Preset",
    "add_bench_arguments",
    "add_bench_parser",
    "build_model",
    "check_targets",
    "device_name",
    "environment",
    "format_rows",
    "format_search",
    "format_table",
    "format_targets",
    "later_step_need",
    "max_prompt_search",
    "memory",
    "measure_ceilings",
    "model_config",
    "plot_results",
    "random_prompt",
    "report",
    "result_payload",
    "run_e2e",
    "run_from_args",
    "run_whole_from_args",
    "step_floor",
    "weight_bytes",
]
