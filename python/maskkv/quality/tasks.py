"""Synthetic long-context retrieval tasks for the quality suite, deterministic by seed.

No datasets can be downloaded here, so quality is measured on tasks whose answer depends on a few
prompt tokens hidden among hundreds of irrelevant ones: exactly the situation in which a KV
eviction method either keeps the evidence or loses it.

Both tasks hide a 3-token code ("code Q7#.") in filler sentences; the answer is the code:

``passkey``         question last (the layout SnapKV's observation window likes, since the last
                    prompt tokens are the question): ``"the sky is blue. code Q7#. ...|code?"``
``passkey_qfirst``  question first: ``"code?|the sky is blue. code Q7#. ..."``. The last prompt
                    tokens are filler, so a window-scored method sees no question in its window,
                    while MaskKV's mask queries see the whole prompt.

Why a code with one alphabet per position (uppercase letter, digit, symbol) rather than digits or
key-value pairs: the answer must be several tokens (one token per denoising step is revealed, and
only the first one is decoded before eviction), and it must be learnable by a tiny model in
minutes on a CPU. Copying "the digit at offset i after the marker" or "the value of the key the
question names" needs two composed attention hops; with the 1/t-weighted masked-diffusion
objective, a 4-layer model trained for 2000+ steps on such tasks (k=vvvv pairs, 5-digit pass keys)
stayed at chance on exact match. Here answer position i reads "the token of alphabet i", one hop.

Prompts are ASCII, so the byte-level tokenizer of the tiny checkpoints maps character c to the
token id ``ord(c)``; every prompt of a task at one ``prompt_len`` has exactly that many tokens
(BOS included), so batches need no padding.

>>> from maskkv.quality import tasks
>>> ex = tasks.make_example("passkey", seed=3, prompt_len=64)
>>> len(tasks.encode_prompt(ex))
64
>>> tasks.parse_answer(tasks.encode_answer(ex, 8)) == ex.answer
True
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "ALPHABETS",
    "BOS_ID",
    "DEFAULT_PROMPT_LEN",
    "EOS_ID",
    "MASK_ID",
    "MIN_PROMPT_LEN",
    "SPLIT_SEEDS",
    "TASKS",
    "Example",
    "decode",
    "encode",
    "encode_answer",
    "encode_prompt",
    "make_example",
    "make_examples",
    "parse_answer",
]

# The tiny LLaDA tokenizer of `maskkv.testing`: ids 0..255 are the bytes, then
# <|startoftext|> (bos), <|endoftext|> (eos / pad), <|mdm_mask|> (mask), ...
BOS_ID = 256
EOS_ID = 257
MASK_ID = 258
_NUM_BYTES = 256

#: Held-out data never shares a seed with training data: example i of split s uses seed
#: SPLIT_SEEDS[s] + i, and training draws fewer than 10**8 examples per seed.
SPLIT_SEEDS = {"train": 0, "calib": 10**9, "test": 2 * 10**9}

#: One alphabet per code position, disjoint from each other and from the (lowercase) filler.
ALPHABETS = (string.ascii_uppercase, string.digits, "!#$%&*+@^~")
DEFAULT_PROMPT_LEN = 288  # budgets 8..64 keep 3%..22% of the prompt
MIN_PROMPT_LEN = 32

_MARKER = "code "
_QUESTION = "code?"
_SEP = "|"
# Filler: short sentences without uppercase letters, digits or code symbols, drawn at random so no
# two prompts are alike.
_FILLER = (
    "the sky is blue. ",
    "the grass is green. ",
    "the sun is hot. ",
    "here we go. ",
    "there and back again. ",
    "a cat sat on a mat. ",
    "the sea is wide. ",
    "rain falls down. ",
    "birds sing at dawn. ",
    "the road is long. ",
)


@dataclass(frozen=True)
class Example:
    """One prompt and its exact answer.

    Attributes:
        task: the task name (a key of ``TASKS``).
        prompt: ASCII prompt text (``encode_prompt`` adds the BOS).
        answer: the exact answer text (the code).
        evidence: (start, end) character span of the code inside ``prompt``; as token span in the
            encoded prompt add 1 (the BOS).
        seed: the seed that generated it.
    """

    task: str
    prompt: str
    answer: str
    evidence: tuple[int, int]
    seed: int


def _haystack(rng: random.Random, length: int) -> tuple[str, str, int]:
    """``length`` characters of filler with "code XYZ. " inserted at a sentence boundary.
    Returns (text, code, character offset of the code)."""
    code = "".join(rng.choice(a) for a in ALPHABETS)
    needle = f"{_MARKER}{code}. "
    filler = ""
    while len(filler) < length - len(needle):
        filler += rng.choice(_FILLER)
    filler = filler[: length - len(needle)]
    # At a sentence boundary (after ". ") or at the start, so the needle reads as a sentence.
    cuts = [0] + [j + 2 for j in range(len(filler) - 1) if filler[j : j + 2] == ". "]
    at = rng.choice(cuts)
    return filler[:at] + needle + filler[at:], code, at + len(_MARKER)


def _passkey(seed: int, prompt_len: int) -> Example:
    rng = random.Random(seed)
    question = _SEP + _QUESTION
    text, code, at = _haystack(rng, prompt_len - 1 - len(question))
    return Example("passkey", text + question, code, (at, at + len(code)), seed)


def _passkey_qfirst(seed: int, prompt_len: int) -> Example:
    rng = random.Random(seed)
    question = _QUESTION + _SEP
    text, code, at = _haystack(rng, prompt_len - 1 - len(question))
    at += len(question)
    return Example("passkey_qfirst", question + text, code, (at, at + len(code)), seed)


#: name -> generator(seed, prompt_len) -> Example
TASKS: dict[str, Callable[[int, int], Example]] = {
    "passkey": _passkey,
    "passkey_qfirst": _passkey_qfirst,
}


def make_example(task: str, seed: int, prompt_len: int = DEFAULT_PROMPT_LEN) -> Example:
    """One example of ``task``, a pure function of (task, seed, prompt_len).

    prompt_len: tokens of the encoded prompt, BOS included (>= ``MIN_PROMPT_LEN``).
    """
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if not isinstance(prompt_len, int) or prompt_len < MIN_PROMPT_LEN:
        raise ValueError(f"prompt_len: expected an int >= {MIN_PROMPT_LEN}, got {prompt_len!r}")
    return TASKS[task](seed, prompt_len)


def make_examples(
    task: str, n: int, *, split: str = "test", prompt_len: int = DEFAULT_PROMPT_LEN, start: int = 0
) -> list[Example]:
    """Examples ``start .. start + n - 1`` of a split ("train", "calib", "test"), with disjoint
    seeds per split (``SPLIT_SEEDS``), so held-out examples are never trained on."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split: expected one of {', '.join(SPLIT_SEEDS)}, got {split!r}")
    base = SPLIT_SEEDS[split]
    return [make_example(task, base + start + i, prompt_len) for i in range(n)]


# ------------------------------------------------------------------------------- tokens


def encode(text: str) -> list[int]:
    """ASCII text -> byte ids (what the tiny byte-level tokenizer produces for ASCII)."""
    return list(text.encode("ascii"))


def decode(ids: Sequence[int]) -> str:
    """Byte ids -> text; ids >= 256 (special tokens) are dropped."""
    return bytes(int(i) for i in ids if 0 <= int(i) < _NUM_BYTES).decode("ascii", "replace")


def encode_prompt(example: Example) -> list[int]:
    """[BOS] + the prompt's bytes."""
    return [BOS_ID, *encode(example.prompt)]


def encode_answer(example: Example, gen_length: int) -> list[int]:
    """The training target of the response: the answer's bytes, then EOS up to ``gen_length``
    (LLaDA's SFT recipe pads answers with EOS, so the model learns where to stop)."""
    ids = encode(example.answer)
    if len(ids) >= gen_length:
        raise ValueError(
            f"gen_length: expected > {len(ids)} (answer {example.answer!r} plus EOS), "
            f"got {gen_length}"
        )
    return ids + [EOS_ID] * (gen_length - len(ids))


def parse_answer(ids: Sequence[int], eos_id: int = EOS_ID) -> str:
    """The answer text of a generated response: everything before the first EOS (other special
    tokens, e.g. a leftover mask, are dropped), whitespace stripped."""
    ids = [int(i) for i in ids]
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return decode(ids).strip()
