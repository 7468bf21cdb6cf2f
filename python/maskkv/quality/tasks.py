"""Synthetic long-context retrieval tasks for the quality suite, deterministic by seed.

No datasets can be downloaded here, so quality is measured on tasks whose answer depends on a few
prompt tokens hidden among hundreds of irrelevant ones: exactly the situation in which a KV
eviction method either keeps the evidence or loses it.

Two families of tasks.

**Question-routed retrieval** (the tasks that tell eviction methods apart). Key-value pairs
``"fox K4$. "`` (a 3-letter word key, a 3-token coded value) are scattered through filler
sentences; the question names one key and the answer is its value. Every value appears exactly
once and the queried key is drawn uniformly among the pairs, so the prompt's content alone cannot
tell which value is asked for: an eviction method must keep the value the *question* points at.

``kv_retrieval``        16-64 pairs, question last: ``"...fox K4$. ...cow B1&. ...|fox?"``
``kv_retrieval_qfirst`` the same, question first: ``"fox?|...fox K4$. ..."``. The last prompt
                        tokens are filler, so a window-scored method sees no question in its
                        window.
``multi_needle``        two or three keys asked at once (``"|fox,cow?"``); the answer is their
                        values in the order asked, comma-separated (``"K4$,B1&"``).

The number of pairs grows with the prompt: 16 .. min(64, prompt_len // 12), drawn per example
(``kv_pairs_range``); the shortest prompt that holds 16 pairs is ``TASK_MIN_PROMPT_LEN``.
``make_example(..., depth=d)`` puts the (first) queried pair at relative depth d of the prompt
(0 = first pair, 1 = last; for the controls, the code at that fraction of the filler): the
depth x length sweep (``depth_length_grid``).

**Content-only controls** (the original suite): a single 3-token code ("code Q7#.") in filler
sentences; the answer is the code. The code is the only run of uppercase, digit and symbol in the
prompt, so a method can find it without reading the question:

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
    "CONTROL_TASKS",
    "KEY_WORDS",
    "LLADA_TOKEN_IDS",
    "RETRIEVAL_TASKS",
    "SPLIT_SEEDS",
    "TASKS",
    "TASK_GEN_LENGTH",
    "TASK_MIN_PROMPT_LEN",
    "Example",
    "TokenIds",
    "decode",
    "depth_length_grid",
    "encode",
    "encode_answer",
    "encode_prompt",
    "kv_pairs_range",
    "make_example",
    "make_examples",
    "parse_answer",
    "token_ids",
]

# The tiny LLaDA tokenizer of `maskkv.testing`: ids 0..255 are the bytes, then
# <|startoftext|> (bos), <|endoftext|> (eos / pad), <|mdm_mask|> (mask), ...
BOS_ID = 256
EOS_ID = 257
MASK_ID = 258
_NUM_BYTES = 256


@dataclass(frozen=True)
class TokenIds:
    """The special token ids a model's byte-level tokenizer puts after the 256 bytes.

    The tiny LLaDA tokenizer (``LLADA_TOKEN_IDS``): BOS 256, EOS 257, mask 258. The tiny Dream
    tokenizer: BOS = EOS = pad = 256 (``<|endoftext|>``, Dream's config bos), mask 260. Take them
    from the model's config with ``token_ids``.
    """

    bos: int = BOS_ID
    eos: int = EOS_ID
    mask: int = MASK_ID


#: The tiny LLaDA tokenizer's ids, the default of every encoder.
LLADA_TOKEN_IDS = TokenIds()


def token_ids(config) -> TokenIds:
    """The special ids of a model config (``LLaDAConfig`` or ``DreamConfig``): ``bos_token_id``,
    ``eos_token_id``, ``mask_token_id``. LLaDA's config has no BOS id: its tokenizer puts
    ``<|startoftext|>`` right before ``<|endoftext|>`` (126080 / 126081 in LLaDA-8B, 256 / 257 in
    the tiny one), so BOS = EOS - 1 there.

    Raises ``ValueError`` when an id is missing or inside the byte range 0..255 (the tasks'
    text would collide with it)."""
    eos = getattr(config, "eos_token_id", None)
    mask = getattr(config, "mask_token_id", None)
    bos = getattr(config, "bos_token_id", None)
    if bos is None and isinstance(eos, int):
        bos = eos - 1
    ids = {"bos_token_id": bos, "eos_token_id": eos, "mask_token_id": mask}
    for name, value in ids.items():
        if not isinstance(value, int) or value < _NUM_BYTES:
            raise ValueError(
                f"config.{name}: expected a special token id >= {_NUM_BYTES} (after the byte "
                f"ids of the task tokenizer), got {value!r}"
            )
    return TokenIds(bos=bos, eos=eos, mask=mask)


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
        evidence: (start, end) character span of the (first) answer value inside ``prompt``; as
            token span in the encoded prompt add 1 (the BOS).
        seed: the seed that generated it.
        evidence_spans: every answer value's span (``multi_needle`` has several); empty means
            just ``evidence`` (see ``spans``).
        depth: relative position of the (first) evidence in the prompt, 0..1.
        num_pairs: key-value pairs in the prompt (0 for the content-only controls).
    """

    task: str
    prompt: str
    answer: str
    evidence: tuple[int, int]
    seed: int
    evidence_spans: tuple[tuple[int, int], ...] = ()
    depth: float = 0.0
    num_pairs: int = 0

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        """Character spans of all the evidence the answer copies."""
        return self.evidence_spans or (self.evidence,)


def _haystack(rng: random.Random, length: int, depth: float | None = None) -> tuple[str, str, int]:
    """``length`` characters of filler with "code XYZ. " inserted at a sentence boundary (random,
    or the one nearest relative ``depth``). Returns (text, code, character offset of the code)."""
    code = "".join(rng.choice(a) for a in ALPHABETS)
    needle = f"{_MARKER}{code}. "
    filler = ""
    while len(filler) < length - len(needle):
        filler += rng.choice(_FILLER)
    filler = filler[: length - len(needle)]
    # At a sentence boundary (after ". ") or at the start, so the needle reads as a sentence.
    cuts = [0] + [j + 2 for j in range(len(filler) - 1) if filler[j : j + 2] == ". "]
    if depth is None:
        at = rng.choice(cuts)
    else:
        at = min(cuts, key=lambda c: abs(c - depth * len(filler)))
    return filler[:at] + needle + filler[at:], code, at + len(_MARKER)


def _passkey(seed: int, prompt_len: int, depth: float | None = None) -> Example:
    rng = random.Random(seed)
    question = _SEP + _QUESTION
    text, code, at = _haystack(rng, prompt_len - 1 - len(question), depth)
    span = (at, at + len(code))
    return Example("passkey", text + question, code, span, seed, depth=at / len(text))


def _passkey_qfirst(seed: int, prompt_len: int, depth: float | None = None) -> Example:
    rng = random.Random(seed)
    question = _QUESTION + _SEP
    text, code, at = _haystack(rng, prompt_len - 1 - len(question), depth)
    depth = at / len(text)
    at += len(question)
    return Example("passkey_qfirst", question + text, code, (at, at + len(code)), seed, depth=depth)


# ------------------------------------------------------------------ question-routed retrieval

#: Key words: 3 lowercase letters, none of them a word of the filler, so a key occurs in the
#: prompt exactly once (in its pair) and once more in the question.
KEY_WORDS = tuple(
    """ant ape arm axe bag bat bed bee box boy bus cab can cap car cow cup dog ear egg elf elk
    fan fig fin fox gem gum hat hen hog ice ink jam jar jet key kit lab leg lid lip log map mud
    mug net nut oak oar owl pan pea pen pig pin pot ram rat rib rod rug saw ski spy tag tax tea
    tie tin toe toy tub van vet web wig yak zip bun dew fur hay hut jaw kid lad""".split()
)
_MAX_PAIRS = 64
_MIN_PAIRS = 16
_CHARS_PER_PAIR = 12  # a pair is 9 characters; the rest of the prompt is filler and question


def kv_pairs_range(prompt_len: int) -> tuple[int, int]:
    """(fewest, most) key-value pairs of a retrieval prompt of ``prompt_len`` tokens: 16 ..
    min(64, prompt_len // 12), so a quarter or more of the prompt stays filler."""
    return _MIN_PAIRS, max(_MIN_PAIRS, min(_MAX_PAIRS, prompt_len // _CHARS_PER_PAIR))


def _code(rng: random.Random) -> str:
    return "".join(rng.choice(a) for a in ALPHABETS)


def _kv(
    task: str,
    seed: int,
    prompt_len: int,
    *,
    num_pairs: int | None = None,
    depth: float | None = None,
    num_queries: int = 1,
    qfirst: bool = False,
) -> Example:
    """Key-value retrieval; see the module docstring. ``num_pairs`` and ``depth`` override the
    random draws (the training curriculum uses fewer pairs than 16 on short prompts)."""
    rng = random.Random(seed)
    if num_pairs is None:
        num_pairs = rng.randint(*kv_pairs_range(prompt_len))
    keys = rng.sample(KEY_WORDS, num_pairs)
    codes: list[str] = []
    while len(codes) < num_pairs:  # every value appears exactly once
        c = _code(rng)
        if c not in codes:
            codes.append(c)
    # The queried pairs: uniformly drawn (or the first one placed at ``depth``, below).
    asked = rng.sample(range(num_pairs), num_queries)
    question = ",".join(keys[i] for i in asked) + "?"
    question = question + _SEP if qfirst else _SEP + question
    body_len = prompt_len - 1 - len(question)
    pairs = [f"{k} {c}. " for k, c in zip(keys, codes)]
    filler_len = body_len - sum(map(len, pairs))
    if filler_len < 0:
        raise ValueError(
            f"prompt_len: {num_pairs} pairs need more than {prompt_len} tokens "
            f"(at least {prompt_len - filler_len})"
        )
    filler = ""
    while len(filler) < filler_len:
        filler += rng.choice(_FILLER)
    filler = filler[:filler_len]
    cuts = [0] + [j + 2 for j in range(len(filler) - 1) if filler[j : j + 2] == ". "]
    # Each pair goes at a sentence boundary of the filler (several may share one); pairs are
    # laid out in the order of their cuts, so ``order[r]`` is the pair at rank r.
    at = sorted(rng.choice(cuts) for _ in range(num_pairs))
    order = list(range(num_pairs))
    rng.shuffle(order)
    if depth is not None:  # move the first asked pair to the rank nearest the depth
        rank = round(depth * (num_pairs - 1))
        j = order.index(asked[0])
        order[j], order[rank] = order[rank], order[j]
    text, pos, starts = "", 0, {}
    for rank, pair in enumerate(order):
        text += filler[pos : at[rank]]
        pos = at[rank]
        starts[pair] = len(text) + 4  # after "key "
        text += pairs[pair]
    text += filler[pos:]
    offset = len(question) if qfirst else 0
    prompt = question + text if qfirst else text + question
    spans = tuple((starts[i] + offset, starts[i] + offset + 3) for i in asked)
    answer = ",".join(codes[i] for i in asked)
    rel_depth = starts[asked[0]] / max(len(text) - 1, 1)
    return Example(task, prompt, answer, spans[0], seed, spans, rel_depth, num_pairs)


def _kv_retrieval(seed: int, prompt_len: int, **kw) -> Example:
    return _kv("kv_retrieval", seed, prompt_len, **kw)


def _kv_retrieval_qfirst(seed: int, prompt_len: int, **kw) -> Example:
    return _kv("kv_retrieval_qfirst", seed, prompt_len, qfirst=True, **kw)


def _multi_needle(seed: int, prompt_len: int, **kw) -> Example:
    # Two or three keys, drawn from the seed (a separate stream, so the pair layout of the
    # other draws does not depend on it).
    if "num_queries" not in kw:
        kw["num_queries"] = random.Random(seed ^ 0x5EED).choice((2, 3))
    return _kv("multi_needle", seed, prompt_len, **kw)


#: The question-routed retrieval tasks (the content of the prompt cannot locate the answer).
RETRIEVAL_TASKS = ("kv_retrieval", "kv_retrieval_qfirst", "multi_needle")
#: The content-only controls (the answer is the only code in the prompt).
CONTROL_TASKS = ("passkey", "passkey_qfirst")

#: name -> generator(seed, prompt_len, **overrides) -> Example
TASKS: dict[str, Callable[..., Example]] = {
    "kv_retrieval": _kv_retrieval,
    "kv_retrieval_qfirst": _kv_retrieval_qfirst,
    "multi_needle": _multi_needle,
    "passkey": _passkey,
    "passkey_qfirst": _passkey_qfirst,
}

#: Shortest prompt (tokens, BOS included) of each task: 16 pairs for the retrieval tasks.
TASK_MIN_PROMPT_LEN = {
    "kv_retrieval": _MIN_PAIRS * _CHARS_PER_PAIR,
    "kv_retrieval_qfirst": _MIN_PAIRS * _CHARS_PER_PAIR,
    "multi_needle": _MIN_PAIRS * _CHARS_PER_PAIR,
    "passkey": MIN_PROMPT_LEN,
    "passkey_qfirst": MIN_PROMPT_LEN,
}
#: Response length that holds each task's longest answer plus at least one EOS.
TASK_GEN_LENGTH = {
    "kv_retrieval": 8,
    "kv_retrieval_qfirst": 8,
    "multi_needle": 12,
    "passkey": 8,
    "passkey_qfirst": 8,
}


def make_example(
    task: str,
    seed: int,
    prompt_len: int = DEFAULT_PROMPT_LEN,
    *,
    depth: float | None = None,
    num_pairs: int | None = None,
) -> Example:
    """One example of ``task``, a pure function of (task, seed, prompt_len, depth, num_pairs).

    prompt_len: tokens of the encoded prompt, BOS included (>= ``TASK_MIN_PROMPT_LEN[task]``).
    depth: place the (first) evidence at this relative depth, 0..1 (default: at random).
    num_pairs: key-value pairs (retrieval tasks; default drawn from ``kv_pairs_range``). Fewer
        than 16 is allowed here, for training curricula, and so are shorter prompts then.
    """
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    low = TASK_MIN_PROMPT_LEN[task] if num_pairs is None else MIN_PROMPT_LEN
    if not isinstance(prompt_len, int) or prompt_len < low:
        raise ValueError(f"prompt_len: expected an int >= {low} for {task}, got {prompt_len!r}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: expected a float in [0, 1], got {depth!r}")
    if task in RETRIEVAL_TASKS:
        if num_pairs is not None and not 1 <= num_pairs <= len(KEY_WORDS):
            raise ValueError(f"num_pairs: expected 1..{len(KEY_WORDS)}, got {num_pairs!r}")
        if task == "multi_needle" and num_pairs is not None and num_pairs < 3:
            raise ValueError(f"num_pairs: multi_needle needs >= 3, got {num_pairs}")
        return TASKS[task](seed, prompt_len, num_pairs=num_pairs, depth=depth)
    if num_pairs is not None:
        raise ValueError(f"num_pairs: only for {', '.join(RETRIEVAL_TASKS)}, not {task}")
    return TASKS[task](seed, prompt_len, depth=depth)


def make_examples(
    task: str,
    n: int,
    *,
    split: str = "test",
    prompt_len: int = DEFAULT_PROMPT_LEN,
    start: int = 0,
    depth: float | None = None,
) -> list[Example]:
    """Examples ``start .. start + n - 1`` of a split ("train", "calib", "test"), with disjoint
    seeds per split (``SPLIT_SEEDS``), so held-out examples are never trained on."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split: expected one of {', '.join(SPLIT_SEEDS)}, got {split!r}")
    base = SPLIT_SEEDS[split]
    return [make_example(task, base + start + i, prompt_len, depth=depth) for i in range(n)]


def depth_length_grid(
    task: str,
    n: int,
    depths: Sequence[float],
    prompt_lens: Sequence[int],
    *,
    split: str = "test",
) -> dict[tuple[float, int], list[Example]]:
    """The depth x length sweep (the needle-in-a-haystack heatmap): ``n`` held-out examples per
    (depth, prompt_len) cell, the (first) queried pair placed at ``depth``. Cells use different
    seeds, so no two cells share a prompt."""
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    grid = {}
    for i, length in enumerate(prompt_lens):
        for j, depth in enumerate(depths):
            start = (i * len(depths) + j) * n
            grid[(depth, length)] = make_examples(
                task, n, split=split, prompt_len=length, start=10**6 + start, depth=depth
            )
    return grid


# ------------------------------------------------------------------------------- tokens


def encode(text: str) -> list[int]:
    """ASCII text -> byte ids (what the tiny byte-level tokenizer produces for ASCII)."""
    return list(text.encode("ascii"))


def decode(ids: Sequence[int]) -> str:
    """Byte ids -> text; ids >= 256 (special tokens) are dropped."""
    return bytes(int(i) for i in ids if 0 <= int(i) < _NUM_BYTES).decode("ascii", "replace")


def encode_prompt(example: Example, ids: TokenIds = LLADA_TOKEN_IDS) -> list[int]:
    """[BOS] + the prompt's bytes (``ids.bos``: the model's BOS, see ``token_ids``)."""
    return [ids.bos, *encode(example.prompt)]


def encode_answer(example: Example, gen_length: int, ids: TokenIds = LLADA_TOKEN_IDS) -> list[int]:
    """The training target of the response: the answer's bytes, then ``ids.eos`` up to
    ``gen_length`` (LLaDA's SFT recipe pads answers with EOS, so the model learns where to
    stop)."""
    answer = encode(example.answer)
    if len(answer) >= gen_length:
        raise ValueError(
            f"gen_length: expected > {len(answer)} (answer {example.answer!r} plus EOS), "
            f"got {gen_length}"
        )
    return answer + [ids.eos] * (gen_length - len(answer))


def parse_answer(ids: Sequence[int], eos_id: int = EOS_ID) -> str:
    """The answer text of a generated response: everything before the first EOS (other special
    tokens, e.g. a leftover mask, are dropped), whitespace stripped."""
    ids = [int(i) for i in ids]
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return decode(ids).strip()
