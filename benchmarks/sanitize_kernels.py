"""Small calls of every Triton kernel for compute-sanitizer (memcheck, racecheck, initcheck).

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/sanitize_kernels.py

Covers left padding, a prompt row with no real token, budget 0 and budget >= prompt, every head
mode, both score modes, every top-k compaction, ragged attention with empty segments, no tail,
forced split-K and both row tiles, and the fused elementwise kernels of a later step.
Prints one line per case; any sanitizer report makes the tool exit non-zero.

racecheck instruments every shared-memory access and is slow: ``--tiny --quick --one-config``
runs each kernel variant family once on small shapes (G * Lq = 64 rows, still a full 64-row
tile) and finishes in about a minute on an H100/H200.
"""

from __future__ import annotations

import argparse

import torch

import maskkv_kernels as mk
from maskkv_kernels.attention import triton_ragged
from maskkv_kernels.attention.triton_ragged import ragged_attention_triton
from maskkv_kernels.select import triton_scores, triton_topk


def one_config_per_kernel() -> int:
    """Make every autotuned kernel of the package pick its first eligible config (after its own
    pruning) without benchmarking: under racecheck each benchmarked config is another slow,
    instrumented launch, and the configs run the same code paths. Returns how many were patched."""
    from triton.runtime.autotuner import Autotuner

    from maskkv_kernels.attention import triton_ragged

    patched = 0
    for module in (triton_scores, triton_topk, triton_ragged):
        for obj in vars(module).values():
            if isinstance(obj, Autotuner):
                prune = getattr(obj, "prune_configs", None)
                if prune is None:  # a Triton without the hook: the first config outright
                    obj.configs = obj.configs[:1]
                else:
                    obj.prune_configs = lambda kwargs, prune=prune: prune(kwargs)[:1]
                patched += 1
    return patched


def elementwise(dev: str, dt: torch.dtype, D: int) -> None:
    """The fused later-step kernels at a small layer shape (GQA 7, a masked head block)."""
    T, d, ffn = 40, 7 * D, 3 * D + 8
    x, r = torch.randn(1, T, d, device=dev, dtype=dt), torch.randn(1, T, d, device=dev, dtype=dt)
    w = torch.ones(d, device=dev, dtype=dt)
    mk.rms_norm(x, w, 1e-6, backend="triton")
    mk.rms_norm(x, w, 1e-6, residual=r, backend="triton")
    pos = torch.arange(T, device=dev)[None]
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D))
    emb = torch.cat([pos[..., None] * inv] * 2, -1)
    k = torch.randn(1, T, D, device=dev, dtype=dt)
    for full in (True, False):
        mk.rotary(x, k, emb.cos(), emb.sin(), head_dim=D, full_precision=full, backend="triton")
    g = torch.randn(1, T, ffn, device=dev, dtype=dt)
    mk.silu_mul(g, torch.randn_like(g), backend="triton")
    if dev == "cuda":
        torch.cuda.synchronize()
    print("ok: elementwise (rms_norm, rms_norm + residual, rotary x2, silu_mul)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true",
        help="one selecting mask case, one window case (racecheck is slow: it also autotunes)",
    )  # fmt: skip
    ap.add_argument(
        "--one-config", action="store_true",
        help="every autotuned kernel runs its first eligible config, without benchmarking",
    )  # fmt: skip
    ap.add_argument(
        "--tiny", action="store_true",
        help="small shapes (P 300, 32 response queries, 2 query heads per KV head)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.one_config:
        print(f"autotuning off for {one_config_per_kernel()} kernels", flush=True)
    torch.manual_seed(0)
    dev, dt = ("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16
    B, Hq, Hkv, D, P, R = (2, 4, 2, 128, 300, 32) if args.tiny else (2, 8, 2, 128, 1000, 100)
    elementwise(dev, dt, D)
    q = torch.randn(B, Hq, R, D, device=dev, dtype=dt)
    k = torch.randn(B, Hkv, P + R, D, device=dev, dtype=dt)
    v = torch.randn_like(k)
    k_tail, v_tail = k[:, :, P:], v[:, :, P:]
    cases = []
    for lens in ([P, 7 * P // 10], [P, 0]):
        prompt_lens = torch.tensor(lens)
        for head_budget in ("uniform", "prompt_preference", "adakv"):
            for budget in (0, 100, 5000):
                cases.append(("mask", q, prompt_lens, head_budget, budget))
        cases.append(("window", q[:, :, :32], prompt_lens, "uniform", 100))
    if args.quick:
        cases = [c for c in cases if c[3] == "adakv" and c[4] == 100 or c[0] == "window"][:2]
    # The kernels "auto" does not pick here too (key-resident for M=100 x G=4 rows, K-streaming
    # for the window's 32 x 4), and the serial top-k compaction.
    alternatives = [
        (None, None), ("k_streaming", "serial"), ("key_resident", None), (None, "fused"),
    ]  # fmt: skip
    for (score, qs, prompt_lens, head_budget, budget), (kernel, compaction) in (
        (c, alt) for c in cases for alt in (alternatives if c[4] == 100 else alternatives[:1])
    ):
        saved = triton_scores.SCORE_KERNEL, triton_topk.COMPACTION
        triton_scores.SCORE_KERNEL = kernel or saved[0]
        triton_topk.COMPACTION = compaction or saved[1]
        try:
            cache = mk.select_and_gather(
                qs, k, v, budget, prompt_len=P, prompt_lens=prompt_lens, score=score,
                head_budget=head_budget, backend="triton",
            )  # fmt: skip
        finally:
            triton_scores.SCORE_KERNEL, triton_topk.COMPACTION = saved
        for tail in (True, False):
            kt, vt = (k_tail, v_tail) if tail else (None, None)
            mk.ragged_attention(q, cache, kt, vt, backend="triton", return_lse=True)
            for splits, row_tile in ((1, None), (3, None), (3, 128)):
                saved_tile, triton_ragged.ROW_TILE = triton_ragged.ROW_TILE, row_tile
                try:
                    ragged_attention_triton(
                        q, cache.k, cache.v, cache.cu_seqlens, cache.max_seqlen, Hkv, kt, vt,
                        D**-0.5, True, num_splits=splits,
                    )  # fmt: skip
                finally:
                    triton_ragged.ROW_TILE = saved_tile
        if dev == "cuda":
            torch.cuda.synchronize()
        alt = f" ({kernel}, {compaction})" if kernel or compaction else ""
        print(
            f"ok: {score} lens={prompt_lens.tolist()} {head_budget} budget={budget}{alt}",
            flush=True,
        )
    print("sanitize run finished")


if __name__ == "__main__":
    main()
