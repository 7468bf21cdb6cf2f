"""Accuracy and tokens per step of every cache policy x decoding rule, with MaskKV and FullCache,
on the shipped tiny trained LLaDA and the synthetic passkey tasks (CPU, a few minutes).

    python benchmarks/bench_quality_policies.py [--num-examples 100] [--budget 16]

Each configuration answers the same held-out examples greedily (gen 8 in 2 blocks of 4, 8 steps
for FixedSteps); accuracy is exact match, as in ``maskkv eval``. ``Threshold(0.9)`` reveals as
many tokens per step as the model is confident about, so its row also reports the mean tokens
per step and the number of forward passes (NFE).
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
from maskkv.quality import tasks as task_lib  # noqa: E402
from maskkv.quality.evaluate import DEFAULT_MODEL, load_model  # noqa: E402

POLICIES = {
    "prompt": maskkv.PromptCache(),
    "prefix": maskkv.PrefixCache(),
    "dual": maskkv.DualCache(),
    "dual+refresh": maskkv.DualCache(refresh_prompt=True),
    "dllm(50,5,0.25)": maskkv.DLLMCache(50, 5, 0.25),
}
RULES = {"fixed": maskkv.FixedSteps(), "threshold(0.9)": maskkv.Threshold(0.9)}


def run(model, method, policy, rule, examples, profile, batch_size=25) -> dict:
    correct, tokens, nfe, n_steps = 0, 0.0, 0, 0
    t0 = time.perf_counter()
    for s in range(0, len(examples), batch_size):
        batch = examples[s : s + batch_size]
        ids = torch.tensor([task_lib.encode_prompt(e) for e in batch])
        out = maskkv.generate(
            model, ids, method=method, cache=policy, decoding=rule, gen_length=8,
            block_length=4, steps=8, profile=profile,
        )  # fmt: skip
        for ex, resp in zip(batch, out.responses.tolist()):
            correct += task_lib.parse_answer(resp) == ex.answer
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
    ap.add_argument("--num-examples", type=int, default=100)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(DEFAULT_MODEL, "cpu")
    profile = method_lib.LayerProfile.find(DEFAULT_MODEL)
    methods = {"fullcache": method_lib.FullCache(), "maskkv": method_lib.MaskKV(args.budget)}
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", method_lib.MissingProfileWarning)
        for task in task_lib.TASKS:
            examples = task_lib.make_examples(task, args.num_examples, split="test")
            for mname, method in methods.items():
                for pname, policy in POLICIES.items():
                    for rname, rule in RULES.items():
                        row = dict(task=task, method=mname, budget=getattr(method, "budget", None),
                                   cache=pname, decoding=rname)  # fmt: skip
                        row.update(run(model, method, policy, rule, examples, profile))
                        rows.append(row)
                        print(
                            f"{task} {mname} {pname} {rname}: acc {row['accuracy']:.2f}, "
                            f"{row['mean_tokens_per_step']:.2f} tok/step", flush=True
                        )  # fmt: skip
    common.print_table(
        rows, ["task", "method", "cache", "decoding", "accuracy", "mean_tokens_per_step",
               "nfe_per_batch", "seconds"],
    )  # fmt: skip
    config = dict(
        model=str(DEFAULT_MODEL.name), num_examples=args.num_examples, budget=args.budget,
        gen_length=8, block_length=4, steps=8, threads=args.threads,
    )  # fmt: skip
    path = common.save("quality_policies", torch.device("cpu"), config, rows, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
