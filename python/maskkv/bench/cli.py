"""``maskkv bench`` / ``benchmarks/bench_e2e.py``: arguments, running from them, payloads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..cli_common import int_list, method_names, number, torch_device
from .presets import DEFAULT_METHODS, PRESETS, device_name, environment
from .report import plot_results, report
from .result import _LATER_KEY, BenchResult
from .runner import run_e2e

# ----------------------------------------------------------------------------- CLI


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The e2e benchmark's options (shared by ``maskkv bench`` and ``benchmarks/bench_e2e.py``)."""
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="model shape (default: llada-8b on CUDA, cpu otherwise)",
    )
    parser.add_argument(
        "--methods",
        type=method_names,
        default=None,
        help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--budget", type=number(0, kind=int), default=None, help="prompt KV pairs per head (256)"
    )
    parser.add_argument(
        "--prompt-lens",
        type=int_list(),
        default=None,
        help="comma-separated prompt lengths (default: the preset's)",
    )
    parser.add_argument("--gen-length", type=int, default=None, help="response tokens (256)")
    parser.add_argument("--block-length", type=int, default=None, help="LLaDA block (gen-length)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps; a few suffice: step 1 + steps-1 timed later steps",
    )
    parser.add_argument(
        "--nocache-steps",
        type=int,
        default=3,
        help="NoCache runs only this many steps (each costs the same); 0 = --steps",
    )
    parser.add_argument(
        "--timing",
        choices=sorted(_LATER_KEY),
        default="median",
        help="later-step statistic for ratios/targets; min resists a loaded machine",
    )
    parser.add_argument(
        "--threads", type=number(1, kind=int), default=None, help="torch CPU threads"
    )
    parser.add_argument("--batch", type=number(1, kind=int), default=1)
    parser.add_argument(
        "--device", type=torch_device, default=None, help="default: the preset's (cuda / cpu)"
    )
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument(
        "--profile",
        choices=("calibrate", "uniform"),
        default="calibrate",
        help="layer profile for MaskKV/SqueezeAttention (random model: shape only)",
    )
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument(
        "--backend", default="auto", choices=("auto", "triton", "cpp", "torch", "reference")
    )
    parser.add_argument("--token-chunk", type=int, default=4096)
    parser.add_argument("--no-warmup", action="store_true", help="skip the short warm-up runs")
    parser.add_argument(
        "--max-prompt-search",
        action="store_true",
        help="CUDA: longest prompt that fits, FullCache vs MaskKV (slow)",
    )
    parser.add_argument("--search-limit", type=int, default=1 << 24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="output folder (default: benchmarks/results/<device>/)"
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--whole",
        action="store_true",
        help="whole-generation benchmark instead: total time of NoCache, the Fast-dLLM "
        "configuration, MaskKV + DLLMCache / PromptCache / DualCache (gen 256, block 32 unless "
        "given; the first of --prompt-lens)",
    )
    parser.add_argument(
        "--tokens-per-step",
        type=int,
        default=4,
        help="--whole: tokens revealed per step, the same for every configuration",
    )
    return parser


def run_from_args(args: argparse.Namespace) -> BenchResult:
    """Run the benchmark for parsed ``add_bench_arguments`` options (no saving)."""
    preset = args.preset or ("llada-8b" if torch.cuda.is_available() else "cpu")
    return run_e2e(
        preset,
        methods=args.methods,
        prompt_lens=args.prompt_lens,
        budget=args.budget,
        gen_length=args.gen_length,
        block_length=args.block_length,
        steps=args.steps,
        nocache_steps=args.nocache_steps or None,
        timing=args.timing,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        batch=args.batch,
        profile=args.profile,
        calib_len=args.calib_len,
        warmup=not args.no_warmup,
        backend=args.backend,
        token_chunk=args.token_chunk,
        seed=args.seed,
        max_prompt=args.max_prompt_search,
        search_limit=args.search_limit,
        progress=not args.quiet,
    )


def result_payload(result: BenchResult) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, rows) for a result file: ``benchmarks/common.save`` writes {env, config, rows},
    so the run-level measurements (ceilings, max-prompt search, targets) ride in ``config``."""
    config = {
        **result.config,
        "ceilings": result.ceilings,
        "search": result.search,
        "targets": result.targets,
    }
    return config, result.rows


def run_whole_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """``--whole``: run ``maskkv.bench.whole.run_whole`` and write whole_<preset>.json + .png."""
    from .whole import plot_whole, report_whole, run_whole

    preset = args.preset or ("llada-8b" if torch.cuda.is_available() else "cpu")
    result = run_whole(
        preset,
        prompt_len=args.prompt_lens[0] if args.prompt_lens else None,
        gen_length=args.gen_length or 256,
        block_length=args.block_length or 32,
        tokens_per_step=args.tokens_per_step,
        budget=args.budget,
        threads=args.threads,
        seed=args.seed,
        progress=not args.quiet,
    )
    device = torch.device(result["config"]["device"])
    folder = Path(args.out or Path("benchmarks") / "results" / device_name(device))
    folder.mkdir(parents=True, exist_ok=True)
    P = result["config"]["prompt_len"]
    default_len = max(PRESETS[preset].prompt_lens)  # other lengths get their own file
    path = folder / (f"whole_{preset}.json" if P == default_len else f"whole_{preset}_{P}.json")
    payload = {"env": environment(device), "config": result["config"], "rows": result["rows"]}
    payload["config"]["targets"] = result["targets"]
    path.write_text(json.dumps(payload, indent=1))
    print(report_whole(result))
    print(f"\nwrote {path}")
    if not args.no_plot:
        print(f"wrote {plot_whole(result, path.with_suffix('.png'))}")
    return result, path


def _cli(args: argparse.Namespace) -> None:
    if args.whole:
        run_whole_from_args(args)
        return
    result = run_from_args(args)
    device = torch.device(result.config["device"])
    folder = Path(args.out or Path("benchmarks") / "results" / device_name(device))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"e2e_{result.preset}.json"
    config, rows = result_payload(result)
    path.write_text(
        json.dumps({"env": environment(device), "config": config, "rows": rows}, indent=1)
    )
    print(report(result))
    print(f"\nwrote {path}")
    if not args.no_plot:
        print(f"wrote {plot_results(result, path.with_suffix('.png'))}")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``maskkv bench`` on an ``argparse`` subparsers object (from ``maskkv.cli``)."""
    parser = subparsers.add_parser(
        "bench",
        help="end-to-end benchmark: every method side by side on a random-weight model",
        description=__doc__.split("\n\n")[0],
    )
    add_bench_arguments(parser)
    parser.set_defaults(func=_cli)
    return parser
