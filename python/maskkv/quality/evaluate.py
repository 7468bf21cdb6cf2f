"""Accuracy against KV budget: every method on the synthetic tasks, on a shipped trained model
(tiny-llada-kv, the default, or tiny-dream-kv) or any checkpoint that reads them.

For each task, method and budget, ``maskkv.generate`` answers held-out examples (greedy, LLaDA's
low-confidence remasking, one token revealed per step, so all but the first revealed token are
decoded from the pruned cache; a Dream checkpoint decodes with its own sampler, ``maskgit_plus``
confidence order, and its own BOS / EOS / mask ids) and the answer is scored by exact match.
FullCache (prompt cached, nothing evicted) is the reference every method is compared with
(``relative``: accuracy over FullCache's on the same task); NoCache (everything recomputed every
step) shows what caching itself costs. Response length = steps = the task's ``TASK_GEN_LENGTH`` unless given.

Besides accuracy, each row records **evidence recall**: the fraction of the answer's evidence
tokens (the value or values the answer copies) that the method's first selection kept, per KV head
(``evidence_recall``) and in any KV head of a layer (``evidence_recall_any_head``, also per
layer), averaged over layers and examples. It tests MaskKV's claim directly: do the mask queries
vote for the prompt tokens the answer needs?

    maskkv eval --num-examples 100 --out quality.json            # all methods, budgets 8..64
    python -m maskkv.quality.evaluate --methods maskkv,snapkv --budgets 8,16
    maskkv eval --heatmap --tasks kv_retrieval --budgets 16 --out heatmap.json   # depth x length

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

from ..cli_common import (
    ASSETS,
    CommandParser,
    add_model_argument,
    method_names,
    number,
    torch_device,
)
from ..generation import FirstPassMemo
from . import tasks as task_lib
from .train import _is_block_causal, _is_dream

__all__ = [
    "ASSETS",
    "DEFAULT_BUDGETS",
    "DEFAULT_MODEL",
    "DREAM_MODEL",
    "LLADA2_MODEL",
    "add_eval_parser",
    "evaluate_method",
    "evidence_recall",
    "format_table",
    "check_eval_args",
    "load_model",
    "plot",
    "plot_heatmap",
    "report",
    "run_eval",
    "run_heatmap",
    "sampler_kwargs",
    "save",
]

#: The shipped checkpoints (``maskkv/assets``, trained by ``maskkv.quality.train``).
DEFAULT_MODEL = ASSETS / "tiny-llada-kv"  # LLaDA layout (MHA)
DREAM_MODEL = ASSETS / "tiny-dream-kv"  # Dream layout (GQA, shifted logits)
LLADA2_MODEL = ASSETS / "tiny-llada2-kv"  # LLaDA2 layout (block-causal, MoE)
#: KV pairs kept per head; at the 512-token default prompt 8 / 16 / 24 are 1.6 / 3.1 / 4.7%.
DEFAULT_BUDGETS = (8, 16, 24, 64)
#: Methods whose budget does not matter: evaluated once, drawn as horizontal lines.
UNBUDGETED = ("fullcache", "nocache")


def load_model(path: str | Path = DEFAULT_MODEL, device: str | torch.device | None = None):
    """The checkpoint (LLaDA or Dream) in fp32 on ``device`` (default: CUDA if available, else
    CPU), eval mode. Its BOS / EOS / mask ids (``tasks.token_ids``) must lie after the byte ids
    of the tasks' byte-level text (``ValueError`` otherwise); prompts and answers are encoded
    and parsed with them."""
    from maskkv.models import load_checkpoint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint(path, dtype=torch.float32, device=device).eval()
    try:
        task_lib.token_ids(model.config)
    except ValueError as err:
        raise ValueError(f"model {path}: {err}") from None
    return model


def sampler_kwargs(model) -> dict[str, Any]:
    """Greedy confidence-ordered decoding for either layout: LLaDA's low_confidence remasking
    (``generate``'s default) or, for Dream, ``alg="maskgit_plus"`` (the same rule: reveal the
    masked positions whose argmax token is most probable); Dream's default ``"origin"`` reveals
    positions in random order. Dream keeps its own timestep schedule: with steps = gen_length
    the first step reveals no token (int(n (1 - s/t)) rounds 0.999 down) and the last two."""
    return {"alg": "maskgit_plus"} if _is_dream(model) else {}


def _sampler_description(model) -> str:
    if _is_block_causal(model):
        return (
            "greedy, LLaDA2's official rule (threshold 0.95, at least the step's quota: "
            "block_length / min(32, gen_length) tokens), whole blocks of 32"
        )
    if _is_dream(model):
        return (
            "greedy, Dream maskgit_plus (confidence) order and timestep schedule, one block, "
            "steps = gen_length"
        )
    return "greedy, low_confidence remasking, one block, one token per step"


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
    evidence, or a list of such ranges (several needles). Runs one first denoising step (the one that prunes) through the same ``Denoiser``
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
    kept = [(cache.positions, cache.lengths()) for cache in denoiser.caches]
    return _recalls_from_positions(kept, spans, B, P)


def _evidence_mask(spans, B: int, P: int) -> torch.Tensor:
    evidence = torch.zeros(B, P, dtype=torch.bool)
    for b, row_spans in enumerate(spans):
        if isinstance(row_spans[0], int):  # one span
            row_spans = [row_spans]
        for lo, hi in row_spans:
            evidence[b, lo:hi] = True
    return evidence


def _recalls_from_positions(
    kept: Sequence[tuple[torch.Tensor, torch.Tensor]], spans, B: int, P: int
) -> tuple[list[float], list[float]]:
    """kept: per layer, (positions flattened in segment order b * Hkv + g, lengths [B, Hkv])."""
    evidence = _evidence_mask(spans, B, P)
    count = evidence.sum(1).float()  # [B] evidence tokens per row
    per_head: list[float] = []
    any_head: list[float] = []
    for positions, lengths in kept:
        hkv = lengths.shape[-1]
        lengths = lengths.reshape(-1).long().cpu()  # [B * Hkv], segment b * Hkv + g
        seg = torch.arange(B * hkv).repeat_interleave(lengths)
        row = seg // hkv
        pos = positions.long().cpu()
        inside = evidence[row, pos].float()
        kept_ev = torch.zeros(B * hkv).index_add_(0, seg, inside)  # evidence tokens per head
        per_head.append(float((kept_ev / count.repeat_interleave(hkv)).mean()))
        seen = torch.zeros(B, P, dtype=torch.bool)
        seen[row, pos] = True
        any_head.append(float(((seen & evidence).sum(1) / count).mean()))
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
    first_pass: Sequence[FirstPassMemo] | None = None,
) -> dict[str, Any]:
    """Exact-match accuracy (and digit accuracy, evidence recall) of one method at one budget.

    All examples must have the same prompt length (true for one task at one ``prompt_len``), so
    batches need no padding. first_pass: one ``FirstPassMemo`` per batch, shared by the calls
    that evaluate other methods and budgets on the same examples (``_memos``): step 1's forward
    then runs once per batch, not once per method.
    """
    from maskkv.generation import generate

    method = _method(name, budget)
    device = next(model.parameters()).device
    ids_of_model = task_lib.token_ids(model.config)
    correct = digits = kept_sum = 0.0
    per_example: list[str] = []
    recall_layers: torch.Tensor | None = None  # [2, layers]: sums over rows
    t0 = time.perf_counter()
    for s in range(0, len(examples), batch_size):
        batch = examples[s : s + batch_size]
        ids = torch.tensor([task_lib.encode_prompt(e, ids_of_model) for e in batch], device=device)
        out = generate(
            model,
            ids,
            method=method,
            gen_length=gen_length,
            # LLaDA2 decodes its own blocks (default 32); the others decode the response as one
            block_length=block_length if _is_block_causal(model) else block_length or gen_length,
            steps=steps,
            profile=profile,
            first_pass=None if first_pass is None else first_pass[s // batch_size],
            **sampler_kwargs(model),
        )
        for ex, resp in zip(batch, out.responses.tolist()):
            pred = task_lib.parse_answer(resp, ids_of_model.eos)
            correct += pred == ex.answer
            per_example.append("1" if pred == ex.answer else "0")
            digits += sum(a == b for a, b in zip(pred, ex.answer)) / len(ex.answer)
        if out.stats.kept_lengths is not None:
            kept_sum += float(out.stats.kept_lengths.float().mean()) * len(batch)
        else:
            kept_sum += ids.shape[1] * len(batch)
        if recall:
            spans = [[(lo + 1, hi + 1) for lo, hi in e.spans] for e in batch]  # +1: the BOS
            B, P = ids.shape
            if not method.evicts:
                both = torch.ones(2, len(model.layers))
            else:  # what the generation's own first selection kept (no second pass)
                lengths = out.stats.kept_lengths  # [layers, B, Hkv]
                kept = list(zip(out.stats.first_kept_positions, lengths))
                both = torch.tensor(_recalls_from_positions(kept, spans, B, P))
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
        # Exact match per example, in order ("1" right, "0" wrong): lets a test replay a subset.
        "correct": "".join(per_example),
    }


def _memos(num_examples: int, batch_size: int) -> list[FirstPassMemo]:
    """One step-1 memo per batch of ``evaluate_method`` (they hold each layer's q, k, v of their
    batch: some hundred MB for the tiny models at 512 tokens, freed with the list)."""
    return [FirstPassMemo() for _ in range(0, num_examples, batch_size)]


def trained_max_prompt_len(model_path: str | Path, model=None) -> int | None:
    """The longest prompt the checkpoint was trained on: the curriculum's longest (``max_len``)
    over the rows of its train_log.json (a run exported before its curriculum ended has not seen
    ``max_prompt_len`` yet), else the config's ``max_prompt_len``, else what its position range
    leaves for a 12-token answer, else None."""
    log = Path(model_path) / "train_log.json"
    if log.is_file():
        record = json.loads(log.read_text())
        reached = [row["max_len"] for row in record.get("log", []) if "max_len" in row]
        return int(max(reached)) if reached else int(record["config"]["max_prompt_len"])
    if model is not None and getattr(model.config, "max_sequence_length", None):
        return int(model.config.max_sequence_length) - 12
    return None


def check_eval_args(
    *,
    model_path: str | Path | None = None,
    task_names: Sequence[str] = (),
    prompt_len: int | None = None,
    budgets: Sequence[int] = (),
    num_examples: int = 1,
    max_prompt_len: int | None = None,
) -> None:
    """``ValueError`` naming the argument for an unknown task, a prompt length outside
    [the task's minimum, the model's trained maximum], a budget <= 0, or a checkpoint directory
    that does not exist."""
    if model_path is not None and not Path(model_path).is_dir():
        raise ValueError(f"model: checkpoint directory {str(model_path)!r} does not exist")
    for task in task_names:
        if task not in task_lib.TASKS:
            raise ValueError(
                f"tasks: unknown task {task!r}; expected one of {', '.join(task_lib.TASKS)}"
            )
    if prompt_len is not None:
        low = max((task_lib.TASK_MIN_PROMPT_LEN[t] for t in task_names), default=1)
        if prompt_len < low:
            worst = max(task_names, key=task_lib.TASK_MIN_PROMPT_LEN.__getitem__)
            raise ValueError(f"prompt_len: {worst} needs >= {low} tokens, got {prompt_len}")
        if max_prompt_len is not None and prompt_len > max_prompt_len:
            raise ValueError(
                f"prompt_len: the model was trained on prompts up to {max_prompt_len} tokens, "
                f"got {prompt_len}"
            )
    for b in budgets:
        if not isinstance(b, int) or b <= 0:
            raise ValueError(f"budgets: expected positive ints (KV pairs per head), got {b!r}")
    if num_examples <= 0:
        raise ValueError(f"num_examples: expected > 0, got {num_examples}")


def _setup(model, model_path, methods):
    from maskkv import methods as method_lib

    if model is None:
        check_eval_args(model_path=model_path)
        model = load_model(model_path)
    model_path = getattr(model, "name_or_path", None) or str(model_path)
    profile = method_lib.LayerProfile.find(model_path)
    canonical = [method_lib.get(m).name for m in (methods or method_lib.available())]
    return model, str(model_path), profile, canonical


def _base_config(model, model_path, profile, **extra) -> dict[str, Any]:
    return {
        "model": model_path,
        "profile": None if profile is None else profile.importance,
        **extra,
        "sampler": _sampler_description(model),
        "split": "test",
        "device": str(next(model.parameters()).device),
        "torch": torch.__version__,
        "python": platform.python_version(),
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
    gen_length: int | None = None,
    batch_size: int = 25,
    recall: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Every (task, method, budget) on ``num_examples`` held-out examples per task.

    gen_length: response tokens (= denoising steps, one block); default the task's
    ``TASK_GEN_LENGTH``. Returns ``{"config": ..., "rows": [...], "summary": [...]}``: one row
    per (task, method, budget), with ``relative`` = accuracy / FullCache's on that task (None
    when FullCache was not run or scored 0), and one summary row per (method, budget) averaged
    over tasks (``retrieval_accuracy``: over the question-routed tasks only). FullCache and
    NoCache run once, with ``budget`` None.
    """
    from tqdm.auto import tqdm

    from maskkv import methods as method_lib

    task_names = list(task_names or task_lib.TASKS)
    budgets = list(budgets)
    model, model_path, profile, canonical = _setup(model, model_path, methods)
    check_eval_args(
        task_names=task_names,
        prompt_len=prompt_len,
        budgets=budgets,
        num_examples=num_examples,
        max_prompt_len=trained_max_prompt_len(model_path, model),
    )
    runs = [(m, None) if m in UNBUDGETED else (m, b) for m in canonical for b in budgets]
    runs = list(dict.fromkeys(runs))  # unbudgeted methods once
    rows: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(runs) * len(task_names), desc="evaluating", unit="run", disable=not progress
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # Without a profile MaskKV / SqueezeAttention fall back to uniform budgets; the warning
        # says so once, the config records whether a profile was used.
        warnings.simplefilter("ignore", method_lib.MissingProfileWarning)
        for task in task_names:
            examples = task_lib.make_examples(
                task, num_examples, split="test", prompt_len=prompt_len
            )
            length = gen_length or task_lib.TASK_GEN_LENGTH[task]
            memos = _memos(len(examples), batch_size)
            task_rows = []
            for name, budget in runs:
                bar.set_postfix_str(f"{task} {name} {budget or ''}")
                row = evaluate_method(
                    model,
                    name,
                    budget,
                    examples,
                    gen_length=length,
                    steps=length,
                    batch_size=batch_size,
                    profile=profile,
                    recall=recall,
                    first_pass=memos,
                )
                task_rows.append({"task": task, "gen_length": length, **row})
                bar.update()
            full = next((r["accuracy"] for r in task_rows if r["method"] == "fullcache"), None)
            for r in task_rows:
                r["relative"] = r["accuracy"] / full if full else None
                r["budget_fraction"] = None if r["budget"] is None else r["budget"] / prompt_len
            rows.extend(task_rows)
    bar.close()
    config = _base_config(
        model,
        model_path,
        profile,
        methods=canonical,
        budgets=budgets,
        budget_fractions=[b / prompt_len for b in budgets],
        tasks=task_names,
        num_examples=num_examples,
        prompt_len=prompt_len,
        gen_length={t: gen_length or task_lib.TASK_GEN_LENGTH[t] for t in task_names},
        seconds=time.perf_counter() - t0,
    )
    return {"config": config, "rows": rows, "summary": summarize(rows)}


def run_heatmap(
    model=None,
    *,
    model_path: str | Path = DEFAULT_MODEL,
    methods: Sequence[str] | None = None,
    budget: int = 16,
    task: str = "kv_retrieval",
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    prompt_lens: Sequence[int] = (256, 384, 512),
    num_examples: int = 20,
    batch_size: int = 25,
    progress: bool = True,
) -> dict[str, Any]:
    """The depth x length sweep (the paper's needle-in-a-haystack heatmap) at one budget:
    exact match and evidence recall (any head) per (method, depth, prompt_len) on
    ``num_examples`` held-out examples per cell (``tasks.depth_length_grid``)."""
    from tqdm.auto import tqdm

    from maskkv import methods as method_lib

    model, model_path, profile, canonical = _setup(model, model_path, methods)
    check_eval_args(
        task_names=[task],
        budgets=[budget],
        num_examples=num_examples,
        max_prompt_len=None,
    )
    top = trained_max_prompt_len(model_path, model)
    for n in prompt_lens:
        check_eval_args(task_names=[task], prompt_len=n, max_prompt_len=top)
    grid = task_lib.depth_length_grid(task, num_examples, depths, prompt_lens)
    length = task_lib.TASK_GEN_LENGTH[task]
    cells = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(canonical) * len(grid), desc="heatmap", disable=not progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", method_lib.MissingProfileWarning)
        for (depth, n), examples in grid.items():
            memos = _memos(len(examples), batch_size)
            for name in canonical:
                row = evaluate_method(
                    model,
                    name,
                    None if name in UNBUDGETED else budget,
                    examples,
                    gen_length=length,
                    steps=length,
                    batch_size=batch_size,
                    profile=profile,
                    first_pass=memos,
                )
                cells.append(
                    {
                        "method": name,
                        "depth": depth,
                        "prompt_len": n,
                        "accuracy": row["accuracy"],
                        "evidence_recall_any_head": row["evidence_recall_any_head"],
                    }
                )
                bar.update()
    bar.close()
    cells.sort(key=lambda c: canonical.index(c["method"]))  # method by method, grid order within
    config = _base_config(
        model,
        model_path,
        profile,
        methods=canonical,
        budget=budget,
        task=task,
        depths=list(depths),
        prompt_lens=list(prompt_lens),
        num_examples=num_examples,
        gen_length=length,
        seconds=time.perf_counter() - t0,
    )
    return {"config": config, "cells": cells}


def plot_heatmap(result: dict[str, Any], path: str | Path) -> Path:
    """PNG: one panel per method, exact match per (depth, prompt length) cell (paper Fig. 8
    style: depth down, length across, green = retrieved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    depths, lens, names = cfg["depths"], cfg["prompt_lens"], cfg["methods"]
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 3.0 * rows + 0.4), squeeze=False, layout="constrained"
    )
    acc = {(c["method"], c["depth"], c["prompt_len"]): c["accuracy"] for c in result["cells"]}
    for k, name in enumerate(names):
        ax = axes[k // cols][k % cols]
        grid = [[acc[(name, d, n)] for n in lens] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        mean = sum(map(sum, grid)) / (len(depths) * len(lens))
        ax.set_title(f"{name} (mean {mean:.2f})", fontsize=9)
        ax.set_xticks(range(len(lens)), [str(n) for n in lens], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_xlabel("prompt tokens", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
    for k in range(len(names), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="exact match")
    fig.suptitle(
        f"{Path(cfg['model']).name}: {cfg['task']}, budget {cfg['budget']} KV pairs per head, "
        f"{cfg['num_examples']} held-out examples per cell",
        fontsize=10,
    )
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, budget): accuracy and evidence recalls averaged over tasks (per head, in any
    head of a layer averaged over layers, and in any head of the last layer), and accuracy
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
        routed = [r for r in rs if r["task"] in task_lib.RETRIEVAL_TASKS]
        per_layer = [r.get("evidence_recall_any_head_per_layer") for r in rs]
        last = [layers[-1] for layers in per_layer if layers]
        out.append(
            {
                "method": method,
                "budget": budget,
                "accuracy": acc,
                "retrieval_accuracy": mean(routed, "accuracy"),
                "relative": acc / full_acc if full_acc else None,
                "evidence_recall": mean(rs, "evidence_recall"),
                "evidence_recall_any_head": mean(rs, "evidence_recall_any_head"),
                "evidence_recall_last_layer": sum(last) / len(last) if last else None,
                "per_task": {r["task"]: r["accuracy"] for r in rs},
            }
        )
    return out


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table: accuracy per task, mean, relative to FullCache, evidence recall per head,
    in any head of a layer and in any head of the last layer (``maskkv.tables.format_rows``, as
    ``maskkv bench``)."""
    from ..tables import format_rows

    task_names = result["config"]["tasks"]
    rows = [{**s, **{f"task:{t}": s["per_task"][t] for t in task_names}} for s in result["summary"]]
    columns = [
        ("method", "method", None),
        ("budget", "budget", None),
        *((t, f"task:{t}", ".2f") for t in task_names),
        ("mean", "accuracy", ".3f"),
        ("rel.full", "relative", ".3f"),
        ("recall", "evidence_recall", ".3f"),
        ("recall.any", "evidence_recall_any_head", ".3f"),
        ("recall.last", "evidence_recall_last_layer", ".3f"),
    ]
    return format_rows(rows, columns)


def save(result: dict[str, Any], path: str | Path, env: dict[str, Any] | None = None) -> Path:
    """Write the result as JSON (``env`` adds the environment record of the benchmarks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"env": env, **result} if env is not None else result
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """PNG: accuracy (top) and evidence recall in any head of the last layer (bottom) against
    budget, one column per task plus the mean; FullCache and NoCache as horizontal lines.

    The last layer's recall, not the layer average: on the shipped models the answer reads the
    value there, and it separates the methods best; the layer average hides it (the JSON holds
    every layer, ``evidence_recall_any_head_per_layer``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    columns = [*cfg["tasks"], "mean"]
    budgets = cfg["budgets"]
    fig, axes = plt.subplots(2, len(columns), figsize=(4 * len(columns), 7.5), squeeze=False)

    def value(row: dict[str, Any], key: str) -> float | None:
        if key != "last_layer":
            return row[key]
        per_layer = row.get("evidence_recall_any_head_per_layer")
        return per_layer[-1] if per_layer else None

    def series(method: str, task: str, key: str) -> list[float | None]:
        rows = [r for r in result["rows"] if r["method"] == method]
        if task == "mean":  # over tasks
            vals: dict[int | None, float | None] = {}
            for b in {r["budget"] for r in rows}:
                got = [value(r, key) for r in rows if r["budget"] == b]
                vals[b] = None if None in got else sum(got) / len(got)
        else:
            vals = {r["budget"]: value(r, key) for r in rows if r["task"] == task}
        if None in vals:  # unbudgeted: flat
            return [vals[None]] * len(budgets)
        return [vals.get(b) for b in budgets]

    styles = {"fullcache": ("k", "--"), "nocache": ("0.5", ":")}
    for col, task in enumerate(columns):
        for row, key in enumerate(("accuracy", "last_layer")):
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
                    "exact-match accuracy" if row == 0 else "evidence kept, last layer (any head)"
                )
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(
        f"{Path(cfg['model']).name} on synthetic retrieval, {cfg['num_examples']} held-out "
        "examples per task"
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

    add_model_argument(parser, default=DEFAULT_MODEL.name)
    parser.add_argument(
        "--methods",
        type=method_names,
        default=method_lib.available(),
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
        default=None,
        help="prompt tokens per example (BOS included; default: the longest the model was "
        f"trained on, else {task_lib.DEFAULT_PROMPT_LEN})",
    )
    parser.add_argument(
        "--gen-length",
        type=int,
        default=None,
        help="response tokens = denoising steps (default: each task's own)",
    )
    parser.add_argument("--batch-size", type=number(1, kind=int), default=25)
    parser.add_argument(
        "--heatmap",
        action="store_true",
        help="run the depth x length sweep instead (first task, first budget, "
        "--heatmap-lengths, --heatmap-depths)",
    )
    parser.add_argument("--heatmap-lengths", default="256,384,512")
    parser.add_argument("--heatmap-depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument(
        "--device", type=torch_device, default=None, help="default: cuda if available, else cpu"
    )
    parser.add_argument(
        "--threads", type=number(1, kind=int), default=None, help="torch CPU threads"
    )
    parser.add_argument("--no-recall", action="store_true", help="skip evidence recall")
    parser.add_argument(
        "--out", default=None, help="JSON file to write (a PNG of the same name goes next to it)"
    )
    parser.add_argument("--no-plot", action="store_true")


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from None


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation the parsed options describe (all arguments are checked before the
    model is loaded)."""
    task_names = [t for t in args.tasks.split(",") if t]
    budgets = _ints(args.budgets, "budgets")
    if args.prompt_len is None and Path(args.model).is_dir():
        args.prompt_len = trained_max_prompt_len(args.model) or task_lib.DEFAULT_PROMPT_LEN
    check_eval_args(
        model_path=args.model,
        task_names=task_names,
        prompt_len=None if args.heatmap else args.prompt_len,
        budgets=budgets,
        num_examples=args.num_examples,
        max_prompt_len=trained_max_prompt_len(args.model),
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, args.device)
    methods = args.methods
    if args.heatmap:
        return run_heatmap(
            model,
            model_path=args.model,
            methods=methods,
            budget=budgets[0],
            task=task_names[0],
            depths=[float(d) for d in args.heatmap_depths.split(",")],
            prompt_lens=_ints(args.heatmap_lengths, "heatmap_lengths"),
            num_examples=args.num_examples,
            batch_size=args.batch_size,
        )
    return run_eval(
        model,
        model_path=args.model,
        methods=methods,
        budgets=budgets,
        task_names=task_names,
        num_examples=args.num_examples,
        prompt_len=args.prompt_len,
        gen_length=args.gen_length,
        batch_size=args.batch_size,
        recall=not args.no_recall,
    )


def format_heatmap(result: dict[str, Any]) -> str:
    """Plain text: per method, the mean exact match over the sweep and per prompt length."""
    cfg = result["config"]
    lines = [f"{'method':>16}  mean  " + "  ".join(f"P={n}" for n in cfg["prompt_lens"])]
    for name in cfg["methods"]:
        cells = [c for c in result["cells"] if c["method"] == name]
        per_len = [
            sum(c["accuracy"] for c in cells if c["prompt_len"] == n) / len(cfg["depths"])
            for n in cfg["prompt_lens"]
        ]
        mean = sum(c["accuracy"] for c in cells) / len(cells)
        lines.append(f"{name:>16}  {mean:.2f}  " + "  ".join(f"{v:5.2f}" for v in per_len))
    return "\n".join(lines)


def report(result: dict[str, Any], out: str | Path | None, plot_png: bool = True) -> None:
    """Print the table; write JSON (and the PNG next to it) when ``out`` is given."""
    heat = "cells" in result
    print(format_heatmap(result) if heat else format_table(result))
    if out:
        path = save(result, out)
        print(f"wrote {path}")
        if plot_png:
            png = path.with_suffix(".png")
            print(f"wrote {plot_heatmap(result, png) if heat else plot(result, png)}")


def _cli(args: argparse.Namespace) -> None:
    # Bad input (a ValueError naming the argument) ends as one line: maskkv.cli_common.
    report(run_from_args(args), args.out, not args.no_plot)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``maskkv eval`` on an ``argparse`` subparsers object (from ``maskkv.cli``)."""
    parser = subparsers.add_parser(
        "eval",
        help="quality: accuracy against KV budget on a shipped trained model "
        f"({DEFAULT_MODEL.name}, {DREAM_MODEL.name}) or a checkpoint",
        description=__doc__.split("\n\n")[0],
    )
    add_eval_arguments(parser)
    parser.set_defaults(func=_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(description=__doc__.split("\n\n")[0])
    add_eval_arguments(parser)
    parser.set_defaults(func=_cli)
    return parser.run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
