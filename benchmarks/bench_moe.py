"""One MoE layer of LLaDA2 (routing + experts + shared experts), three ways, side by side:

- ``loop``: one ``F.linear`` chain per expert on its sorted rows (reads the counts on the host);
- ``grouped``: two ``torch._grouped_mm`` calls over all experts, the shared experts run as one
  more expert of the same pass (maskkv's default on CUDA);
- ``grouped_unfused``: the same, the shared experts as a separate dense MLP.

Token counts: a later step's block (32 tokens, batch 1 and 8) and a step-1 chunk (4096). Rows:
milliseconds (median; on CUDA also replayed from a CUDA graph where the backend allows it).
JSON + PNG under ``benchmarks/results/<device>/moe_layer.*``.

    python benchmarks/bench_moe.py                      # CUDA: the llada2-mini layer, bf16
    python benchmarks/bench_moe.py --small --threads 1  # CPU: the cpu-llada2 layer, fp32
"""

from __future__ import annotations

import argparse

import torch
from common import bench, bench_graph, line_plot, out_dir, print_table, save

from maskkv.bench.presets import model_config
from maskkv.models import _moe
from maskkv.models.llada2 import LLaDA2MoeSparseMoeBlock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="the cpu-llada2 layer shape")
    ap.add_argument("--tokens", default="32,256,4096")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    preset = "cpu-llada2" if args.small else "llada2-mini"
    cfg = model_config(preset)
    torch.manual_seed(0)
    with torch.device(device):
        block = LLaDA2MoeSparseMoeBlock(cfg).to(dtype).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=cfg.hidden_size**-0.5)
    variants = {"loop": ("loop", True), "grouped": ("grouped", True),
                "grouped_unfused": ("grouped", False)}  # fmt: skip
    if device.type != "cuda" and not hasattr(torch, "_grouped_mm"):
        variants = {"loop": ("loop", True)}
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(1, n, cfg.hidden_size, device=device, dtype=dtype)
        ref = None
        for name, (backend, fuse) in variants.items():
            _moe.MOE_BACKEND = backend
            block.fuse_shared = fuse

            def fn(x=x):
                with torch.no_grad():
                    return block(x)

            out = fn()
            ref = out if ref is None else ref
            graph = None
            if device.type == "cuda" and backend == "grouped":
                graph = bench_graph(fn)
            rows.append(
                {
                    "tokens": n,
                    "variant": name,
                    "ms": bench(fn, device),
                    "graph_ms": graph,
                    "max_abs_diff_vs_loop": float((out.float() - ref.float()).abs().max()),
                }
            )
            print_table(rows[-1:], list(rows[-1]))
    _moe.MOE_BACKEND = "auto"
    config = {
        "preset_layer": preset,
        "hidden": cfg.hidden_size,
        "experts": cfg.num_experts,
        "top_k": cfg.num_experts_per_tok,
        "expert_width": cfg.moe_intermediate_size,
        "shared_experts": cfg.num_shared_experts,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    path = save("moe_layer", device, config, rows, args.out)
    print_table(rows, ["tokens", "variant", "ms", "graph_ms", "max_abs_diff_vs_loop"])
    print(f"wrote {path}")
    _plot(rows, out_dir(device, args.out) / "moe_layer.png", config)


def _plot(rows, path, config) -> None:
    series = {}
    for r in rows:
        series.setdefault(r["variant"], []).append((r["tokens"], r["ms"]))
    title = (
        f"LLaDA2 MoE layer ({config['preset_layer']}): {config['experts']} experts of "
        f"{config['expert_width']}, top-{config['top_k']}, {config['dtype']}"
    )
    line_plot(series, path, title=title, xlabel="tokens", ylabel="ms (median)", log_x=True,
              log_y=True)  # fmt: skip


if __name__ == "__main__":
    main()
