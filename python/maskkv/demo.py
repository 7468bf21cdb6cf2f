"""``maskkv demo`` (``make demo``): the two ops on one LLaDA-8B-shaped layer, then MaskKV against
the baselines on the shipped trained model ``tiny-llada-kv``.

1. **Kernels.** The backend is resolved (and the C++ CPU kernels built or loaded) before anything
   is timed, and said on its own line; ``select_and_gather`` and ``ragged_attention`` are then
   timed warm: one untimed call, then the median of ``repeats`` calls.
2. **A held-out question.** Example ``example`` (default 0, the first) of the ``kv_retrieval``
   test split at 512 tokens, the split the quality suite scores (``maskkv.quality.tasks``); it is
   picked by its index, never by its outcome. Every method answers it at budget 16 (3% of the
   prompt): answer, right or wrong, prompt KV kept per head, later-step time; FullCache and
   NoCache are the references. Then the suite's accuracy on 100 such questions, read from the
   committed results (``benchmarks/results/cpu-x86_64/quality-tiny-llada-kv.json``) when the
   repository is at hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: The model, task, prompt length and budget of the second half (the quality suite's settings).
MODEL = "tiny-llada-kv"
TASK = "kv_retrieval"
PROMPT_LEN = 512
BUDGET = 16
#: The suite's committed results for ``MODEL`` (present in a clone of the repository).
SUITE_RESULTS = (
    Path(__file__).resolve().parents[2]
    / "benchmarks"
    / "results"
    / "cpu-x86_64"
    / f"quality-{MODEL}.json"
)
#: References first, then the methods in the paper's order, then the ones beyond the paper.
METHOD_ORDER = (
    "fullcache",
    "nocache",
    "maskkv",
    "snapkv",
    "pyramidkv",
    "squeezeattention",
    "adakv",
    "tailvote",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[Any, float]:
    """(the result, median seconds of ``repeats`` calls after one untimed warm-up call)."""
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _backend_line(backend: str, device: torch.device, seconds: float) -> str:
    if backend == "cpp":
        return (
            f"backend cpp: C++ CPU kernels ready in {seconds:.1f} s (built on the first run, "
            "loaded from the cache after)"
        )
    if backend == "triton":
        return "backend triton: Triton kernels, compiled by the first call (not timed)"
    why = "Triton is not importable" if device.type == "cuda" else "no C++ kernels: see the warning"
    return f"backend torch: vectorised PyTorch ({why})"


def kernel_demo(prompt_len: int, gen_length: int, budget: int, repeats: int) -> str:
    """Part 1: the ops on one random LLaDA-8B-shaped layer; returns the backend that ran."""
    import maskkv_kernels as mk

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, H, D, P, R = 1, 32, 128, prompt_len, gen_length
    threads = torch.get_num_threads()
    where = f"cpu ({threads} thread{'s' * (threads > 1)})" if device.type == "cpu" else device
    print(
        f"[1/2] kernels: one LLaDA-8B layer (32 heads of 128) on {where}, "
        f"{str(dtype).removeprefix('torch.')}\n      prompt {P} tokens, {R} mask queries, "
        f"budget {budget} prompt KV pairs per head"
    )
    t0 = time.perf_counter()
    backend = mk.resolve_backend("auto", device)  # builds or loads the C++ kernels on CPU
    print(_backend_line(backend, device, time.perf_counter() - t0), flush=True)

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, R, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, H, P + R, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, H, P + R, D, device=device, dtype=dtype, generator=g)
    cache, t_select = _timed(
        lambda: mk.select_and_gather(
            q, k, v, budget, prompt_len=P, head_budget="prompt_preference", backend=backend
        ),
        device,
        repeats,
    )
    tail_k, tail_v = k[:, :, P:], v[:, :, P:]
    out, t_attend = _timed(
        lambda: mk.ragged_attention(q, cache, tail_k, tail_v, backend=backend), device, repeats
    )
    _, t_dense = _timed(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, repeats
    )
    print(
        f"warm, median of {repeats} calls: select_and_gather {1e3 * t_select:.1f} ms, "
        f"ragged_attention {1e3 * t_attend:.1f} ms\n      (for scale: dense SDPA over all "
        f"{P + R} keys {1e3 * t_dense:.1f} ms)"
    )
    lengths = cache.lengths()
    full_bytes = 2 * B * H * P * D * k.element_size()
    print(
        f"kept per head: min {int(lengths.min())}, mean {float(lengths.float().mean()):.1f}, "
        f"max {int(lengths.max())} of {P} prompt tokens\nprompt KV {full_bytes / 2**20:.1f} MiB "
        f"-> {cache.nbytes / 2**20:.2f} MiB ({full_bytes / cache.nbytes:.1f}x smaller); output "
        f"{tuple(out.shape)}, {'finite' if bool(torch.isfinite(out).all()) else 'NOT FINITE'}"
    )
    return backend


def _suite_accuracy() -> dict[str, Any] | None:
    """{"accuracy": {method: exact match}, "n", "seconds"} of ``TASK`` at ``BUDGET`` from the
    committed suite results, or None when the file is absent or holds another setting."""
    if not SUITE_RESULTS.is_file():
        return None
    result = json.loads(SUITE_RESULTS.read_text())
    if result["config"].get("prompt_len") != PROMPT_LEN:
        return None
    accuracy = {
        r["method"]: r["accuracy"]
        for r in result["rows"]
        if r["task"] == TASK and r["budget"] in (BUDGET, None)
    }
    n = next((r["n"] for r in result["rows"] if r["task"] == TASK), None)
    return {"accuracy": accuracy, "n": n, "seconds": result["config"].get("seconds")}


def model_demo(example: int = 0, repeats: int = 3) -> None:
    """Part 2: every method on one held-out ``TASK`` question (see the module docstring)."""
    from transformers.utils import logging as hf_logging

    from . import methods
    from .cli_common import resolve_model
    from .generation import generate
    from .quality import evaluate, tasks

    hf_logging.disable_progress_bar()  # the weight-loading bar says nothing at this size
    path = resolve_model(MODEL)
    model = evaluate.load_model(path)
    ids_of_model = tasks.token_ids(model.config)
    ex = tasks.make_examples(TASK, 1, split="test", prompt_len=PROMPT_LEN, start=example)[0]
    prompt = torch.tensor(
        [tasks.encode_prompt(ex, ids_of_model)], device=next(model.parameters()).device
    )
    asked = ex.prompt.rsplit("|", 1)[1]
    print(
        f"[2/2] {MODEL}: the shipped {_millions(model)}M-parameter LLaDA trained on synthetic "
        f"retrieval ({model.config.num_hidden_layers} layers)\nheld-out question: {TASK} "
        f"test-split example {example} (by index, not by outcome), {PROMPT_LEN} tokens,\n"
        f'  {ex.num_pairs} key-value pairs; asked "{asked}", expected {ex.answer} (its pair at '
        f"{ex.depth:.0%} of the prompt)\nbudget {BUDGET} prompt KV pairs per layer and head = "
        f"{BUDGET / PROMPT_LEN:.0%} of the prompt; later step: median over {repeats} runs"
    )
    gen_length = tasks.TASK_GEN_LENGTH[TASK]
    P = prompt.shape[1]

    def answer(method) -> tuple[str, Any]:
        out = generate(
            model,
            prompt,
            method=method,
            gen_length=gen_length,
            block_length=gen_length,
            steps=gen_length,
            **evaluate.sampler_kwargs(model),
        )
        return tasks.parse_answer(out.responses[0].tolist(), ids_of_model.eos), out.stats

    print(f"  {'method':<17} {'answer':<7} {'right':<6} {'prompt KV kept':<15} later step")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", methods.MissingProfileWarning)
        answer(methods.get("maskkv", budget=BUDGET))  # untimed: first-call costs
        for name in METHOD_ORDER:
            budget = {} if name in evaluate.UNBUDGETED else {"budget": BUDGET}
            method = methods.get(name, **budget)
            runs = [answer(method) for _ in range(repeats)]  # greedy: the same answer each run
            text, stats = runs[0]
            later = statistics.median(t for _, s in runs for t in s.step_times[1:])
            if not method.caches_prompt:
                kept = "- (recomputes)"
            else:
                mean = (
                    float(stats.kept_lengths.float().mean())
                    if stats.kept_lengths is not None
                    else P
                )
                kept = f"{mean:.0f} ({mean / P:.1%})"
            print(
                f"  {_display(method):<17} {text or '-':<7} "
                f"{'yes' if text == ex.answer else 'no':<6} {kept:<15} "
                f"{1e3 * later:.1f} ms"
            )

    suite = _suite_accuracy()
    if suite is not None:
        acc = {methods.get(m).name: a for m, a in suite["accuracy"].items()}
        listed = ", ".join(
            f"{_display(methods.get(m))} {acc[m]:.2f}" for m in METHOD_ORDER if m in acc
        )
        where = SUITE_RESULTS.relative_to(SUITE_RESULTS.parents[3])
        print(f"the suite, {suite['n']} held-out {TASK} questions at budget {BUDGET}:")
        print(f"  {listed}\n  ({where})")
    scope = f"5 tasks x {len(methods.available())} methods x 4 budgets x 100 questions"
    if suite is not None and suite.get("seconds"):
        scope += f"; the committed run took {suite['seconds']:.0f} s"
    print(
        f"at {P} tokens a later step of so small a model is mostly fixed cost, so evicting "
        "barely changes it;\n  the speed-up grows with the prompt (maskkv bench)"
    )
    print(f"run the full suite: maskkv eval --model {MODEL}\n  ({scope})")
    print(f"serve the model: maskkv serve --model {MODEL}")


def _millions(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2g}"


def _display(method) -> str:
    """The method's name as the paper writes it (its class name: MaskKV, SnapKV, ...)."""
    return type(method).__name__


def run_demo(args: argparse.Namespace) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        kernel_demo(args.prompt_len, args.gen_length, args.budget, args.repeats)
        print()
        model_demo(args.example, args.repeats)
    finally:
        torch.set_num_threads(threads)


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``maskkv demo`` on an ``argparse`` subparsers object (from ``maskkv.cli``)."""
    from .cli_common import number

    parser = subparsers.add_parser(
        "demo",
        help="the kernels timed on one LLaDA-8B layer, then every method on a held-out question "
        f"to the shipped {MODEL}",
        description="The two ops timed warm on one LLaDA-8B-shaped layer (after building or "
        f"loading the kernels), then every method at budget {BUDGET} answering one held-out "
        f"{TASK} question to the shipped {MODEL}, with the suite's accuracy for scale.",
    )
    positive = number(1, kind=int)
    parser.add_argument("--prompt-len", type=positive, default=4096, help="kernels: prompt tokens")
    parser.add_argument("--gen-length", type=positive, default=256, help="kernels: mask queries")
    parser.add_argument("--budget", type=positive, default=256, help="kernels: KV pairs per head")
    parser.add_argument(
        "--repeats", type=positive, default=5, help="timed calls (runs) per op (method)"
    )
    parser.add_argument(
        "--threads",
        type=positive,
        default=1,
        help="CPU threads (default 1, as the README's CPU tables: on a shared machine other "
        "processes' load makes multi-threaded timings erratic)",
    )
    parser.add_argument(
        "--example",
        type=number(0, kind=int),
        default=0,
        help=f"which {TASK} test-split example the methods answer (default 0, the first)",
    )
    parser.set_defaults(func=run_demo)
    return parser
