"""Benchmark the varlen form of ragged_attention: one call for a batch of requests at different
positions, against a loop of per-request calls and against padded SDPA.

Problem (one layer of one serving step): B requests, each at its own position. Request b runs
``nq_b`` queries (its current block) per head over [its kept prompt keys ‖ its ``lt_b`` tail
keys] (the response KV so far), per KV head; kept lengths have mean ``--mean`` and a max/mean
skew over the B * Hkv heads (MaskKV's per-head budgets), or every head keeps the whole prompt
(``full``: FullCache). The queries, tails and the pool-resident caches are those of the
engine: q packed [Nq, Hq, D], tails packed [Nt, Hkv, D], the pruned caches one RaggedKV pool
view (``seg_starts``, requests in shuffled slots).

Side by side (same inputs, one run; every call with ``check_inputs=False`` as an engine's hot
loop makes it):
- ``varlen``: one varlen call (Triton on CUDA, the C++ backend on CPU); ``varlen_torch``: the
  vectorised torch backend (CPU);
- ``loop``: B dense 4-D calls, one per request (same backend), each request's output copied
  into the packed output (what an engine without the varlen form does); ``loop_torch`` (CPU);
- ``padded_sdpa``: SDPA over every request padded to the longest request's queries and to the
  longest head's keys, with a boolean key mask, K/V expanded to the Hq query heads (the padding
  copies not timed).
On CUDA the varlen and padded calls are also timed replayed from a CUDA graph (``graph_ms``,
the kernels alone, as a graph-captured serving step runs them). On the CPU the calls of all
implementations are interleaved round-robin (median of 5 each), so that a shared machine's load
falls on all of them alike.

    python benchmarks/bench_ragged_varlen.py                          # GPU preset on CUDA
    python benchmarks/bench_ragged_varlen.py --preset cpu --threads 1  # LLaDA-8B heads, CPU
    python benchmarks/bench_ragged_varlen.py --preset tiny             # seconds (tests)

Writes JSON + PNG under benchmarks/results/<device>/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_ragged_attention import skewed_lengths  # noqa: E402

import maskkv_kernels as mk  # noqa: E402

# A scenario: B requests; their queries (block) and tails (response KV so far) are drawn from
# the given ranges; ``full`` gives every head the whole prompt (FullCache) instead of budgets.
PRESETS = {
    # LLaDA-8B attention (32/32 heads, D 128, bf16) at the serving benchmark's scale.
    "gpu": dict(
        heads=(32, 32),
        head_dim=128,
        dtype="bfloat16",
        mean=256,
        skew=8,
        prompt=32768,
        scenarios=[
            ("B1 block32", 1, (32, 32), (32, 256), False),
            ("B8 block32", 8, (32, 32), (32, 256), False),
            ("B32 block32", 32, (32, 32), (32, 256), False),
            ("B128 block32", 128, (32, 32), (32, 256), False),
            ("B32 mixed", 32, (1, 256), (0, 512), False),
            ("B4 full", 4, (32, 32), (32, 256), True),
        ],
        impls=["varlen", "loop", "padded_sdpa"],
    ),
    # The same heads on one CPU thread, fewer requests.
    "cpu": dict(
        heads=(32, 32),
        head_dim=128,
        dtype="bfloat16",
        mean=256,
        skew=8,
        prompt=2048,
        scenarios=[
            ("B1 block32", 1, (32, 32), (32, 256), False),
            ("B8 block32", 8, (32, 32), (32, 256), False),
            ("B32 block32", 32, (32, 32), (32, 256), False),
            ("B8 mixed", 8, (1, 128), (0, 256), False),
            ("B2 full", 2, (32, 32), (32, 256), True),
        ],
        impls=["varlen", "varlen_torch", "loop", "loop_torch", "padded_sdpa"],
    ),
    "tiny": dict(
        heads=(4, 2),
        head_dim=16,
        dtype="float32",
        mean=16,
        skew=4,
        prompt=64,
        scenarios=[("B3 mixed", 3, (1, 8), (0, 8), False), ("B2 full", 2, (4, 4), (2, 6), True)],
        impls=["varlen", "varlen_torch", "loop", "loop_torch", "padded_sdpa"],
    ),
}


def build_case(B, Hq, Hkv, D, q_range, t_range, full, cfg, dtype, device, seed=0):
    """Packed queries and tails, the kept caches as one pool view, and the host lengths."""
    gen = torch.Generator().manual_seed(seed)
    S = B * Hkv
    if full:
        seg_lens = [cfg["prompt"]] * S
    else:
        seg_lens = skewed_lengths(S, cfg["mean"], cfg["skew"], seed=seed)
    q_lens = torch.randint(q_range[0], q_range[1] + 1, (B,), generator=gen).tolist()
    t_lens = torch.randint(t_range[0], t_range[1] + 1, (B,), generator=gen).tolist()

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    def cu(lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)

    # The pool: request slots in shuffled order (an engine's pool after some churn).
    N = sum(seg_lens)
    order = torch.randperm(S, generator=gen).tolist()
    starts, row = [0] * S, 0
    for s in order:
        starts[s] = row
        row += seg_lens[s]
    cache = mk.RaggedKV(
        rnd(N, D),
        rnd(N, D),
        cu(seg_lens).to(device),
        torch.zeros(N, dtype=torch.int32, device=device),
        max(seg_lens),
        Hkv,
        torch.tensor(starts, dtype=torch.int64, device=device),
    )
    q = rnd(sum(q_lens), Hq, D)
    kt, vt = rnd(sum(t_lens), Hkv, D), rnd(sum(t_lens), Hkv, D)
    kw = dict(
        cu_seqlens_q=cu(q_lens).to(device),
        max_seqlen_q=max(q_lens),
        cu_seqlens_tail=cu(t_lens).to(device),
        max_seqlen_tail=max(t_lens),
    )
    return q, cache, kt, vt, kw, seg_lens, q_lens, t_lens


def per_request_inputs(q, cache, kt, vt, q_lens, t_lens):
    """The dense 4-D calls of a loop over requests: views into the packed tensors, each
    request's cache a pool view of its Hkv segments."""
    Hkv = cache.num_kv_heads
    calls, q0, t0 = [], 0, 0
    for b, (nq, lt) in enumerate(zip(q_lens, t_lens)):
        segs = slice(b * Hkv, (b + 1) * Hkv)
        cu = cache.cu_seqlens[b * Hkv : (b + 1) * Hkv + 1]
        one = mk.RaggedKV(
            cache.k, cache.v, (cu - cu[0]).to(torch.int32), cache.positions, cache.max_seqlen,
            Hkv, cache.seg_starts[segs],
        )  # fmt: skip
        q4 = q[q0 : q0 + nq].transpose(0, 1)[None]
        kt4 = kt[t0 : t0 + lt].transpose(0, 1)[None]
        vt4 = vt[t0 : t0 + lt].transpose(0, 1)[None]
        calls.append((slice(q0, q0 + nq), q4, one, kt4, vt4))
        q0, t0 = q0 + nq, t0 + lt
    return calls


def padded_inputs(q, cache, kt, vt, q_lens, t_lens, G):
    """[B, Hq, Qmax, D] queries, [B, Hq, Kmax, D] keys/values (kept ‖ tail, expanded to the
    query heads) and the bool key mask [B, Hq, 1, Kmax]."""
    B, Hkv = len(q_lens), cache.num_kv_heads
    kp, vp, _, valid = cache.to_padded()  # [B, Hkv, Lmax, D]
    Qmax, Tmax, D = max(q_lens), max(t_lens), q.shape[-1]
    qp = q.new_zeros(B, q.shape[1], Qmax, D)
    ktp = kt.new_zeros(B, Hkv, Tmax, D)
    vtp = vt.new_zeros(B, Hkv, Tmax, D)
    tvalid = torch.zeros(B, Hkv, Tmax, dtype=torch.bool, device=q.device)
    q0 = t0 = 0
    for b, (nq, lt) in enumerate(zip(q_lens, t_lens)):
        qp[b, :, :nq] = q[q0 : q0 + nq].transpose(0, 1)
        ktp[b, :, :lt] = kt[t0 : t0 + lt].transpose(0, 1)
        vtp[b, :, :lt] = vt[t0 : t0 + lt].transpose(0, 1)
        tvalid[b, :, :lt] = True
        q0, t0 = q0 + nq, t0 + lt
    k = torch.cat([kp, ktp], 2).repeat_interleave(G, 1)
    v = torch.cat([vp, vtp], 2).repeat_interleave(G, 1)
    mask = torch.cat([valid, tvalid], 2).repeat_interleave(G, 1)[:, :, None, :]
    return qp, k, v, mask


def run_scenario(name, B, q_range, t_range, full, cfg, device, dtype):
    Hq, Hkv = cfg["heads"]
    G, D = Hq // Hkv, cfg["head_dim"]
    q, cache, kt, vt, kw, seg_lens, q_lens, t_lens = build_case(
        B, Hq, Hkv, D, q_range, t_range, full, cfg, dtype, device
    )
    fast = "triton" if device.type == "cuda" else mk.resolve_backend("auto", device)
    calls = per_request_inputs(q, cache, kt, vt, q_lens, t_lens)

    def varlen(backend):
        return lambda: mk.ragged_attention(
            q, cache, kt, vt, **kw, backend=backend, check_inputs=False
        )

    def loop(backend):
        out = torch.empty_like(q)

        def run():
            for rows, q4, one, kt4, vt4 in calls:
                o = mk.ragged_attention(q4, one, kt4, vt4, backend=backend, check_inputs=False)
                out[rows] = o[0].transpose(0, 1)
            return out

        return run

    fns = {}
    impls = cfg["impls"]
    if "varlen" in impls:
        fns["varlen"] = varlen(fast)
    if "varlen_torch" in impls:
        fns["varlen_torch"] = varlen("torch")
    if "loop" in impls:
        fns["loop"] = loop(fast)
    if "loop_torch" in impls:
        fns["loop_torch"] = loop("torch")
    if "padded_sdpa" in impls:
        qp, kp, vp, mask = padded_inputs(q, cache, kt, vt, q_lens, t_lens, G)
        fns["padded_sdpa"] = lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)

    # Useful work: 4 * D flops per (query head row, key).
    keys = sum(
        q_lens[b] * G * (seg_lens[b * Hkv + g] + t_lens[b]) for b in range(B) for g in range(Hkv)
    )
    flops = 4 * D * keys
    want = mk.ragged_attention(q, cache, kt, vt, **kw, backend="torch")
    for impl, fn in fns.items():
        got = fn()  # compile / autotune outside the timing; and a sanity check of the result
        if impl != "padded_sdpa":
            torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    times = interleaved_ms(fns, rep=5) if device.type == "cpu" else None
    rows = []
    for impl, fn in fns.items():
        ms = times[impl] if times else common.bench(fn, device)
        graph_ms = None
        if device.type == "cuda" and impl in ("varlen", "padded_sdpa"):
            graph_ms = common.bench_graph(fn)
        rows.append(
            dict(
                case=name,
                impl=impl,
                backend=fast if impl in ("varlen", "loop") else "torch",
                B=B,
                Hq=Hq,
                Hkv=Hkv,
                D=D,
                Nq=sum(q_lens),
                Nt=sum(t_lens),
                max_q=max(q_lens),
                max_tail=max(t_lens),
                mean_kept=sum(seg_lens) / len(seg_lens),
                max_kept=max(seg_lens),
                full=full,
                ms=ms,
                graph_ms=graph_ms,
                tflops=flops / ms / 1e9,
                peak_mb=None if device.type != "cuda" else common.peak_memory(fn, device) / 2**20,
            )
        )
    by = {r["impl"]: r["ms"] for r in rows}
    for r in rows:
        r["speedup_vs_loop"] = by.get("loop", float("nan")) / r["ms"]
        r["speedup_vs_padded"] = by.get("padded_sdpa", float("nan")) / r["ms"]
    return rows


def interleaved_ms(fns: dict, rep: int) -> dict[str, float]:
    """Median ms of each function, the calls interleaved round-robin: on a shared CPU, load that
    comes and goes then hits every implementation alike instead of whichever ran at the time."""
    times = {name: [] for name in fns}
    for _ in range(rep):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def plot(rows, path: Path, title: str) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(cases), 3.8))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        ms = [
            next((r["ms"] for r in rows if r["case"] == c and r["impl"] == impl), 0) for c in cases
        ]
        ax.bar([x + i * width for x in range(len(cases))], ms, width, label=impl)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per layer call (log)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=PRESETS, default=None, help="default: gpu on CUDA, else cpu")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="output folder (default results/<device>/)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--name", default="bench_ragged_varlen", help="result file name")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    cfg = dict(PRESETS[preset], preset=preset)
    dtype = getattr(torch, cfg["dtype"])
    rows = []
    for name, B, q_range, t_range, full in cfg["scenarios"]:
        rows += run_scenario(name, B, q_range, t_range, full, cfg, device, dtype)
        print(f"done {name}", flush=True)
    common.print_table(
        rows,
        ["case", "impl", "B", "Nq", "Nt", "ms", "graph_ms", "tflops", "speedup_vs_loop",
         "speedup_vs_padded"],
    )  # fmt: skip
    for r in rows:
        if r["impl"] == "varlen":
            print(
                f"{r['case']}: varlen {r['speedup_vs_loop']:.2f}x the per-request loop, "
                f"{r['speedup_vs_padded']:.2f}x padded SDPA"
            )
    cfg["threads"] = torch.get_num_threads()
    cfg["scenarios"] = [list(s) for s in cfg["scenarios"]]
    path = common.save(args.name, device, cfg, rows, args.out)
    png = plot(
        rows,
        path.with_suffix(".png"),
        f"ragged_attention varlen, {common.device_name(device)}, {cfg['dtype']}, "
        f"Hq/Hkv {cfg['heads'][0]}/{cfg['heads'][1]}, D={cfg['head_dim']}, "
        f"{cfg['threads']} thread(s)",
    )
    print(f"wrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
