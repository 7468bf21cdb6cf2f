"""What TailVote costs against MaskKV, side by side: step 1, the later step and the pruned prompt
KV, on the CPU preset's shape in both layouts (random weights, fp32, the engine's own passes).

    python benchmarks/bench_tailvote_cost.py [--prompt-len 8192] [--threads 1]

Both methods keep the same number of prompt KV pairs (exact budgets), so a later step reads as
many keys; TailVote's head split is uneven (a long head is more work for one kernel program),
and on Dream its step-1 vote has one more query row. The LLaDA layout is the ``cpu`` preset
(4 layers, d 1024, 8 heads of 128, MHA); the Dream layout is the same shape with Dream's shifted
logits and 2 KV heads (GQA 4; Dream-7B is 28 / 4).

Each method runs step 1 once (its pruned cache is then held), then the two methods' later steps
(the whole response against the pruned prompt, as ``PromptCache`` runs it) alternate, the order
flipping every round, so a shared machine's load falls on both alike. The ratio is the median of
the per-round ratios; the medians and minima of each are recorded too.
Writes ``benchmarks/results/<device>/tailvote_cost.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from maskkv import methods as method_lib  # noqa: E402
from maskkv.bench.presets import PRESETS, build_model, random_prompt  # noqa: E402
from maskkv.calibrate import calibrate  # noqa: E402
from maskkv.generation.engine import Denoiser  # noqa: E402

METHODS = ("maskkv", "tailvote")


@torch.no_grad()
def measure(preset, args) -> dict:
    model = build_model(preset, device="cpu", dtype=torch.float32, seed=0)
    G = preset.gen_length
    profile = calibrate(model, [random_prompt(model, 512, seed=1)], gen_length=G)
    ids = random_prompt(model, args.prompt_len, seed=2)
    x = torch.cat([ids, torch.full((1, G), model.config.mask_token_id)], 1)
    need = torch.ones(1, G, dtype=torch.bool)
    dens, first = {}, {}
    warm = random_prompt(model, 2 * args.budget + 64, seed=3)  # kernels built, allocator warm
    warm = torch.cat([warm, x[:, args.prompt_len :]], 1)
    for name in METHODS:
        method = method_lib.get(name, budget=args.budget)
        den = Denoiser(model, method, warm.shape[1] - G, profile=profile)
        den(warm, need)
        den(warm, need)
    for name in METHODS:
        den = Denoiser(model, method_lib.get(name, budget=args.budget), args.prompt_len,
                       profile=profile)  # fmt: skip
        t0 = time.perf_counter()
        den(x, need)
        first[name] = time.perf_counter() - t0
        den(x, need)  # warm-up of the later step
        dens[name] = den
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for r in range(args.rounds):
        for name in METHODS if r % 2 == 0 else METHODS[::-1]:
            t0 = time.perf_counter()
            dens[name](x, need)
            times[name].append(time.perf_counter() - t0)
    ratios = [b / a for a, b in zip(times["maskkv"], times["tailvote"])]
    out: dict = {"later_step_ratio": statistics.median(ratios)}
    for name, den in dens.items():
        kept = den.stats.kept_lengths
        out[name] = dict(
            first_step_s=first[name],
            later_step_median_s=statistics.median(times[name]),
            later_step_min_s=min(times[name]),
            prompt_kv_bytes_kept=den.stats.prompt_kv_bytes_kept,
            prompt_kv_bytes_full=den.stats.prompt_kv_bytes_full,
            kept_per_head_min=int(kept.min()),
            kept_per_head_max=int(kept.max()),
            layer_budgets=den.stats.layer_budgets,
        )
    a, b = out["maskkv"], out["tailvote"]
    out["later_step_ratio_of_minima"] = b["later_step_min_s"] / a["later_step_min_s"]
    out["first_step_ratio"] = b["first_step_s"] / a["first_step_s"]
    out["prompt_kv_ratio"] = b["prompt_kv_bytes_kept"] / a["prompt_kv_bytes_kept"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=40, help="later steps per method")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", method_lib.MissingProfileWarning)
    layouts = {
        "llada (cpu preset)": PRESETS["cpu"],
        "dream (cpu preset, 2 KV heads)": dataclasses.replace(
            PRESETS["cpu"], name="cpu-dream", kind="dream", kv_heads=2
        ),
    }
    rows = []
    for label, preset in layouts.items():
        got = measure(preset, args)
        rows.append(dict(layout=label, preset=dataclasses.asdict(preset), **got))
        a, b = got["maskkv"], got["tailvote"]
        print(
            f"{label}: later step TailVote / MaskKV {got['later_step_ratio']:.3f} (median of "
            f"{args.rounds} paired rounds; {1e3 * b['later_step_median_s']:.1f} vs "
            f"{1e3 * a['later_step_median_s']:.1f} ms), step 1 {got['first_step_ratio']:.3f}, "
            f"prompt KV {got['prompt_kv_ratio']:.3f}; kept per head {b['kept_per_head_min']}.."
            f"{b['kept_per_head_max']} (MaskKV {a['kept_per_head_min']}..{a['kept_per_head_max']})",
            flush=True,
        )
    config = dict(
        prompt_len=args.prompt_len, budget=args.budget, rounds=args.rounds,
        threads=args.threads, gen_length=PRESETS["cpu"].gen_length, dtype="float32",
        weights="random", cache_policy="PromptCache (the whole response each later step)",
        profile="calibrated on one random 512-token prompt",
    )  # fmt: skip
    out = common.save("tailvote_cost", torch.device("cpu"), config, rows, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
