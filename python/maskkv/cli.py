"""Command line: ``maskkv demo | generate | calibrate | bench | eval``."""

from __future__ import annotations

import argparse
import sys
import time


def _kernel_demo(args: argparse.Namespace) -> None:
    """select_and_gather + ragged_attention on one random LLaDA-shaped layer."""
    import torch

    import maskkv_kernels as mk

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, H, D, P, R = 1, 32, 128, args.prompt_len, args.gen_length
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, R, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, H, P + R, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, H, P + R, D, device=device, dtype=dtype, generator=g)
    print(
        f"device {device}, dtype {dtype}: one LLaDA-8B layer (32 heads, head dim 128), "
        f"prompt {P}, {R} mask queries, budget {args.budget}"
    )
    t0 = time.perf_counter()
    cache = mk.select_and_gather(
        q, k, v, args.budget, prompt_len=P, head_budget="prompt_preference"
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    out = mk.ragged_attention(q, cache, k[:, :, P:], v[:, :, P:])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    full_bytes = 2 * B * H * P * D * k.element_size()
    lengths = cache.lengths()
    print(
        f"kept prompt tokens per head: min {int(lengths.min())}, mean {lengths.float().mean():.1f}, "
        f"max {int(lengths.max())} of {P}"
    )
    print(
        f"prompt KV bytes: {full_bytes / 2**20:.1f} MiB -> {cache.nbytes / 2**20:.2f} MiB "
        f"({full_bytes / cache.nbytes:.1f}x smaller)"
    )
    print(
        f"select_and_gather {1e3 * (t1 - t0):.1f} ms, ragged_attention {1e3 * (t2 - t1):.1f} ms, "
        f"output {tuple(out.shape)} finite={bool(torch.isfinite(out).all())}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maskkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded default end to end")
    demo.add_argument("--prompt-len", type=int, default=4096)
    demo.add_argument("--gen-length", type=int, default=256)
    demo.add_argument("--budget", type=int, default=256)
    demo.set_defaults(func=_kernel_demo)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
