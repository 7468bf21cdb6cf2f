"""Accuracy and tokens per step of every cache policy x decoding rule, with MaskKV, TailVote and
FullCache, on a shipped tiny trained model and every synthetic task (CPU, minutes).

    python benchmarks/bench_quality_policies.py [--model tiny-dream-kv] [--budgets 8,16]

Each configuration answers the same held-out examples (at the model's trained prompt length)
greedily, in blocks of 4 tokens (8 answer tokens, 12 for ``multi_needle``; FixedSteps reveals
one per step); accuracy is exact match, as in ``maskkv eval``. ``Threshold(0.9)`` reveals as
many tokens per step as the model is confident about, so its row also reports the mean tokens
per step and the number of forward passes (NFE). Step 1 is the same for every configuration of
a batch and runs once (``FirstPassMemo``; DLLMCache, which keeps block outputs, computes its own).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import maskkv  # noqa: E402
from maskkv import methods as method_lib  # noqa: E402
from maskkv.cli_common import resolve_model  # noqa: E402
from maskkv.generation import FirstPassMemo  # noqa: E402
from maskkv.quality import evaluate  # noqa: E402
from maskkv.quality import tasks as task_lib  # noqa: E402

POLICIES = {
    "prompt": maskkv.PromptCache(),
    "prefix": maskkv.PrefixCache(),
    "dual": maskkv.DualCache(),
    "dual+refresh": maskkv.DualCache(refresh_prompt=True),
    "dllm(50,5,0.25)": maskkv.DLLMCache(50, 5, 0.25),
}
RULES = {"fixed": maskkv.FixedSteps(), "threshold(0.9)": maskkv.Threshold(0.9)}


BLOCK = 4


def run(model, method, policy, rule, examples, profile, memos, batch_size=25) -> dict:
    correct, tokens, nfe, n_steps = 0, 0.0, 0, 0
    ids_of_model = task_lib.token_ids(model.config)
    gen_length = task_lib.TASK_GEN_LENGTH[examples[0].task]
    t0 = time.perf_counter()
    for s in range(0, len(examples), batch_size):
        batch = examples[s : s + batch_size]
        ids = torch.tensor([task_lib.encode_prompt(e, ids_of_model) for e in batch])
        out = maskkv.generate(
            model, ids, method=method, cache=policy, decoding=rule, gen_length=gen_length,
            block_length=BLOCK, steps=gen_length, profile=profile,
            first_pass=memos[s // batch_size], **evaluate.sampler_kwargs(model),
        )  # fmt: skip
        for ex, resp in zip(batch, out.responses.tolist()):
            correct += task_lib.parse_answer(resp, ids_of_model.eos) == ex.answer
        tokens += sum(out.stats.tokens_per_step)
        n_steps += len(out.stats.tokens_per_step)
        nfe += out.stats.nfe
    batches = -(-len(examples) // batch_size)
    return dict(
        accuracy=correct / len(examples),
        mean_tokens_per_step=tokens / max(n_steps, 1),
        nfe_per_batch=nfe / batches,
        seconds=time.perf_counter() - t0,
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=evaluate.DEFAULT_MODEL.name, help="an asset or a directory")
    ap.add_argument("--num-examples", type=int, default=100)
    ap.add_argument("--budgets", default="8,16", help="comma-separated budgets of the evictions")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model = evaluate.load_model(path, "cpu")
    profile = method_lib.LayerProfile.find(path)
    prompt_len = evaluate.trained_max_prompt_len(path) or task_lib.DEFAULT_PROMPT_LEN
    budgets = [int(b) for b in args.budgets.split(",")]
    methods = [method_lib.FullCache()] + [
        cls(b) for b in budgets for cls in (method_lib.MaskKV, method_lib.TailVote)
    ]
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", method_lib.MissingProfileWarning)
        for task in task_lib.TASKS:
            examples = task_lib.make_examples(
                task, args.num_examples, split="test", prompt_len=prompt_len
            )
            memos = [FirstPassMemo() for _ in range(0, len(examples), 25)]
            for method in methods:
                for pname, policy in POLICIES.items():
                    for rname, rule in RULES.items():
                        row = dict(task=task, method=method.name, budget=method.budget,
                                   cache=pname, decoding=rname)  # fmt: skip
                        row.update(run(model, method, policy, rule, examples, profile, memos))
                        rows.append(row)
                        print(
                            f"{task} {method.name} {method.budget} {pname} {rname}: acc "
                            f"{row['accuracy']:.2f}, "
                            f"{row['mean_tokens_per_step']:.2f} tok/step", flush=True
                        )  # fmt: skip
    common.print_table(
        rows, ["task", "method", "budget", "cache", "decoding", "accuracy", "mean_tokens_per_step",
               "nfe_per_batch", "seconds"],
    )  # fmt: skip
    config = dict(
        model=path.name, num_examples=args.num_examples, budgets=budgets,
        prompt_len=prompt_len, gen_length=dict(task_lib.TASK_GEN_LENGTH), block_length=BLOCK,
        steps="= gen_length", threads=args.threads,
        sampler="greedy, confidence order (Dream: maskgit_plus)",
    )  # fmt: skip
    out = common.save(f"quality_policies-{path.name}", torch.device("cpu"), config, rows, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
