"""Longest prompt that fits one GPU: FullCache vs MaskKV (budget 256), by search, with the peak
memory of every try beside the memory model's prediction (CUDA).

    python benchmarks/bench_max_prompt.py                     # LLaDA-8B shape
    python benchmarks/bench_max_prompt.py --check-len 16384 --probe-layers 1

First a probe check at ``--check-len``: step 1 of the whole model and the one-layer probe the
search uses (``maskkv.bench.memory.probe``), peak memory of both and the prediction, per method.
Then ``maskkv.bench.max_prompt_search`` per method: the first try at the model's prediction for
the free memory, then up or down by 10% until a fit and an OOM bracket the answer, then
bisection to 1024 tokens. DESIGN target (the paper's claim): MaskKV's longest prompt >= 8x
FullCache's. Writes ``max_prompt.json`` and ``max_prompt.png`` under benchmarks/results/<device>/.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from maskkv import bench, methods  # noqa: E402
from maskkv.bench import memory  # noqa: E402
from maskkv.generation.engine import Denoiser  # noqa: E402


def probe_check(model, names, P: int, budget: int, layers: int, R: int) -> list[dict]:
    """Step 1 at P tokens: the whole model vs the probe, measured, and the prediction."""
    device = next(model.parameters()).device
    x = torch.cat([bench.random_prompt(model, P, seed=P),
                   torch.full((1, R), model.config.mask_token_id, device=device)], 1)  # fmt: skip
    need = torch.ones(1, R, dtype=torch.bool, device=device)
    rows = []
    for name in names:
        m = methods.get(name, budget=budget)
        row = {"method": name, "prompt_len": P}
        for kind in ("full", "probe"):
            den = Denoiser(model, m, P)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", methods.MissingProfileWarning)
                if kind == "full":
                    _, peak, reserved = memory.measure_peak(lambda d=den: d(x, need), device)
                else:
                    with memory.probe(model, m, P, layers=layers) as held:
                        _, peak, reserved = memory.measure_peak(lambda d=den: d(x, need), device)
                    peak += held
                    reserved = None if reserved is None else reserved + held
            row[f"{kind}_peak_bytes"], row[f"{kind}_reserved_bytes"] = peak, reserved
            row[f"{kind}_seconds"] = time.perf_counter() - t0
            del den
            if device.type == "cuda":
                torch.cuda.empty_cache()
        pred = memory.step1_memory(model, P, R, m)
        row.update(predicted_peak_bytes=pred.peak_bytes, predicted_phase=pred.phase,
                   predicted_per_token=pred.per_token,
                   probe_vs_full=row["probe_peak_bytes"] / row["full_peak_bytes"],
                   predicted_vs_full=pred.peak_bytes / row["full_peak_bytes"])  # fmt: skip
        rows.append(row)
        print(f"probe check {name} P={P}: full {row['full_peak_bytes'] / 2**30:.2f} GiB "
              f"({row['full_seconds']:.1f} s), probe {row['probe_peak_bytes'] / 2**30:.2f} GiB "
              f"({row['probe_seconds']:.1f} s), predicted {pred.peak_bytes / 2**30:.2f} GiB",
              flush=True)  # fmt: skip
    return rows


def plot(search: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, s), color in zip(search.items(), ("tab:red", "tab:blue", "tab:green")):
        tries = sorted(s["tries"], key=lambda t: t["prompt_len"])
        ok = [t for t in tries if t["fits"]]
        ax.plot([t["prompt_len"] for t in tries],
                [t["predicted_peak_bytes"] / 2**30 for t in tries], "--", color=color,
                label=f"{name} predicted")  # fmt: skip
        ax.plot([t["prompt_len"] for t in ok], [t["peak_memory_bytes"] / 2**30 for t in ok],
                "o", color=color, label=f"{name} measured (fits)")  # fmt: skip
        oom = [t["prompt_len"] for t in tries if not t["fits"]]
        ax.plot(oom, [s["free_bytes"] / 2**30] * len(oom), "x", color=color, label=f"{name} OOM")
        if s["max_fit"]:
            ax.axvline(s["max_fit"], color=color, lw=0.8)
    free = next(iter(search.values()))["free_bytes"] / 2**30
    ax.axhline(free, color="k", ls=":", lw=1, label=f"free {free:.0f} GiB")
    ax.set(xscale="log", xlabel="prompt tokens", ylabel="step-1 peak above weights (GiB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llada-8b", choices=sorted(bench.PRESETS))
    ap.add_argument("--methods", nargs="+", default=["fullcache", "maskkv"])
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--check-len", type=int, default=32768, help="0 skips the probe check")
    ap.add_argument("--probe-layers", type=int, default=1, help="0 runs the whole model")
    ap.add_argument("--refine", type=int, default=3)
    ap.add_argument("--device", default=None, help="default cuda; cpu needs --free-bytes")
    ap.add_argument("--free-bytes", type=int, default=None, help="a memory budget (CPU runs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_max_prompt: needs a CUDA device (--device cpu --free-bytes N to try it)")
    model = bench.build_model(args.preset, device=device)
    R = bench.PRESETS[args.preset].gen_length
    checks = []
    if args.check_len:
        checks = probe_check(model, args.methods, args.check_len, args.budget,
                             args.probe_layers or 1, R)  # fmt: skip
    search = bench.max_prompt_search(
        model, args.methods, budget=args.budget, refine=args.refine, gen_length=R,
        probe_layers=args.probe_layers or None, free_bytes=args.free_bytes,
    )  # fmt: skip
    rows = [{"kind": "probe_check", **r} for r in checks]
    for name, s in search.items():
        rows += [{"kind": "try", "method": name, **t} for t in s["tries"]]
    fc, mkv = search.get("fullcache", {}), search.get("maskkv", {})
    ratio = mkv["max_fit"] / fc["max_fit"] if fc.get("max_fit") and mkv.get("max_fit") else None
    summary = {n: {k: v for k, v in s.items() if k != "tries"} for n, s in search.items()}
    # DESIGN: MaskKV's peak <= 50% of FullCache's at 32k, weights included.
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    full = {r["method"]: r["full_peak_bytes"] for r in checks}
    peak_ratio = None
    if "fullcache" in full and "maskkv" in full:
        peak_ratio = (weights + full["maskkv"]) / (weights + full["fullcache"])
        status = "PASS" if peak_ratio <= 0.5 else "MISS"
        print(f"[{status}] P={args.check_len}: peak memory MaskKV / FullCache = {peak_ratio:.3f} "
              "(weights included; target <= 0.5)")  # fmt: skip
    config = dict(preset=args.preset, budget=args.budget, gen_length=R, probe_layers=args.probe_layers,
                  search=summary, maskkv_over_fullcache=ratio, parameter_bytes=weights,
                  peak_vs_fullcache_at_check_len=peak_ratio,
                  target="MaskKV longest prompt >= 8x FullCache's")  # fmt: skip
    path = common.save(f"max_prompt_{args.preset}", device, config, rows, args.out)
    plot(search, path.with_suffix(".png"))
    print(bench.format_search(search))
    if ratio is not None:
        status = "PASS" if ratio >= 8 else "MISS"
        print(f"[{status}] longest prompt MaskKV / FullCache = {ratio:.1f} (target >= 8)")
    print(f"wrote {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
