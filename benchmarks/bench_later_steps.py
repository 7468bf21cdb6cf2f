"""Later-step latency per method, the methods' steps interleaved round by round.

``maskkv bench`` runs one method after the other; on a shared machine the load can change
between two methods' runs and bias their ratio. Here every method first runs its step 1 on the
same prompt (keeping its denoiser), then ``--rounds`` rounds each time one later step of every
method in turn, so the methods see the same load. Rows: per method the step-1 time and the
later-step times of every round (median and min), and the ratios to FullCache. JSON + PNG under
``benchmarks/results/<device>/later_steps_<preset>_<prompt>.*``.

    python benchmarks/bench_later_steps.py --preset cpu-llada2 --prompt-len 8192 --threads 1
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from common import line_plot, out_dir, print_table, save

from maskkv import methods
from maskkv.bench.presets import PRESETS, build_model, random_prompt
from maskkv.calibrate import calibrate
from maskkv.generation.block_causal import BlockCausalDenoiser, BlockLayout
from maskkv.generation.engine import Denoiser


def _step_fn(model, method, ids, gen_length, profile):
    """A callable running one denoising step of ``method`` (the first call is step 1)."""
    if getattr(model, "dllm_kind", "") == "llada2":
        layout, x = BlockLayout.build(ids, None, gen_length, 32, model.config.mask_token_id)
        den = BlockCausalDenoiser(model, method, layout, profile=profile)
        den.start_block(x, 0)
        return lambda: den.block_logits(x, 0)
    x = torch.nn.functional.pad(ids, (0, gen_length), value=model.config.mask_token_id)
    need = torch.ones(ids.shape[0], gen_length, dtype=torch.bool, device=ids.device)
    den = Denoiser(model, method, ids.shape[1], profile=profile)
    return lambda: den(x, need)


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu-llada2", choices=sorted(PRESETS))
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--gen-length", type=int, default=None, help="default: the preset's")
    ap.add_argument("--methods", default="fullcache,maskkv,snapkv,adakv")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", methods.MissingProfileWarning)
    preset = PRESETS[args.preset]
    model = build_model(preset)
    device = next(model.parameters()).device
    gen_length = args.gen_length or preset.gen_length
    profile = calibrate(model, [random_prompt(model, 512, seed=1)], gen_length=gen_length)
    ids = random_prompt(model, args.prompt_len, seed=args.prompt_len)
    names = args.methods.split(",")
    steps, rows = {}, {}
    with torch.no_grad():
        for name in names:
            steps[name] = _step_fn(model, methods.get(name, budget=args.budget), ids, gen_length,
                                   profile)  # fmt: skip
            rows[name] = {"method": name, "step1_s": _timed(steps[name], device), "later_s": []}
            print(f"{name}: step 1 {rows[name]['step1_s']:.1f} s", flush=True)
        for r in range(args.rounds):
            for name in names:
                rows[name]["later_s"].append(_timed(steps[name], device))
            print(f"round {r}: " + ", ".join(
                f"{n} {1e3 * rows[n]['later_s'][-1]:.0f} ms" for n in names), flush=True)  # fmt: skip
    out = list(rows.values())
    for row in out:
        later = sorted(row["later_s"])
        row["later_median_ms"] = 1e3 * later[len(later) // 2]
        row["later_min_ms"] = 1e3 * later[0]
    ref = rows.get("fullcache")
    for row in out:
        if ref is not None:
            row["speedup_vs_fullcache_median"] = ref["later_median_ms"] / row["later_median_ms"]
            # Per round: the same load for both.
            pairs = zip(ref["later_s"], row["later_s"])
            ratios = sorted(a / b for a, b in pairs)
            row["speedup_vs_fullcache_per_round_median"] = ratios[len(ratios) // 2]
    config = {
        "preset": args.preset,
        "prompt_len": args.prompt_len,
        "gen_length": gen_length,
        "budget": args.budget,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "dtype": preset.dtype,
        "note": "methods interleaved round by round; LLaDA2 presets time the first block's later "
        "steps (the current block against the prompt cache)",
    }
    name = f"later_steps_{args.preset}_{args.prompt_len}"
    path = save(name, device, config, out, args.out)
    cols = ["method", "step1_s", "later_median_ms", "later_min_ms",
            "speedup_vs_fullcache_per_round_median"]  # fmt: skip
    print_table(out, cols)
    print(f"wrote {path}")
    _plot(out, out_dir(device, args.out) / f"{name}.png", config)


def _plot(rows, path, config) -> None:
    series = {r["method"]: list(enumerate(1e3 * t for t in r["later_s"])) for r in rows}
    title = (
        f"{config['preset']}, prompt {config['prompt_len']}, budget {config['budget']}, "
        f"{config['threads']} thread(s)"
    )
    line_plot(series, path, title=title, xlabel="round (every method once per round)",
              ylabel="later step (ms)")  # fmt: skip


if __name__ == "__main__":
    main()
