"""Accuracy against KV budget: every method on the committed tiny LLaDA and the synthetic tasks.

For each task, method and budget, ``maskkv.generate`` answers held-out examples (greedy, LLaDA's
low-confidence remasking, one token revealed per step, so all but the first revealed token are
decoded from the pruned cache) and the answer is scored by exact match. FullCache (prompt cached,
nothing evicted) is the reference every method is compared with; NoCache (everything recomputed
every step) shows what caching itself costs.

Besides accuracy, each row records **evidence recall**: the fraction of the answer's evidence
tokens (the code the answer copies) that the method kept in the first-step cache, per KV head
(``evidence_recall``) and in any KV head of a layer (``evidence_recall_any_head``, also per
layer), averaged over layers and examples. It tests MaskKV's claim directly: do the mask queries
vote for the prompt tokens the answer needs?

    maskkv eval --num-examples 100 --out quality.json            # all methods, budgets 8..64
    python -m maskkv.quality.evaluate --methods maskkv,snapkv --budgets 8,16

>>> from maskkv.quality.evaluate import run_eval
>>> result = run_eval(num_examples=20, methods=["fullcache", "maskkv"], budgets=[16])  # doctest: +SKIP
>>> print(format_table(result))                                                        # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import tasks as task_lib

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_MODEL",
    "add_eval_parser",
    "evaluate_method",
    "evidence_recall",
    "format_table",
    "load_model",
    "plot",
    "run_eval",
    "save",
]

#: The committed checkpoint (trained by ``maskkv.quality.train``; see its README.md).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-llada-retrieval"
DEFAULT_BUDGETS = (8, 16, 32, 64)
#: Methods whose budget does not matter: evaluated once, drawn as horizontal lines.
UNBUDGETED = ("fullcache", "nocache")


def load_model(path: str | Path = DEFAULT_MODEL, device: str | torch.device | None = None):
    """The checkpoint in fp32 on ``device`` (default: CUDA if available, else CPU), eval mode."""
    from maskkv.models import load_checkpoint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint(path, dtype=torch.float32, device=device).eval()
    if (
        model.config.mask_token_id != task_lib.MASK_ID
        or model.config.eos_token_id != task_lib.EOS_ID
    ):
        raise ValueError(
            f"model {path}: mask/eos ids {model.config.mask_token_id}/"
            f"{model.config.eos_token_id} differ from the task tokenizer's "
            f"{task_lib.MASK_ID}/{task_lib.EOS_ID}"
        )
    return model


def _method(name: str, budget: int | None):
    from maskkv import methods

    return methods.get(name) if budget is None else methods.get(name, budget=budget)


@torch.no_grad()
def evidence_recall(
    model,
    method,
    input_ids: torch.Tensor,
    spans: Sequence[tuple[int, int]],
    gen_length: int,
    profile=None,
    *,
    any_head: bool = False,
) -> float:
    """Fraction of evidence tokens kept by ``method``'s first-step selection.

    input_ids: [B, P] prompts (no padding); spans: per row, the [start, end) token range of the
    evidence. Runs one first denoising step (the one that prunes) through the same ``Denoiser``
    that ``maskkv.generate`` uses and reads the kept positions of every layer's cache.
    any_head=False: averaged over layers, KV heads and rows (how much of the evidence a head
    keeps). any_head=True: a token counts as kept in a layer when at least one KV head of the
    layer keeps it; averaged over layers and rows (is the evidence still readable in the layer).
    """
    per_head, any_layer = _evidence_recalls(model, method, input_ids, spans, gen_length, profile)
    values = any_layer if any_head else per_head
    return sum(values) / len(values)


def _evidence_recalls(
    model, method, input_ids, spans, gen_length, profile
) -> tuple[list[float], list[float]]:
    """Per layer: (recall averaged over heads and rows, any-head recall averaged over rows); see
    ``evidence_recall``."""
    from maskkv.generation.engine import Denoiser

    if not method.evicts:
        layers = len(model.layers)
        return [1.0] * layers, [1.0] * layers
    B, P = input_ids.shape
    mask = torch.full((B, gen_length), model.config.mask_token_id, device=input_ids.device)
    x = torch.cat([input_ids, mask], 1)
    denoiser = Denoiser(model, method, P, profile=profile)
    with torch.no_grad():
        denoiser(x, torch.ones(B, gen_length, dtype=torch.bool, device=x.device))
    lo = torch.tensor([s[0] for s in spans])
    hi = torch.tensor([s[1] for s in spans])
    evidence = torch.zeros(B, P, dtype=torch.bool)
    for b in range(B):
        evidence[b, lo[b] : hi[b]] = True
    per_head: list[float] = []
    any_head: list[float] = []
    for cache in denoiser.caches:
        hkv = cache.num_kv_heads
        lengths = cache.lengths().reshape(-1).long().cpu()  # [B * Hkv], segment b * Hkv + g
        seg = torch.arange(B * hkv).repeat_interleave(lengths)
        row = seg // hkv
        pos = cache.positions.long().cpu()
        inside = evidence[row, pos].float()
        kept = torch.zeros(B * hkv).index_add_(0, seg, inside)  # evidence tokens per head
        per_head.append(float((kept / (hi - lo).repeat_interleave(hkv)).mean()))
        seen = torch.zeros(B, P, dtype=torch.bool)
        seen[row, pos] = True
        any_head.append(float(((seen & evidence).sum(1) / (hi - lo)).mean()))
    return per_head, any_head


def evaluate_method(
    model,
    name: str,
    budget: int | None,
    examples: Sequence[task_lib.Example],
    *,
    gen_length: int = 8,
    steps: int = 8,
    block_length: int | None = None,
    batch_size: int = 25,
    profile=None,
    recall: bool = True,
) -> dict[str, Any]:
    """Exact-match accuracy (and digit accuracy, evidence recall) of one method at one budget.

    All examples must have the same prompt length (true for one task at one ``prompt_len``), so
    batches need no padding.
    """
    from maskkv.generation import generate

    method = _method(name, budget)
    device = next(model.parameters()).device
    correct = digits = kept_sum = 0.0
    recall_layers: torch.Tensor | None = None  # [2, layers]: sums over rows
    t0 = time.perf_counter()
    for s in range(0, len(examples), batch_size):
        batch = examples[s : s + batch_size]
        ids = torch.tensor([task_lib.encode_prompt(e) for e in batch], device=device)
        out = generate(
            model,
            ids,
            method=method,
            gen_length=gen_length,
            block_length=block_length or gen_length,
            steps=steps,
            profile=profile,
        )
        for ex, resp in zip(batch, out.responses.tolist()):
            pred = task_lib.parse_answer(resp)
            correct += pred == ex.answer
            digits += sum(a == b for a, b in zip(pred, ex.answer)) / len(ex.answer)
        if out.stats.kept_lengths is not None:
            kept_sum += float(out.stats.kept_lengths.float().mean()) * len(batch)
        else:
            kept_sum += ids.shape[1] * len(batch)
        if recall:
            spans = [(e.evidence[0] + 1, e.evidence[1] + 1) for e in batch]  # +1: the BOS
            both = torch.tensor(_evidence_recalls(model, method, ids, spans, gen_length, profile))
            recall_layers = both * len(batch) + (0 if recall_layers is None else recall_layers)
    n = len(examples)
    rec = None if recall_layers is None else recall_layers / n
    return {
        "method": method.name,
        "budget": budget,
        "n": n,
        "accuracy": correct / n,
        "digit_accuracy": digits / n,
        "evidence_recall": None if rec is None else float(rec[0].mean()),
        "evidence_recall_any_head": None if rec is None else float(rec[1].mean()),
        "evidence_recall_any_head_per_layer": None if rec is None else rec[1].tolist(),
        "kept_per_head": kept_sum / n,
        "seconds": time.perf_counter() - t0,
    }


def run_eval(
    model=None,
    *,
    model_path: str | Path = DEFAULT_MODEL,
    methods: Sequence[str] | None = None,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    task_names: Sequence[str] | None = None,
    num_examples: int = 100,
    prompt_len: int = task_lib.DEFAULT_PROMPT_LEN,
    gen_length: int = 8,
    steps: int = 8,
    batch_size: int = 25,
    recall: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Every (task, method, budget) on ``num_examples`` held-out examples per task.

    Returns ``{"config": ..., "rows": [...], "summary": [...]}``: one row per (task, method,
    budget) and one summary row per (method, budget) with the accuracy averaged over tasks and
    relative to FullCache's (``relative``; ``None`` when FullCache was not run or scored 0).
    FullCache and NoCache run once, with ``budget`` None.
    """
    from tqdm.auto import tqdm

    from maskkv import methods as method_lib

    if model is None:
        model = load_model(model_path)
    model_path = getattr(model, "name_or_path", None) or str(model_path)
    profile = method_lib.LayerProfile.find(model_path)
    methods = list(methods or method_lib.available())
    task_names = list(task_names or task_lib.TASKS)
    canonical = [method_lib.get(m).name for m in methods]
    runs = [(m, None) if m in UNBUDGETED else (m, b) for m in canonical for b in budgets]
    runs = list(dict.fromkeys(runs))  # unbudgeted methods once
    rows: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(runs) * len(task_names), desc="evaluating", unit="run", disable=not progress
    )
    with warnings.catch_warnings():
        # Without a profile MaskKV / SqueezeAttention fall back to uniform budgets; the warning
        # says so once, the config records whether a profile was used.
        warnings.simplefilter("ignore", method_lib.MissingProfileWarning)
        for task in task_names:
            examples = task_lib.make_examples(
                task, num_examples, split="test", prompt_len=prompt_len
            )
            for name, budget in runs:
                bar.set_postfix_str(f"{task} {name} {budget or ''}")
                row = evaluate_method(
                    model,
                    name,
                    budget,
                    examples,
                    gen_length=gen_length,
                    steps=steps,
                    batch_size=batch_size,
                    profile=profile,
                    recall=recall,
                )
                rows.append({"task": task, **row})
                bar.update()
    bar.close()
    config = {
        "model": str(model_path),
        "profile": None if profile is None else profile.importance,
        "methods": canonical,
        "budgets": list(budgets),
        "tasks": task_names,
        "num_examples": num_examples,
        "prompt_len": prompt_len,
        "gen_length": gen_length,
        "steps": steps,
        "block_length": gen_length,
        "sampler": "greedy, low_confidence remasking",
        "split": "test",
        "device": str(next(model.parameters()).device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return {"config": config, "rows": rows, "summary": summarize(rows)}


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, budget): accuracy and evidence recalls averaged over tasks, and accuracy
    relative to FullCache's average (``relative``; None without a FullCache row or when it
    scored 0)."""
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    full = groups.get(("fullcache", None))
    full_acc = sum(r["accuracy"] for r in full) / len(full) if full else None

    def mean(rs: list[dict[str, Any]], key: str) -> float | None:
        vals = [r[key] for r in rs if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    out = []
    for (method, budget), rs in groups.items():
        acc = mean(rs, "accuracy")
        out.append(
            {
                "method": method,
                "budget": budget,
                "accuracy": acc,
                "relative": acc / full_acc if full_acc else None,
                "evidence_recall": mean(rs, "evidence_recall"),
                "evidence_recall_any_head": mean(rs, "evidence_recall_any_head"),
                "per_task": {r["task"]: r["accuracy"] for r in rs},
            }
        )
    return out


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table: accuracy per task, mean, relative to FullCache, evidence recall per head
    and in any head of the layer."""
    task_names = result["config"]["tasks"]
    head = ["method", "budget", *task_names, "mean", "rel.full", "recall", "recall.any"]
    fmt3 = lambda x: "-" if x is None else f"{x:.3f}"
    lines = []
    for s in result["summary"]:
        lines.append(
            [
                s["method"],
                "-" if s["budget"] is None else str(s["budget"]),
                *(f"{s['per_task'][t]:.2f}" for t in task_names),
                fmt3(s["accuracy"]),
                fmt3(s["relative"]),
                fmt3(s["evidence_recall"]),
                fmt3(s["evidence_recall_any_head"]),
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
    return "\n".join([fmt(head), *(fmt(r) for r in lines)])


def save(result: dict[str, Any], path: str | Path, env: dict[str, Any] | None = None) -> Path:
    """Write the result as JSON (``env`` adds the environment record of the benchmarks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"env": env, **result} if env is not None else result
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """PNG: accuracy (top) and evidence recall in any head of the layer (bottom) against budget,
    one column per task plus the mean; FullCache and NoCache as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    columns = [*cfg["tasks"], "mean"]
    budgets = cfg["budgets"]
    fig, axes = plt.subplots(2, len(columns), figsize=(4 * len(columns), 7.5), squeeze=False)

    def series(method: str, task: str, key: str) -> list[float | None]:
        if task == "mean":
            by_budget = {s["budget"]: s for s in result["summary"] if s["method"] == method}
            vals = {b: s[key] for b, s in by_budget.items()}
        else:
            vals = {
                r["budget"]: r[key]
                for r in result["rows"]
                if r["method"] == method and r["task"] == task
            }
        if None in vals:  # unbudgeted: flat
            return [vals[None]] * len(budgets)
        return [vals.get(b) for b in budgets]

    styles = {"fullcache": ("k", "--"), "nocache": ("0.5", ":")}
    for col, task in enumerate(columns):
        for row, key in enumerate(("accuracy", "evidence_recall_any_head")):
            ax = axes[row][col]
            for method in cfg["methods"]:
                ys = series(method, task, key)
                color, ls = styles.get(method, (None, "-"))
                marker = None if method in UNBUDGETED else "o"
                # Reference lines under the methods' markers (MaskKV may sit on FullCache's line).
                zorder = 1 if method in UNBUDGETED else 2
                ax.plot(
                    budgets,
                    ys,
                    label=method,
                    color=color,
                    linestyle=ls,
                    marker=marker,
                    zorder=zorder,
                )
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{task} (P={cfg['prompt_len']})" if task != "mean" else "mean")
            if row == 1:
                ax.set_xlabel("budget (prompt KV pairs per layer and KV head)")
            if col == 0:
                ax.set_ylabel(
                    "exact-match accuracy" if row == 0 else "evidence kept (any head of a layer)"
                )
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(
        f"tiny LLaDA on synthetic retrieval, {cfg['num_examples']} held-out examples per task"
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------- CLI


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``maskkv eval`` (shared with ``benchmarks/bench_quality.py``)."""
    from maskkv import methods as method_lib

    parser.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="checkpoint (default: the committed asset)"
    )
    parser.add_argument(
        "--methods",
        default=",".join(method_lib.available()),
        help="comma-separated method names (default: all)",
    )
    parser.add_argument(
        "--budgets",
        default=",".join(map(str, DEFAULT_BUDGETS)),
        help="comma-separated budgets: prompt KV pairs kept per layer and KV head",
    )
    parser.add_argument("--tasks", default=",".join(task_lib.TASKS), help="comma-separated tasks")
    parser.add_argument("--num-examples", type=int, default=100, help="held-out examples per task")
    parser.add_argument(
        "--prompt-len",
        type=int,
        default=task_lib.DEFAULT_PROMPT_LEN,
        help="prompt tokens per example (BOS included)",
    )
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-recall", action="store_true", help="skip evidence recall")
    parser.add_argument(
        "--out", default=None, help="JSON file to write (a PNG of the same name goes next to it)"
    )
    parser.add_argument("--no-plot", action="store_true")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation the parsed options describe."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, args.device)
    return run_eval(
        model,
        model_path=args.model,
        methods=[m for m in args.methods.split(",") if m],
        budgets=[int(b) for b in args.budgets.split(",") if b],
        task_names=[t for t in args.tasks.split(",") if t],
        num_examples=args.num_examples,
        prompt_len=args.prompt_len,
        batch_size=args.batch_size,
        recall=not args.no_recall,
    )


def _cli(args: argparse.Namespace) -> None:
    result = run_from_args(args)
    print(format_table(result))
    if args.out:
        path = save(result, args.out)
        print(f"wrote {path}")
        if not args.no_plot:
            print(f"wrote {plot(result, path.with_suffix('.png'))}")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``maskkv eval`` on an ``argparse`` subparsers object (from ``maskkv.cli``)."""
    parser = subparsers.add_parser(
        "eval",
        help="quality: accuracy against KV budget on the tiny trained LLaDA",
        description=__doc__.split("\n\n")[0],
    )
    add_eval_arguments(parser)
    parser.set_defaults(func=_cli)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_eval_arguments(parser)
    _cli(parser.parse_args(argv))


if __name__ == "__main__":
    main()
