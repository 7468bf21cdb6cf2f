"""The "induction format" A/B run of TRAINING.md: `python -m maskkv.quality.train` with the
key-value tasks rewritten so that pairs read "foxK4$. " and the question "?fox" comes right
before the answer. The answer then continues the key exactly as each value does in its pair, and
the lookup is plain n-gram induction. Not part of the package: it patches the task generator
(``tasks._kv``) and the kv_recall batch builder of this checkout at start-up, and asserts that
each patch applied. Same command-line options as maskkv.quality.train."""

import inspect
import re
import sys

from maskkv.quality import tasks, train


def _patched(fn, replacements: list[tuple[str, str]], namespace: dict):
    """``fn`` recompiled from its source with ``replacements`` applied (each must match)."""
    src = inspect.getsource(fn)
    for old, new in replacements:
        assert old in src, f"{fn.__name__}: {old!r} not found"
        src = src.replace(old, new)
    exec(src, namespace)
    return namespace[fn.__name__]


tasks._kv = _patched(
    tasks._kv,
    [
        ('",".join(keys[i] for i in asked) + "?"', '"?" + ",".join(keys[i] for i in asked)'),
        ('f"{k} {c}. "', 'f"{k}{c}. "'),
        ("starts[pair] = len(text) + 4", "starts[pair] = len(text) + 3"),
    ],
    dict(vars(tasks)),
)
train._PAIR = re.compile(r"([a-z]{3})([A-Z][0-9][!#$%&*+@^~])\. ")
train._recall_batch = _patched(
    train._recall_batch,
    [('f"{key} {value}. "', 'f"{key}{value}. "'), ("[False] * 4 +", "[False] * 3 +")],
    dict(vars(train)),
)

if __name__ == "__main__":
    example = tasks.make_example("kv_retrieval", 3, 80, num_pairs=3)
    print(f"format: {example.prompt!r} -> {example.answer}", flush=True)
    train.main(sys.argv[1:])
