"""Block-causal attention of a long prompt (LLaDA2's step 1): which way to run it.

A query reads its own block and every earlier block (blocks of 32). Candidates, side by side on
one layer's q, k, v (bf16 on CUDA, fp32 on CPU):

- ``chunked_sdpa_<C>``: maskkv's ``block_causal_attention``: queries in chunks of whole blocks
  (C positions, ``--chunks``), each chunk through SDPA over the keys up to its last block with a
  [chunk, keys] boolean mask (never [L, L]);
- ``full_mask_sdpa``: one SDPA with the whole [L, L] mask (what the official file builds);
- ``per_block_sdpa``: one mask-free SDPA per block (its queries over the keys up to its end);
- ``flex``: FlexAttention with a block mask (``torch.compile``d; CUDA only).

Rows: milliseconds (median), the mask bytes each holds at once, and the max difference from
``full_mask_sdpa``. JSON + PNG under ``benchmarks/results/<device>/block_causal_attention.*``.

    python benchmarks/bench_block_causal.py --lens 2048,8192          # CPU
    python benchmarks/bench_block_causal.py --lens 8192,32768 --heads 16 --kv-heads 4   # GPU
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import bench, line_plot, out_dir, peak_memory, print_table, save

from maskkv.models._common import block_causal_attention, block_causal_mask

BLOCK = 32


def full_mask_sdpa(q, k, v):
    L = q.shape[2]
    mask = block_causal_mask(0, L, L, BLOCK, None, q.device)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def per_block_sdpa(q, k, v):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    L = q.shape[2]
    outs = [
        F.scaled_dot_product_attention(q[:, :, s : s + BLOCK], k[:, :, : s + BLOCK],
                                       v[:, :, : s + BLOCK])
        for s in range(0, L, BLOCK)
    ]  # fmt: skip
    return torch.cat(outs, 2)


def make_flex(L: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx // BLOCK <= q_idx // BLOCK

    block_mask = create_block_mask(mask_mod, None, None, L, L, device=device)
    compiled = torch.compile(flex_attention)

    def run(q, k, v):
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lens", default="2048,8192")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--chunks", default="4096,1024,256")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-full-mask", type=int, default=32768, help="skip the [L, L] mask above")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for L in (int(x) for x in args.lens.split(",")):
        g = torch.Generator(device).manual_seed(0)
        shape = (1, args.heads, L, args.head_dim)
        q = torch.randn(shape, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(1, args.kv_heads, L, args.head_dim, device=device, dtype=dtype,
                            generator=g) for _ in range(2))  # fmt: skip
        # name -> (attention(q, k, v), mask bytes held at once)
        runs = {}
        for c in (int(x) for x in args.chunks.split(",")):
            runs[f"chunked_sdpa_{c}"] = (
                lambda q, k, v, c=c: block_causal_attention(q, k, v, BLOCK, None, c),
                min(c, L) * L,
            )
        runs["per_block_sdpa"] = (per_block_sdpa, 0)
        if L <= args.max_full_mask:
            runs["full_mask_sdpa"] = (full_mask_sdpa, L * L)
        if device.type == "cuda":
            runs["flex"] = (make_flex(L, device), None)
        ref = runs.get("full_mask_sdpa", next(iter(runs.values())))[0](q, k, v)
        for name, (attn, mask_bytes) in runs.items():
            reps = 3 if device.type == "cpu" and L >= 8192 else 10

            def fn(attn=attn, q=q, k=k, v=v):
                return attn(q, k, v)

            ms = bench(fn, device, warmup=1, rep=reps)
            diff = float((fn().float() - ref.float()).abs().max())
            rows.append(
                {
                    "L": L,
                    "impl": name,
                    "ms": ms,
                    "mask_bytes": mask_bytes,
                    "peak_bytes": peak_memory(fn, device),
                    "max_abs_diff": diff,
                }
            )
            print_table(rows[-1:], list(rows[-1]))
    config = {
        "block_length": BLOCK,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "chunks": args.chunks,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    path = save("block_causal_attention", device, config, rows, args.out)
    print_table(rows, ["L", "impl", "ms", "mask_bytes", "peak_bytes", "max_abs_diff"])
    print(f"wrote {path}")
    _plot(rows, out_dir(device, args.out) / "block_causal_attention.png", config)


def _plot(rows, path, config) -> None:
    series = {}
    for r in rows:
        series.setdefault(r["impl"], []).append((r["L"], r["ms"]))
    title = (
        f"block-causal attention, blocks of {config['block_length']}, {config['heads']}/"
        f"{config['kv_heads']} heads of {config['head_dim']}, {config['dtype']}"
    )
    line_plot(series, path, title=title, xlabel="sequence length", ylabel="ms (median)",
              log_x=True, log_y=True)  # fmt: skip


if __name__ == "__main__":
    main()
