"""Data of the maskkv lm-eval tasks: the quality suite's held-out examples, made from their seeds
by ``maskkv.quality.tasks`` (lm-eval's ``custom_dataset`` hook)."""

from __future__ import annotations

from typing import Any


def make_dataset(
    task: str = "passkey", num_examples: int = 100, prompt_len: int = 288, **metadata: Any
) -> dict[str, Any]:
    """``{"test": datasets.Dataset}`` of examples 0..num_examples-1 of the "test" split, the ones
    ``maskkv eval --num-examples N`` scores. Columns: prompt, answer, seed. ``metadata`` (lm-eval
    passes the task's metadata and ``--metadata`` here) does not change the data."""
    import datasets

    from maskkv.quality.tasks import make_examples

    examples = make_examples(task, int(num_examples), split="test", prompt_len=int(prompt_len))
    rows = [{"prompt": e.prompt, "answer": e.answer, "seed": e.seed} for e in examples]
    return {"test": datasets.Dataset.from_list(rows)}
