"""select_and_gather at LLaDA-8B / Dream-7B layer shapes, side by side in one run.

Per (model, P, M): the fused op with the Triton backend (with and without the mask queries'
``lse``), the C++ CPU backend (``cpp``, on CPU), the torch backend, the eager reference, and one
SDPA forward of the same queries over the same keys (the cost the scoring is measured against;
flash on CUDA). Every backend also gets its ratio to that SDPA forward (``<backend>_x_sdpa``). Scoring = MaskKV (mask queries,
prompt-preference head budgets), budget 256, bf16, B = 1.

Contract (DESIGN.md): Triton >= 10x the reference; <= 0.7x the SDPA forward with ``lse``,
<= 1.3x without; extra memory O(B * Hkv * P) (``scores_bytes`` is B*Hkv*P*4 for scale).

    python benchmarks/bench_select_and_gather.py                 # full preset on CUDA
    python benchmarks/bench_select_and_gather.py --preset cpu    # tiny shapes, cpp/torch/reference
    python benchmarks/bench_select_and_gather.py --preset cpu-llada --threads 1  # one LLaDA layer

Writes ``select_and_gather.json`` and ``select_and_gather.png`` under benchmarks/results/<device>/.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import maskkv_kernels as mk  # noqa: E402

PRESETS = {
    # models: name -> (Hq, Hkv, D)
    "full": dict(
        models={"llada-8b": (32, 32, 128), "dream-7b": (28, 4, 128)},
        P=[4096, 8192, 16384, 32768, 65536],
        M=[256, 1024],
        budget=256,
        dtype=torch.bfloat16,
        backends=["triton", "torch", "reference"],
    ),
    "cpu": dict(
        models={"llada-mini": (4, 4, 64), "dream-mini": (7, 1, 64)},
        P=[512, 1024, 2048],
        M=[32, 64],
        budget=64,
        dtype=torch.bfloat16,
        backends=["cpp", "torch", "reference"],
    ),
    # One LLaDA-8B layer on one CPU thread (the shape of the C++ backend's targets).
    "cpu-llada": dict(
        models={"llada-8b": (32, 32, 128)},
        P=[4096],
        M=[256],
        budget=256,
        dtype=torch.bfloat16,
        backends=["cpp", "torch"],
    ),
}


def natural_lse(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """fp32 [B, Hq, M] natural-log LSE over all keys, one query head at a time (bounded memory);
    stands in for the LSE an attention forward returns."""
    B, Hq, M, D = q.shape
    G = Hq // k.shape[1]
    out = torch.empty(B, Hq, M, dtype=torch.float32, device=q.device)
    for h in range(Hq):
        logits = q[:, h].float() @ k[:, h // G].float().transpose(-1, -2) * D**-0.5
        out[:, h] = torch.logsumexp(logits, -1)
    return out


def sdpa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """One SDPA forward (flash on CUDA) of q over all keys; GQA natively when supported, else
    K/V expanded once outside the timing. Returns (fn, how)."""
    G = q.shape[1] // k.shape[1]
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    else:
        ctx = contextlib.nullcontext

    def make(kk, vv, gqa):
        def fn():
            with ctx():
                return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa)

        return fn

    fn = make(k, v, G > 1)
    try:
        fn()  # probe: flash may refuse GQA in this torch
        return fn, "native-gqa"
    except (RuntimeError, TypeError):
        return make(k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), False), "expanded-kv"


def measure(fn, device):
    """(median ms, peak extra bytes) or (None, None) when it does not fit."""
    try:
        ms = (
            common.bench(fn, device, warmup=1, rep=3)
            if device.type == "cpu"
            else common.bench(fn, device)
        )
        mem = common.peak_memory(fn, device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None
    return ms, mem


def too_big_for_reference(B, Hq, M, L, device) -> bool:
    """The reference materialises [B, Hq, M, L] fp32 a few times over."""
    need = 4 * B * Hq * M * L * 4
    if device.type == "cuda":
        return need > 0.6 * torch.cuda.mem_get_info(device)[0]
    return need > 2 << 30


def bench_one(name, Hq, Hkv, D, P, M, cfg, device, backends) -> dict:
    torch.manual_seed(0)
    L = P + M
    q = torch.randn(1, Hq, M, D, device=device, dtype=cfg["dtype"])
    k = torch.randn(1, Hkv, L, D, device=device, dtype=cfg["dtype"])
    v = torch.randn(1, Hkv, L, D, device=device, dtype=cfg["dtype"])
    lse = natural_lse(q, k)
    lens = torch.tensor([P])  # on the CPU, as the generation loop passes it
    row = dict(model=name, Hq=Hq, Hkv=Hkv, D=D, P=P, M=M, budget=cfg["budget"])
    row["scores_bytes"] = Hkv * P * 4

    def op(backend, with_lse):
        return lambda: mk.select_and_gather(
            q, k, v, cfg["budget"], prompt_len=P, prompt_lens=lens,
            head_budget="prompt_preference", lse=lse if with_lse else None, backend=backend,
        )  # fmt: skip

    for backend in backends:
        if backend == "reference" and too_big_for_reference(1, Hq, M, L, device):
            row["reference_ms"] = row["reference_mem"] = None
            continue
        row[f"{backend}_ms"], row[f"{backend}_mem"] = measure(op(backend, False), device)
        if backend == "triton":
            row["triton_lse_ms"], row["triton_lse_mem"] = measure(op("triton", True), device)
            # Kernels alone (CUDA-graph replay), as a captured generation step runs them.
            row["triton_graph_ms"] = common.bench_graph(op("triton", False))
            row["triton_lse_graph_ms"] = common.bench_graph(op("triton", True))
            # Every pass-2 kernel x compaction pair, kernels only, side by side with the
            # defaults above (SCORE_KERNEL "auto", COMPACTION "parallel"); "fc" is the
            # one-program-per-row top-k ("fused": two launches).
            from maskkv_kernels.select import triton_scores, triton_topk

            saved = triton_scores.SCORE_KERNEL, triton_topk.COMPACTION
            try:
                for score_kernel, tag in (("key_resident", "kr"), ("k_streaming", "ks")):
                    for compaction in ("serial", "parallel", "fused"):
                        triton_scores.SCORE_KERNEL = score_kernel
                        triton_topk.COMPACTION = compaction
                        name = f"triton_{tag}_{compaction[0]}c"  # e.g. triton_ks_pc
                        for with_lse, suffix in ((False, ""), (True, "_lse")):
                            try:
                                op("triton", with_lse)()  # compile + autotune, not captured
                            except Exception as e:  # report it, measure the other pairs
                                print(f"{name}{suffix}: FAILED {type(e).__name__}: {e}")
                                continue
                            row[f"{name}{suffix}_graph_ms"] = common.bench_graph(
                                op("triton", with_lse)
                            )
            finally:
                triton_scores.SCORE_KERNEL, triton_topk.COMPACTION = saved
    sdpa, how = sdpa_forward(q, k, v)
    row["sdpa_ms"], row["sdpa_mem"] = measure(sdpa, device)
    row["sdpa_gqa"] = how
    if device.type == "cuda":
        row["sdpa_graph_ms"] = common.bench_graph(sdpa)
        if row.get("triton_graph_ms") and row["sdpa_graph_ms"]:
            row["graph_x_sdpa"] = row["triton_graph_ms"] / row["sdpa_graph_ms"]
        if row.get("triton_lse_graph_ms") and row["sdpa_graph_ms"]:
            row["graph_x_sdpa_lse"] = row["triton_lse_graph_ms"] / row["sdpa_graph_ms"]
        for col in [c for c in row if c.startswith("triton_") and c.endswith("_graph_ms")]:
            if row[col] and row["sdpa_graph_ms"]:  # every kernel pair against the targets
                row[col.replace("_graph_ms", "_x_sdpa")] = row[col] / row["sdpa_graph_ms"]
    fast = next((b for b in ("triton", "cpp", "torch") if b in backends), "torch")
    for backend in backends:
        if row.get(f"{backend}_ms") and row["sdpa_ms"] and backend != "reference":
            row[f"{backend}_x_sdpa"] = row[f"{backend}_ms"] / row["sdpa_ms"]
    if row.get("reference_ms") and row.get(f"{fast}_ms"):
        row["speedup_vs_ref"] = row["reference_ms"] / row[f"{fast}_ms"]
    if row.get(f"{fast}_ms") and row["sdpa_ms"]:
        row["x_sdpa"] = row[f"{fast}_ms"] / row["sdpa_ms"]
    if row.get("triton_lse_ms") and row["sdpa_ms"]:
        row["x_sdpa_lse"] = row["triton_lse_ms"] / row["sdpa_ms"]
    return row


def run(preset: str, device: torch.device, backends: list[str]) -> list[dict]:
    cfg = PRESETS[preset]
    rows = []
    for name, (Hq, Hkv, D) in cfg["models"].items():
        for P in cfg["P"]:
            for M in cfg["M"]:
                row = bench_one(name, Hq, Hkv, D, P, M, cfg, device, backends)
                rows.append(row)
                times = [f"{c}={row[c]:.3g}" for c in row if c.endswith("_ms") and row[c]]
                print(f"{name} P={P} M={M}: " + ", ".join(times), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], backends: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["M"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    series = [f"{b}_ms" for b in backends] + ["sdpa_ms"]
    if "triton" in backends:
        series.insert(1, "triton_lse_ms")
    for ax, (model, M) in zip(axes[0], panels):
        sub = [r for r in rows if r["model"] == model and r["M"] == M]
        for col in series:
            pts = [(r["P"], r[col]) for r in sub if r.get(col)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=col[:-3])
        ax.set(xscale="log", yscale="log", xlabel="prompt P", ylabel="ms", title=f"{model} M={M}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--out", default=None, help="results folder (default per device)")
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=None, help="override P grid")
    parser.add_argument("--mask-lens", type=int, nargs="+", default=None, help="override M grid")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 on a shared, loaded CPU)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("full" if device.type == "cuda" else "cpu")
    backends = args.backends or PRESETS[preset]["backends"]
    if device.type != "cuda":
        backends = [b for b in backends if b != "triton"]  # the interpreter is no benchmark

    cfg = PRESETS[preset] = dict(PRESETS[preset])
    if args.prompt_lens:
        cfg["P"] = args.prompt_lens
    if args.mask_lens:
        cfg["M"] = args.mask_lens
    rows = run(preset, device, backends)
    config = dict(
        preset=preset,
        dtype=str(cfg["dtype"]),
        budget=cfg["budget"],
        models={k: dict(zip(("Hq", "Hkv", "D"), v)) for k, v in cfg["models"].items()},
        backends=backends,
        score="mask",
        head_budget="prompt_preference",
        batch=1,
        targets=dict(speedup_vs_ref=">= 10", x_sdpa_lse="<= 0.7", x_sdpa="<= 1.3"),
        threads=torch.get_num_threads(),
    )
    path = common.save("select_and_gather", device, config, rows, args.out)
    plot(rows, backends, path.with_suffix(".png"))
    cols = ["model", "P", "M"] + [c for c in rows[0] if c.endswith("_ms")]
    ratios = ("speedup_vs_ref", "x_sdpa_lse", "x_sdpa", "graph_x_sdpa_lse", "graph_x_sdpa")
    ratios += tuple(f"{b}_x_sdpa" for b in backends if b not in ("reference", "triton"))
    cols += [c for c in ratios if any(c in r for r in rows)]
    cols += [c for c in rows[0] if c.endswith("_mem")] + ["scores_bytes"]
    common.print_table(rows, cols)
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    if any(r.get(c) is None for r in rows for c in r if c.endswith("_ms")):
        print("(a '-' is a run that did not fit in memory)", file=sys.stderr)


if __name__ == "__main__":
    main()
