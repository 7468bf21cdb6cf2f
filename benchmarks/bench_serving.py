"""Serving benchmark: closed-loop clients against the engine, MaskKV vs FullCache vs NoCache at the
same KV memory budget, plus the static-batch path.

C clients each send a request, wait for its last block and send the next (closed loop), over a
prompt-length distribution (``--workload PROMPT:GEN:WEIGHT,...``), in-process against
``maskkv.serving.Engine`` (no HTTP: the numbers are the engine's). The KV budget is the same for
every method: the bytes ``--kv-requests`` FullCache requests of the longest prompt hold. Per
(method, concurrency): output tokens/s, p50 / p99 request latency, p50 / p99 time to first
block, peak requests running, peak KV bytes in use. The static-batch path runs the same requests
through ``maskkv.generate`` in left-padded batches of C (MaskKV; a batch starts and ends
together, its latency is the batch's time). A run stops admitting clients after
``--time-limit`` seconds; requests then unfinished are cancelled and not counted. On CUDA the
engine replays its batched steps as CUDA graphs (by bucket of shapes); ``--cuda-graphs on,off``
also runs every configuration with eager steps (path "engine-eager"), side by side.

    python benchmarks/bench_serving.py --preset cpu --threads 1            # committed CPU results
    python benchmarks/bench_serving.py --preset llada-8b --methods maskkv,fullcache \\
        --concurrency 1,8,32,128 --time-limit 30 --cuda-graphs on,off      # one GPU, bf16

Results: ``benchmarks/results/<device>/serving_<preset>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
import warnings

import common
import torch

import maskkv
from maskkv import bench as mbench
from maskkv import methods as methods_lib
from maskkv.serving import Engine, SamplingParams

# The engine's CPU preset: the serving loop's shape at a size one CPU core turns over in minutes
# (4 layers, d 256, 4 heads of 64), prompts 4-16x the response so that both the prompt passes and
# the later steps count; llada-8b is the real shape with the 4k / 32k mix.
PRESETS = {
    "cpu": dict(
        model=mbench.Preset(
            name="serve-cpu", kind="llada", layers=4, hidden=256, heads=4, kv_heads=4, ffn=704,
            vocab=1024, device="cpu", dtype="float32", prompt_lens=(1024, 4096),
        ),
        workload="512:128:3,2048:128:1", budget=64, concurrency="1,8,32,128", time_limit=45.0,
        block_length=32,
    ),
    "llada-8b": dict(
        model=mbench.PRESETS["llada-8b"], workload="4096:512:1,32768:256:1", budget=256,
        concurrency="1,8,32,128", time_limit=30.0, block_length=32,
    ),
}  # fmt: skip


def _workload(text: str) -> list[tuple[int, int, float]]:
    out = []
    for part in text.split(","):
        p, g, w = part.split(":")
        out.append((int(p), int(g), float(w)))
    return out


def _requests(model, workload, n: int, seed: int, block: int, tokens_per_step: int):
    """n (prompt ids, params) drawn from the workload's weights."""
    rng = random.Random(seed)
    shapes = rng.choices([(p, g) for p, g, _ in workload], [w for *_, w in workload], k=n)
    out = []
    for i, (P, G) in enumerate(shapes):
        ids = mbench.random_prompt(model, P, seed=seed * 100003 + i)[0]
        params = SamplingParams(
            gen_length=G, block_length=min(block, G), steps=max(G // tokens_per_step, G // block)
        )
        out.append((ids, params))
    return out


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def run_engine(
    model, method, cache, kv_budget, C, requests, time_limit, prefill_tokens, cuda_graphs=True
):
    """Closed loop of C clients over ``requests``; one row of results."""
    engine = Engine(
        model, method=method, cache=cache, kv_budget=kv_budget, max_running=C,
        max_waiting=len(requests) + 1, prefill_tokens=prefill_tokens, cuda_graphs=cuda_graphs,
    )  # fmt: skip
    engine.generate([requests[0][0][:64]], requests[0][1].replace(gen_length=8, block_length=8,
                    steps=2), progress=False)  # warm-up  # fmt: skip
    pending = list(requests)
    live, done = [], []
    peak_running = peak_kv = 0
    t0 = time.perf_counter()
    for _ in range(min(C, len(pending))):
        ids, params = pending.pop(0)
        live.append(engine.add_request(ids, params))
    while live:
        for req in engine.step():
            live.remove(req)
            if req.finish_reason.value == "length":
                done.append(req)
            if pending and time.perf_counter() - t0 < time_limit:
                ids, params = pending.pop(0)
                live.append(engine.add_request(ids, params))
        peak_running = max(peak_running, len(engine.scheduler.running))
        peak_kv = max(peak_kv, engine.kv_bytes_in_use)
        if time.perf_counter() - t0 > time_limit * 1.5:  # in-flight requests past the limit
            for req in live:
                engine.abort(req.request_id)
            while engine.has_unfinished():
                engine.step()
            break
    end = max((r.arrival_time + r.finish_time for r in done), default=time.monotonic())
    elapsed = end - min((r.arrival_time for r in done), default=end) if done else 0.0
    tokens = sum(len(r.token_ids) for r in done)
    graphs = engine.runner.graphs
    lat = [r.finish_time for r in done]
    ttfb = [r.first_block_time for r in done]
    return dict(
        requests=len(done), output_tokens=tokens, seconds=elapsed,
        output_tokens_per_s=tokens / elapsed if elapsed else None,
        latency_p50_s=_percentile(lat, 50), latency_p99_s=_percentile(lat, 99),
        ttfb_p50_s=_percentile(ttfb, 50), ttfb_p99_s=_percentile(ttfb, 99),
        peak_running=peak_running, peak_kv_bytes=peak_kv, kv_budget_bytes=engine.pool.capacity_bytes,
        graphs_captured=0 if graphs is None else graphs.captures,
    )  # fmt: skip


def run_static(model, method, cache, kv_budget, C, requests, time_limit):
    """The same requests through ``maskkv.generate`` in left-padded batches of up to C (as many
    as the KV budget holds), one batch after the other."""
    probe = Engine(model, method=method, cache=cache, kv_budget=kv_budget)
    per_request = max(
        probe.runner.footprint(len(ids), p.resolved(model)).rows * probe.pool.row_bytes
        for ids, p in requests
    )
    B = max(1, min(C, probe.pool.capacity_bytes // max(per_request, 1)))
    lat, tokens, n = [], 0, 0
    t0 = time.perf_counter()
    for s in range(0, len(requests), B):
        if time.perf_counter() - t0 > time_limit:
            break
        batch = requests[s : s + B]
        P = max(len(ids) for ids, _ in batch)
        G = max(p.gen_length for _, p in batch)
        block = min(p.block_length for _, p in batch)
        steps = max(p.steps * G // p.gen_length for _, p in batch)
        steps = -(-steps // (G // block)) * (G // block)
        dev = batch[0][0].device
        x = torch.zeros(len(batch), P, dtype=torch.long, device=dev)
        mask = torch.zeros(len(batch), P, dtype=torch.long, device=dev)
        for r, (ids, _) in enumerate(batch):
            x[r, P - len(ids) :], mask[r, P - len(ids) :] = ids, 1
        tb = time.perf_counter()
        maskkv.generate(
            model, x, attention_mask=mask, method=method, cache=cache, gen_length=G,
            block_length=block, steps=steps,
        )  # fmt: skip
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        now = time.perf_counter()
        lat += [now - tb] * len(batch)
        tokens += sum(p.gen_length for _, p in batch)
        n += len(batch)
    elapsed = time.perf_counter() - t0
    return dict(
        requests=n, output_tokens=tokens, seconds=elapsed, output_tokens_per_s=tokens / elapsed,
        latency_p50_s=_percentile(lat, 50), latency_p99_s=_percentile(lat, 99),
        ttfb_p50_s=_percentile(lat, 50), ttfb_p99_s=_percentile(lat, 99), peak_running=B,
        peak_kv_bytes=None, kv_budget_bytes=probe.pool.capacity_bytes,
    )  # fmt: skip


def saturation(rows: list[dict]) -> dict[str, int | None]:
    """Per (method, path): the concurrency from which more clients add < 10% tokens/s."""
    out = {}
    for key in sorted({(r["method"], r["path"]) for r in rows}):
        series = sorted(
            (r["concurrency"], r["output_tokens_per_s"] or 0.0)
            for r in rows
            if (r["method"], r["path"]) == key
        )
        sat = None
        for (c0, t0), (_, t1) in zip(series, series[1:]):
            if t1 < 1.1 * t0:
                sat = c0
                break
        out[f"{key[0]}/{key[1]}"] = sat
    return out


def plot(rows, path, title):
    plt = common.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    keys = sorted({(r["method"], r["path"]) for r in rows})
    for method, path_kind in keys:
        series = sorted(
            (r for r in rows if (r["method"], r["path"]) == (method, path_kind)),
            key=lambda r: r["concurrency"],
        )
        label = f"{method}" + {"static": " (static batch)", "engine-eager": " (eager steps)"}.get(
            path_kind, ""
        )
        style = {"static": "--", "engine-eager": ":"}.get(path_kind, "-")
        cs = [r["concurrency"] for r in series]
        for ax, key in zip(axes, ("output_tokens_per_s", "latency_p99_s", "ttfb_p99_s")):
            ax.plot(cs, [r[key] for r in series], style, marker="o", label=label)
    for ax, name in zip(
        axes, ("output tokens / s", "p99 request latency (s)", "p99 time to first block (s)")
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--methods", default="maskkv,fullcache,nocache")
    parser.add_argument("--concurrency", default=None, help="e.g. 1,8,32,128")
    parser.add_argument("--workload", default=None, help="PROMPT:GEN:WEIGHT,... (prompt mix)")
    parser.add_argument("--budget", type=int, default=None, help="eviction budget per head")
    parser.add_argument("--kv-requests", type=float, default=2.0,
                        help="KV budget = this many FullCache requests of the longest prompt")  # fmt: skip
    parser.add_argument("--cache", default="dual", choices=["prompt", "prefix", "dual"])
    parser.add_argument("--block-length", type=int, default=None, help="default 32")
    parser.add_argument("--tokens-per-step", type=int, default=4)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per run")
    parser.add_argument("--prefill-tokens", type=int, default=8192)
    parser.add_argument("--no-static", action="store_true")
    parser.add_argument("--cuda-graphs", default="on",
                        help="on, off, or on,off: engine steps replayed as CUDA graphs, eager, both")  # fmt: skip
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    graph_modes = args.cuda_graphs.split(",")
    if not graph_modes or any(m not in ("on", "off") for m in graph_modes):
        parser.error(f"--cuda-graphs: expected on, off or on,off, got {args.cuda_graphs!r}")
    warnings.simplefilter("ignore", methods_lib.MissingProfileWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    workload = _workload(args.workload or preset["workload"])
    concurrency = [int(c) for c in (args.concurrency or preset["concurrency"]).split(",")]
    budget = args.budget or preset["budget"]
    block_length = args.block_length or preset["block_length"]
    time_limit = args.time_limit or preset["time_limit"]
    shape = preset["model"]
    model = mbench.build_model(shape, device=args.device, dtype=args.dtype)
    # random weights at the real shape: let the context cover the workload (LLaDA's config says 4k)
    longest_seq = max(p + g for p, g, _ in workload)
    for name in ("max_sequence_length", "max_position_embeddings"):
        if getattr(model.config, name, None) is not None:
            setattr(model.config, name, max(getattr(model.config, name), longest_seq))
    device = next(model.parameters()).device
    cache = {"prompt": "prompt", "prefix": "prefix", "dual": "dual"}[args.cache]
    full = methods_lib.get("fullcache")
    probe = Engine(model, method=full, cache=cache, kv_budget=1 << 20)
    longest = max(workload, key=lambda w: w[0] + w[1])
    rows_full = probe.runner.footprint(
        longest[0], SamplingParams(gen_length=longest[1]).resolved(model)
    ).rows
    kv_budget = int(args.kv_requests * rows_full * probe.pool.row_bytes)
    del probe
    rows = []
    for name in args.methods.split(","):
        method = methods_lib.get(
            name, **({} if name in ("fullcache", "nocache") else {"budget": budget})
        )
        for C in concurrency:
            reqs = _requests(model, workload, max(C * args.requests_per_client, 4), 0,
                             block_length, args.tokens_per_step)  # fmt: skip
            for mode in graph_modes:
                row = run_engine(model, method, cache, kv_budget, C, reqs, time_limit,
                                 args.prefill_tokens, cuda_graphs=mode == "on")  # fmt: skip
                path_kind = "engine" if mode == "on" else "engine-eager"
                rows.append(dict(method=name, path=path_kind, concurrency=C, **row))
                common.print_table(rows[-1:], list(rows[-1]))
            if name == "maskkv" and not args.no_static:
                row = run_static(model, method, cache, kv_budget, C, reqs, time_limit)
                rows.append(dict(method=name, path="static", concurrency=C, **row))
                common.print_table(rows[-1:], list(rows[-1]))
    config = dict(
        preset=args.preset, model=dataclasses.asdict(shape), workload=workload,
        concurrency=concurrency, budget=budget, cache=args.cache, kv_budget_bytes=kv_budget,
        kv_requests=args.kv_requests, block_length=block_length,
        tokens_per_step=args.tokens_per_step, requests_per_client=args.requests_per_client,
        time_limit_s=time_limit, prefill_tokens=args.prefill_tokens, cuda_graphs=args.cuda_graphs,
        dtype=str(next(model.parameters()).dtype), saturates_at=saturation(rows),
    )  # fmt: skip
    path = common.save(f"serving_{args.preset}", device, config, rows, args.out)
    print("saturates at (concurrency):", config["saturates_at"])
    print(f"wrote {path}")
    title = (
        f"serving, {args.preset}: prompts {', '.join(f'{p}/{g}' for p, g, _ in workload)} "
        f"(in/out), KV budget {kv_budget / 2**20:.0f} MiB = {args.kv_requests:g} FullCache requests"
    )
    png = plot(rows, path.with_suffix(".png"), title)
    if png:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
