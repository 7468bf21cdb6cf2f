"""Train the quality suite's tiny LLaDA (or Dream) on the synthetic tasks with LLaDA's
masked-diffusion SFT objective, on the CPU, in minutes.

Three model layouts (``--kind``): "llada" (OLMo names, MHA; the prediction of token i is the
logits at position i), "dream" (Qwen2 names, grouped-query attention via ``--n-kv-heads``; the
prediction of token i is the logits at position i - 1, as in Dream's generation) and "llada2"
(LLaDA2's names, grouped-query attention, MoE MLPs, block-causal attention in blocks of
``block_length`` positions from position 0, as LLaDA2 is trained and sampled; the answer's block
is filled up with EOS, since generation decodes whole blocks). Prompts and
answers are encoded with the model's own BOS / EOS / mask ids (``tasks.token_ids``).

Objective (LLaDA SFT, Nie et al. 2025): for a prompt p and answer r0 (padded with EOS to
``gen_length``), draw t, mask every answer token independently with probability
p_mask = (1 - eps) t + eps, and minimise the cross-entropy of the masked tokens weighted by
1 / p_mask, averaged over the answer positions. The prompt is not masked (SFT; inference starts
from a clean prompt) unless ``prompt_mask_prob`` > 0 adds a masked-LM term on it.

One deviation, for speed: t ~ U(0, 1) for a fraction ``1 - full_mask_frac`` of the rows, and
t = 1 (every answer token masked, weight 1) for the others. t = 1 is the state generation starts
from; in short CPU runs the pure U(0, 1) draw, whose 1/t weights make the loss very noisy on
3-token answers, learned the retrieval markedly slower (one-shot exact match 8% after 1000 steps,
against 56% after 600 steps with t = 1 only; those two runs also differed in the task mix).

Curriculum: the prompt length is drawn per batch from [min_prompt_len, L(step)], L growing
linearly from min_prompt_len to max_prompt_len over the first ``curriculum`` fraction of the
steps: short prompts are cheap and teach the retrieval, the long ones make it hold at the
evaluated length. ``schedule="adaptive"`` raises the length and the number of key-value pairs
whenever the running exact match says the current level is learned (``TrainConfig``).

Two more things the question-routed tasks need (TRAINING.md has the runs): ``--prompt-mask``
(masked-LM on the prompt; without it no run left the copying plateau) and, for the Dream layout,
a start from a trained LLaDA-layout model (``--init-from``, converted by ``convert``). The
shipped models' exact commands are in their READMEs (``python/maskkv/assets/*/README.md``).

    python -m maskkv.quality.train --out /tmp/tiny-llada --prompt-mask 0.3 --schedule adaptive
    python -m maskkv.quality.train --kind dream --n-kv-heads 2 --init-from /tmp/tiny-llada \
        --out /tmp/tiny-dream --prompt-mask 0.3

>>> from maskkv.quality.train import TrainConfig, train
>>> model, log = train(TrainConfig(steps=50))                                     # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models.llada2 import LLADA2_BLOCK_LENGTH
from . import tasks as task_lib

__all__ = [
    "DREAM_MODEL_OVERRIDES",
    "KINDS",
    "LLADA2_MODEL_OVERRIDES",
    "MODEL_OVERRIDES",
    "TrainConfig",
    "build_model",
    "calibrate_profile",
    "make_batch",
    "masked_diffusion_loss",
    "model_overrides",
    "routing_probe",
    "save",
    "token_logits",
    "train",
]

#: The asset model: LLaDA layout (OLMo names, MHA), 4 layers, d 128 in 4 heads of 32, MLP 256,
#: and the 320-token byte-level vocabulary of ``maskkv.testing``'s tiny LLaDA tokenizer. (A 6-layer
#: d-96 variant, whose middle layers MaskKV's layer schedule would have used, was still at chance
#: after 1200 steps where this one learns the tasks; CPU time decided.)
MODEL_OVERRIDES: dict[str, Any] = {
    "n_layers": 4,
    "d_model": 128,
    "n_heads": 4,
    "n_kv_heads": 4,
    "mlp_hidden_size": 256,
    "max_sequence_length": 1024,
    # LLaDA-8B's 500000 is tuned for 4k+ contexts; with head dim 32 it would leave only a few
    # of rotary frequencies fast enough to tell neighbouring positions apart.
    "rope_theta": 10000.0,
}

#: The Dream-layout counterpart of ``MODEL_OVERRIDES`` (Qwen2 config names): the same shape with
#: grouped-query attention, 4 query heads sharing 2 KV heads (Dream-7B shares 7 per KV head).
DREAM_MODEL_OVERRIDES: dict[str, Any] = {
    "num_hidden_layers": 4,
    "max_window_layers": 4,  # unused without a sliding window; kept equal to the layer count
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,  # see MODEL_OVERRIDES
}

#: The LLaDA2-layout counterpart (LLaDA2 config names), shaped so that ``convert`` carries a
#: trained ``MODEL_OVERRIDES`` model over exactly: the same width and heads (MHA: grouping
#: K and V by averaging, as for the Dream sibling, would start from a broken model), every
#: channel rotated and no q/k norms (LLaDA has neither; both are optional in LLaDA2's config),
#: layer 0 dense, then MoE layers of 8 experts of 128 (top-2 within 2 of 4 groups) beside 2
#: shared experts of 128, which together hold the dense MLP.
LLADA2_MODEL_OVERRIDES: dict[str, Any] = {
    "num_hidden_layers": 4,
    "max_window_layers": 4,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "intermediate_size": 256,
    "first_k_dense_replace": 1,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "moe_intermediate_size": 128,
    "num_shared_experts": 2,
    "routed_scaling_factor": 1.0,
    "partial_rotary_factor": 1.0,
    "rotary_dim": 32,
    "use_qk_norm": False,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,  # see MODEL_OVERRIDES
}


KINDS = ("llada", "dream", "llada2")

# The config names of one shape in each layout (``model_overrides``).
_SHAPE_NAMES = {
    "llada": {
        "n_layers": "n_layers",
        "d_model": "d_model",
        "n_heads": "n_heads",
        "n_kv_heads": "n_kv_heads",
        "mlp": "mlp_hidden_size",
    },
    "dream": {
        "n_layers": "num_hidden_layers",
        "d_model": "hidden_size",
        "n_heads": "num_attention_heads",
        "n_kv_heads": "num_key_value_heads",
        "mlp": "intermediate_size",
    },
}
_SHAPE_NAMES["llada2"] = _SHAPE_NAMES["dream"]
_DEFAULT_OVERRIDES = {
    "llada": MODEL_OVERRIDES,
    "dream": DREAM_MODEL_OVERRIDES,
    "llada2": LLADA2_MODEL_OVERRIDES,
}


def model_overrides(
    kind: str,
    *,
    n_layers: int | None = None,
    d_model: int | None = None,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    mlp: int | None = None,
) -> dict[str, Any]:
    """The config overrides of a trained model of ``kind`` ("llada" | "dream" | "llada2"): the
    kind's defaults (``MODEL_OVERRIDES`` / ``DREAM_MODEL_OVERRIDES`` /
    ``LLADA2_MODEL_OVERRIDES``) with the given sizes under the kind's config names. n_kv_heads
    defaults to n_heads for LLaDA and LLaDA2 (MHA, as LLaDA-8B and the shipped conversion) and
    to the default's ratio of query to KV heads (2) for Dream."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    names = _SHAPE_NAMES[kind]
    out = dict(_DEFAULT_OVERRIDES[kind])
    given = {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "mlp": mlp}
    out.update({names[k]: v for k, v in given.items() if v is not None})
    if n_kv_heads is None and n_heads is not None:
        default = n_heads if kind != "dream" else max(1, n_heads // 2)
        n_kv_heads = default
    if n_kv_heads is not None:
        out[names["n_kv_heads"]] = n_kv_heads
    heads, kv = out[names["n_heads"]], out[names["n_kv_heads"]]
    if heads % kv or out[names["d_model"]] % heads:
        raise ValueError(
            f"n_kv_heads: expected a divisor of n_heads={heads} (and n_heads a divisor of "
            f"d_model={out[names['d_model']]}), got n_kv_heads={kv}"
        )
    if kind != "llada":
        out["max_window_layers"] = out["num_hidden_layers"]
    if kind == "llada2":
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
        out["rotary_dim"] = out["head_dim"]
    return out


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the asset's train_log.json).

    kind: the model layout, "llada" (OLMo names, MHA, logits[i] predicts token i), "dream"
    (Qwen2 names, GQA, logits[i - 1] predicts token i) or "llada2" (LLaDA2 names, GQA, MoE,
    block-causal attention in blocks of ``block_length``). model: config overrides in the kind's
    names (``model_overrides``); the LLaDA default ``MODEL_OVERRIDES`` becomes the kind's own
    default (``DREAM_MODEL_OVERRIDES``, ``LLADA2_MODEL_OVERRIDES``).
    """

    kind: str = "llada"
    tasks: tuple[str, ...] = tuple(task_lib.TASKS)
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eps: float = 1e-3  # p_mask = (1 - eps) t + eps keeps the 1/t weight finite
    full_mask_frac: float = 0.5  # rows with t = 1 (see the module docstring)
    #: masked-LM share of the prompt (see ``masked_diffusion_loss``); 0 is plain LLaDA SFT
    prompt_mask_prob: float = 0.0
    gen_length: int = 8  # at least every task's TASK_GEN_LENGTH (the longer ones use theirs)
    min_prompt_len: int = 40
    max_prompt_len: int = task_lib.DEFAULT_PROMPT_LEN
    curriculum: float = 0.5
    #: "linear": the longest prompt grows linearly over the first ``curriculum`` fraction of the
    #: steps. "adaptive": a level that starts at 1 and rises by one whenever every task's
    #: running full-mask exact match (kv_recall's excepted) reaches ``adaptive_threshold`` (at
    #: least ``adaptive_min_steps`` steps apart); at level k the longest prompt is
    #: ``min_prompt_len + adaptive_step * k`` tokens and a retrieval prompt holds at most k
    #: key-value pairs (multi_needle at least 3; it joins the gate from level 4).
    schedule: str = "linear"
    adaptive_threshold: float = 0.9
    adaptive_step: int = 12
    adaptive_min_steps: int = 50
    start_level: int = 1  # a warm start that already copies can begin with several pairs
    #: a checkpoint directory of the same shape whose weights start the run (warm start; not
    #: read when resuming); for kind "dream" it may hold a LLaDA-layout model (see ``convert``)
    init_from: str | None = None
    seed: int = 0
    block_length: int = LLADA2_BLOCK_LENGTH  # llada2 only: the block-causal attention's blocks
    threads: int = 1  # more threads only pay on an idle machine
    max_minutes: float | None = None  # stop early (the cosine schedule still assumes `steps`)
    model: dict[str, Any] = field(default_factory=lambda: dict(MODEL_OVERRIDES))

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if not 0.0 <= self.prompt_mask_prob < 1.0:
            raise ValueError(
                f"prompt_mask_prob: expected a probability in [0, 1), got {self.prompt_mask_prob!r}"
            )
        if self.kind != "llada" and self.model == MODEL_OVERRIDES:
            self.model = dict(_DEFAULT_OVERRIDES[self.kind])
        self.check_model_names()

    def check_model_names(self) -> None:
        """``ValueError`` if ``model`` sizes a layer count, width, heads or MLP under the other
        layout's config name (the config would take it as an unknown extra and ignore it)."""
        other = _SHAPE_NAMES["dream" if self.kind == "llada" else "llada"].values()
        wrong = sorted(set(self.model) & set(other) - set(_SHAPE_NAMES[self.kind].values()))
        if wrong:
            raise ValueError(
                f"model: {wrong} are not {self.kind} config names; expected "
                f"{sorted(_SHAPE_NAMES[self.kind].values())} (see model_overrides)"
            )


def make_batch(
    task: str,
    seeds: list[int],
    prompt_len: int,
    gen_length: int,
    num_pairs: list[int] | None = None,
    ids: task_lib.TokenIds = task_lib.LLADA_TOKEN_IDS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An SFT batch: token ids x0 [B, prompt_len + gen_length] = prompt || answer (EOS-padded),
    and the bool mask of the positions that may be masked (the answer). ``num_pairs``: per row,
    the key-value pairs of a retrieval task (default: the task's own draw). ``ids``: the model's
    BOS / EOS (``tasks.token_ids(model.config)``)."""
    if task == RECALL_TASK:
        return _recall_batch(seeds, prompt_len, num_pairs, ids)
    rows = []
    for i, s in enumerate(seeds):
        kw = {} if num_pairs is None else {"num_pairs": num_pairs[i]}
        ex = task_lib.make_example(task, s, prompt_len, **kw)
        rows.append(task_lib.encode_prompt(ex, ids) + task_lib.encode_answer(ex, gen_length, ids))
    x0 = torch.tensor(rows, dtype=torch.long)
    targets = torch.zeros_like(x0, dtype=torch.bool)
    targets[:, prompt_len:] = True
    return x0, targets


#: Training-only auxiliary task (not evaluated): a ``kv_retrieval`` prompt whose answer is
#: followed by every pair "key value." of the prompt again (in random order, at least
#: RECALL_EXTRA, repeats filling up to the batch's largest count), keys given and values to
#: predict. The answer of the question is one lookup per example; each recalled pair adds one
#: more (as multi-query associative recall does), reading "find the key I follow in the prompt,
#: copy the value after it", the routing the retrieval tasks need.
RECALL_TASK = "kv_recall"
RECALL_EXTRA = 3
_PAIR = re.compile(r"([a-z]{3}) ([A-Z][0-9][!#$%&*+@^~])\. ")


def _recall_batch(
    seeds: list[int], prompt_len: int, num_pairs: list[int] | None, ids: task_lib.TokenIds
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, target_rows = [], []
    examples = [
        task_lib.make_example(
            "kv_retrieval", s, prompt_len, **({} if num_pairs is None else {"num_pairs": n})
        )
        for s, n in zip(seeds, num_pairs or [None] * len(seeds))
    ]
    # Every row recalls the same number of pairs (equal lengths, no padding): all of its own
    # prompt's pairs in random order, then random repeats.
    count = max(RECALL_EXTRA, *(ex.num_pairs for ex in examples))
    for s, ex in zip(seeds, examples):
        pairs = _PAIR.findall(ex.prompt)
        rng = random.Random(s)
        rng.shuffle(pairs)
        recalled = pairs + [rng.choice(pairs) for _ in range(count - len(pairs))]
        # The answer, then the recalled pairs.
        text = ex.answer + ". "
        is_target = [True] * len(ex.answer) + [False] * 2
        for key, value in recalled:
            text += f"{key} {value}. "
            is_target += [False] * 4 + [True] * len(value) + [False] * 2
        rows.append(task_lib.encode_prompt(ex, ids) + task_lib.encode(text))
        target_rows.append([False] * prompt_len + is_target)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(target_rows, dtype=torch.bool)


def _is_dream(model: torch.nn.Module) -> bool:
    return getattr(model, "dllm_kind", "llada") == "dream"


def _is_block_causal(model: torch.nn.Module) -> bool:
    return getattr(model, "dllm_kind", "llada") == "llada2"


def token_logits(
    model: torch.nn.Module, x: torch.Tensor, block_length: int | None = None
) -> torch.Tensor:
    """Logits [B, L, V] of token ids x [B, L] whose row i predicts token i: the model's own for
    LLaDA and LLaDA2 (block-causal, blocks of ``block_length``, default
    ``LLADA2_BLOCK_LENGTH``); for a Dream model (``model.dllm_kind == "dream"``) the logits at
    i - 1, Dream's generation's concatenation, with row 0 repeating row 0 (no prediction of
    token 0)."""
    if _is_block_causal(model):
        return model(x, block_length=block_length or LLADA2_BLOCK_LENGTH).logits
    logits = model(x).logits
    if _is_dream(model):
        logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
    return logits


def masked_diffusion_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    targets: torch.Tensor,
    mask_id: int,
    generator: torch.Generator,
    eps: float = 1e-3,
    full_mask_frac: float = 0.0,
    *,
    prompt_mask_prob: float = 0.0,
    return_exact: bool = False,
    block_length: int | None = None,
):
    """LLaDA's masked-diffusion loss on a batch x0 [B, L] (``block_length``: a LLaDA2 model's
    block-causal attention, see ``token_logits``).

    Per row t (stratified over the batch, or 1 for the first ``round(full_mask_frac * B)`` rows);
    each position of ``targets`` (bool [B, L]) is masked with probability
    p_mask = (1 - eps) t + eps; the cross-entropy of the masked positions, weighted by 1 / p_mask,
    is summed and divided by the number of target positions.

    prompt_mask_prob: in the rows with t < 1, also mask each prompt token (every position before
    the row's first target, BOS excepted) with this probability and add the mean cross-entropy
    of the masked prompt tokens to the loss: masked-LM pretraining of the prompt, next to the
    SFT objective. It is what makes the key-value lookup trainable: predicting a key's letters
    from their neighbours builds the previous-token heads that the lookup composes with (see
    TRAINING.md; without it no run got past copying some code of the prompt).

    return_exact: also return the fraction of the t = 1 rows whose every target token is the
    argmax (one-shot exact match, a cheap training-accuracy signal; None without such rows).

    The prediction of token i is the model's logits at position i for LLaDA, and at position
    i - 1 for a Dream model (``model.dllm_kind == "dream"``: Dream predicts the next token, as
    its autoregressive initialisation did), so there position 0 cannot be a target.
    """
    B, L = x0.shape
    # Stratified t (one uniform draw shifted evenly over the rows): the same distribution as B
    # independent draws, less variance, which matters with the 1 / p_mask weights.
    u = torch.rand(1, generator=generator)
    t = ((u + torch.arange(B) / B) % 1.0)[:, None]
    n_full = round(full_mask_frac * B)
    t[:n_full] = 1.0
    p_mask = (1 - eps) * t + eps  # [B, 1]
    masked = (torch.rand(B, L, generator=generator) < p_mask) & targets
    masked[:n_full] = targets[:n_full]
    prompt_masked = torch.zeros_like(targets)
    if prompt_mask_prob > 0:
        prompt = targets.long().cumsum(1) == 0
        prompt[:, 0] = False
        prompt[:n_full] = False
        prompt_masked = prompt & (torch.rand(B, L, generator=generator) < prompt_mask_prob)
    xt = torch.where(masked | prompt_masked, torch.full_like(x0, mask_id), x0)
    if _is_dream(model) and targets[:, 0].any():
        raise ValueError("targets: position 0 has no prediction in a Dream model")
    logits = token_logits(model, xt, block_length)  # [B, L, V]
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # [B, L]
    loss = (ce * masked / p_mask).sum() / targets.sum()
    if prompt_masked.any():
        loss = loss + (ce * prompt_masked).sum() / prompt_masked.sum()
    if not return_exact:
        return loss
    exact = None
    if n_full:
        with torch.no_grad():
            hit = (logits[:n_full].argmax(-1) == x0[:n_full]) | ~targets[:n_full]
            exact = float(hit.all(1).float().mean())
    return loss, exact


def routing_probe(
    model: torch.nn.Module,
    task: str = "kv_retrieval",
    pair_counts: tuple[int, ...] = (1, 2, 3, 4),
    n: int = 64,
) -> dict[int, float]:
    """One-shot exact match (every answer token the argmax of one fully masked pass) on ``n``
    held-out ("calib" split) ``task`` prompts per number of key-value pairs. The training
    log's running exact match mixes pair counts; this separates copying from routing: a model
    that copies some code of the prompt without reading the question scores 1 with one pair and
    about 1 / pairs (a consistent code) or 1 / pairs**3 (each of the 3 answer tokens from any
    code) with more, while routing through the question keeps it near 1."""
    ids = task_lib.token_ids(model.config)
    prompt_len = max(72, 14 + 11 * max(pair_counts))  # room for the most pairs (_num_pairs)
    seeds = list(range(task_lib.SPLIT_SEEDS["calib"], task_lib.SPLIT_SEEDS["calib"] + n))
    gen_length = max(TrainConfig.gen_length, task_lib.TASK_GEN_LENGTH.get(task, 0))
    out = {}
    with torch.no_grad():
        for count in pair_counts:
            x0, targets = make_batch(task, seeds, prompt_len, gen_length, [count] * n, ids)
            _, exact = masked_diffusion_loss(
                model, x0, targets, ids.mask, torch.Generator().manual_seed(0),
                full_mask_frac=1.0, return_exact=True,
            )  # fmt: skip
            out[count] = exact
    return out


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min((step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1), 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _max_len_at(step: int, cfg: TrainConfig) -> int:
    ramp = min(step / max(cfg.curriculum * cfg.steps, 1), 1.0)
    return round(cfg.min_prompt_len + ramp * (cfg.max_prompt_len - cfg.min_prompt_len))


def _num_pairs(
    task: str, prompt_len: int, rng: random.Random, cap: int | None = None
) -> int | None:
    """Curriculum draw of the key-value pairs of a retrieval prompt: uniform in
    [most // 3, most] with ``most`` the task's maximum at this length (and at most ``cap``):
    fewer than the evaluated minimum of 16 on short prompts, which teach the lookup cheaply."""
    if task not in task_lib.RETRIEVAL_TASKS and task != RECALL_TASK:
        return None
    # A pair is 9 characters and the question up to 13: (prompt_len - 14) // 11 pairs leave
    # some filler on the shortest prompts.
    most = min(task_lib.kv_pairs_range(prompt_len)[1], (prompt_len - 14) // 11)
    if cap is not None:
        most = min(most, cap)
    least = 3 if task == "multi_needle" else 1
    most = max(most, least)
    return rng.randint(max(least, most // 3), most)


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """A freshly initialised model of ``cfg.kind`` and ``cfg.model``'s shape
    (``maskkv.testing.random_model``)."""
    from maskkv.testing import random_model

    cfg.check_model_names()  # ``model`` may have been edited after construction
    return random_model(cfg.kind, seed=cfg.seed, **cfg.model).train()


def _init_state(init_from: str | Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``init_from``/model.safetensors for ``model``; LLaDA-layout weights for a
    Dream- or LLaDA2-layout model are converted (``convert.dream_state_from_llada`` /
    ``llada2_state_from_llada``, which need the LLaDA config.json next to them)."""
    from safetensors.torch import load_file

    from . import convert

    path = Path(init_from)
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"init_from: expected a directory holding model.safetensors, got {path}")
    state = load_file(str(path / "model.safetensors"))
    kind = getattr(model, "dllm_kind", "llada")
    if kind != "llada" and convert.is_llada_state(state):
        if not (path / "config.json").is_file():
            raise ValueError(
                f"init_from: converting LLaDA weights to the {kind} layout needs their "
                f"config.json in {path}"
            )
        from maskkv.models import LLaDAConfig

        llada_config = LLaDAConfig.from_pretrained(str(path))
        if kind == "dream":
            state = convert.dream_state_from_llada(state, llada_config, model.config)
        else:
            state = convert.llada2_state_from_llada(state, llada_config, model.config)
    return state


def train(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    log_every: int = 100,
    checkpoint: str | Path | None = None,
    checkpoint_minutes: float = 5.0,
    stop_after: int | None = None,
    stop_at: int | None = None,
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train from scratch, or resume from ``checkpoint``; returns (model in eval mode, log rows).

    Log rows: step, lr, minutes, prompt_len (the batch's), max_len (the curriculum's longest
    prompt) and per task ``loss_<task>`` and ``exact_<task>``, exponential averages over that
    task's recent batches (exact: one-shot exact match of the fully masked rows). Seeded
    throughout (model init, the "train" split's example seeds, prompt lengths, masks); bitwise
    reproducibility across machines and thread counts is not promised (float reductions differ).

    checkpoint: a file; when it exists the run resumes from it (model, optimizer, step, random
    states, curriculum, log), and the state is written there every ``checkpoint_minutes`` and at
    the end, so an interrupted run continues where it stopped. stop_after: run at most this many
    steps in this call (the schedule still spans ``cfg.steps``). stop_at: stop once the run
    has made this many steps in all (a resumed run stops at the same step as an uninterrupted one).
    """
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    checkpoint = None if checkpoint is None else Path(checkpoint)
    resuming = checkpoint is not None and checkpoint.exists()
    if cfg.init_from and not resuming:  # a resumed run has its own weights
        model.load_state_dict(_init_state(cfg.init_from, model))
    ids = task_lib.token_ids(model.config)
    # No weight decay on norms and embeddings (the usual transformer recipe; "wte" is LLaDA's
    # embedding, "embed_tokens" Dream's).
    named = list(model.named_parameters())
    is_embedding = [("wte" in n or "embed_tokens" in n or "word_embeddings" in n) for n, _ in named]
    decay = [p for (_, p), emb in zip(named, is_embedding) if p.dim() >= 2 and not emb]
    no_decay = [p for (_, p), emb in zip(named, is_embedding) if p.dim() < 2 or emb]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    next_seed = task_lib.SPLIT_SEEDS["train"] + cfg.seed * 10**8
    log: list[dict[str, float]] = []
    running: dict[str, float] = {}
    exact: dict[str, float] = {}
    adaptive = cfg.schedule == "adaptive"
    if cfg.schedule not in ("linear", "adaptive"):
        raise ValueError(f"schedule: expected 'linear' or 'adaptive', got {cfg.schedule!r}")
    level, level_step = cfg.start_level, 0
    max_len = min(cfg.min_prompt_len + cfg.adaptive_step * level, cfg.max_prompt_len)
    first_step, minutes_before = 0, 0.0
    if resuming:
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        gen.set_state(state["generator"])
        first_step, next_seed, max_len = state["step"], state["next_seed"], state["max_len"]
        running, exact, log = state["running"], state["exact"], state["log"]
        level, level_step = state.get("level", 1), state.get("level_step", 0)
        minutes_before = log[-1]["minutes"] if log else 0.0

    def save_state(step: int) -> None:
        if checkpoint is None:
            return
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "config": dataclasses.asdict(cfg),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": rng.getstate(),
            "generator": gen.get_state(),
            "step": step,
            "next_seed": next_seed,
            "max_len": max_len,
            "level": level,
            "level_step": level_step,
            "running": running,
            "exact": exact,
            "log": log,
        }
        torch.save(state, checkpoint.with_suffix(".tmp"))
        checkpoint.with_suffix(".tmp").replace(checkpoint)  # never a half-written checkpoint

    t_start = time.perf_counter()
    last_save = t_start
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    bar = tqdm(
        range(first_step, end),
        desc="training",
        unit="step",
        disable=not progress,
        initial=first_step,
        total=cfg.steps,
    )
    step = first_step
    for step in bar:
        task = cfg.tasks[step % len(cfg.tasks)]
        longest = max_len if adaptive else _max_len_at(step, cfg)
        prompt_len = rng.randint(cfg.min_prompt_len, longest)
        gen_length = max(cfg.gen_length, task_lib.TASK_GEN_LENGTH.get(task, 0))
        if cfg.kind == "llada2":
            # LLaDA2 decodes whole blocks: the answer's block is filled up with EOS, as
            # generation fills it (the padding is a target, as in LLaDA's SFT).
            gen_length += -(prompt_len + gen_length) % cfg.block_length
        seeds = list(range(next_seed, next_seed + cfg.batch_size))
        next_seed += cfg.batch_size
        pairs = None
        if task in task_lib.RETRIEVAL_TASKS or task == RECALL_TASK:
            cap = level if adaptive else None
            pairs = [_num_pairs(task, prompt_len, rng, cap) for _ in seeds]
        x0, targets = make_batch(task, seeds, prompt_len, gen_length, pairs, ids)
        lr = _lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, batch_exact = masked_diffusion_loss(
            model,
            x0,
            targets,
            ids.mask,
            gen,
            cfg.eps,
            full_mask_frac=cfg.full_mask_frac,
            prompt_mask_prob=cfg.prompt_mask_prob,
            return_exact=True,
            block_length=cfg.block_length,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        # Running loss per task: the tasks may learn at different speeds, and one mixed average
        # would hide a stuck one.
        value = loss.item()
        old = running.get(task)
        running[task] = value if old is None else 0.95 * old + 0.05 * value
        if batch_exact is not None:
            old = exact.get(task)
            exact[task] = batch_exact if old is None else 0.9 * old + 0.1 * batch_exact
        # The auxiliary kv_recall row is exact only when all of its pairs are, which grows
        # harsher with every level: the evaluated tasks alone decide.
        gate = [t for t in cfg.tasks if t != RECALL_TASK and (t != "multi_needle" or level >= 4)]
        gate = gate or [RECALL_TASK]
        if (
            adaptive
            and step - level_step >= cfg.adaptive_min_steps
            and (max_len < cfg.max_prompt_len or level < task_lib.kv_pairs_range(max_len)[1])
            and all(t in exact for t in gate)
            and min(exact[t] for t in gate) >= cfg.adaptive_threshold
        ):
            level, level_step = level + 1, step
            max_len = min(cfg.min_prompt_len + cfg.adaptive_step * level, cfg.max_prompt_len)
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()} | {"P": prompt_len})
        now = time.perf_counter()
        minutes = minutes_before + (now - t_start) / 60
        done = cfg.max_minutes is not None and minutes > cfg.max_minutes
        done = done or (stop_after is not None and step + 1 - first_step >= stop_after)
        done = done or step + 1 == end
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps or done:
            log.append(
                {
                    "step": step + 1,
                    "lr": lr,
                    "minutes": minutes,
                    "prompt_len": prompt_len,
                    "max_len": longest,
                    "level": level,
                }
                | {f"loss_{k}": v for k, v in running.items()}
                | {f"exact_{k}": v for k, v in exact.items()}
            )
            if not progress:  # background runs: one JSON line per log row
                print(json.dumps(log[-1]), flush=True)
        if now - last_save > 60 * checkpoint_minutes:
            save_state(step + 1)
            last_save = now
        if done:
            break
    bar.close()
    save_state(step + 1 if end > first_step else first_step)
    return model.eval(), log


def calibrate_profile(model: torch.nn.Module, cfg: TrainConfig, per_task: int = 16):
    """MaskKV's layer-importance profile (``maskkv.calibrate.calibrate``) on ``per_task`` prompts
    of every task from the "calib" split (training distribution, held out from training and
    test), at the evaluated prompt length."""
    from maskkv.calibrate import calibrate

    n = cfg.max_prompt_len
    ids = task_lib.token_ids(model.config)
    rng = random.Random(cfg.seed)
    prompts = []
    evaluated = [t for t in cfg.tasks if t in task_lib.TASKS]
    for task in evaluated:
        base = task_lib.SPLIT_SEEDS["calib"]
        for i in range(per_task):
            # Below a retrieval task's evaluated minimum (tiny test runs) use the curriculum's
            # pair counts, as training did.
            kw = {}
            if task in task_lib.RETRIEVAL_TASKS and n < task_lib.TASK_MIN_PROMPT_LEN[task]:
                kw = {"num_pairs": _num_pairs(task, n, rng)}
            ex = task_lib.make_example(task, base + i, n, **kw)
            prompts.append(torch.tensor(task_lib.encode_prompt(ex, ids)))
    gen_length = max([cfg.gen_length, *(task_lib.TASK_GEN_LENGTH[t] for t in evaluated)])
    profile = calibrate(model, prompts, gen_length=gen_length)
    profile.meta.update({"tasks": evaluated, "split": "calib", "prompt_len": cfg.max_prompt_len})
    return profile


def save(model: torch.nn.Module, path: str | Path, cfg: TrainConfig, log: list[dict]) -> Path:
    """Write the checkpoint in the official file layout of ``cfg.kind`` (LLaDA or Dream):
    config.json and the tokenizer files of ``maskkv.testing.tiny_checkpoint``, model.safetensors with the trained weights (fp32, the
    official tensor names), train_log.json (config and loss curve) and maskkv_profile.json
    (``calibrate_profile``)."""
    from safetensors.torch import save_file

    from maskkv.testing import tiny_checkpoint

    path = Path(path)
    # tiny_checkpoint writes config.json + tokenizer files + random weights of this shape; the
    # weights are then replaced by the trained ones under the same names.
    tiny_checkpoint(cfg.kind, path, seed=cfg.seed, **cfg.model)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    record = {"config": dataclasses.asdict(cfg), "log": log}
    (path / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")
    calibrate_profile(model.eval(), cfg).save(path)
    return path


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """The ``TrainConfig`` recorded in a checkpoint or train_log.json."""
    d = dict(d)
    d["tasks"] = tuple(d["tasks"])
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in known})


def _load_checkpoint_model(
    checkpoint: str | Path,
) -> tuple[torch.nn.Module, TrainConfig, dict[str, Any]]:
    """(model in eval mode, its config, the whole training state) of a training checkpoint."""
    state = torch.load(checkpoint, weights_only=False)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the model of a (possibly unfinished) training checkpoint as an asset directory
    (``save``), with the log so far; the checkpoint itself is untouched, so training resumes."""
    model, cfg, state = _load_checkpoint_model(checkpoint)
    return save(model, out, cfg, state["log"])


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=None, help="checkpoint directory to write (required unless --probe)"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--min-prompt-len", type=int, default=defaults.min_prompt_len)
    parser.add_argument("--max-prompt-len", type=int, default=defaults.max_prompt_len)
    parser.add_argument("--full-mask-frac", type=float, default=defaults.full_mask_frac)
    parser.add_argument(
        "--prompt-mask", type=float, default=defaults.prompt_mask_prob,
        help="masked-LM probability of prompt tokens in the t < 1 rows (0: plain SFT)",
    )  # fmt: skip
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--tasks", default=",".join(defaults.tasks))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop after this many steps in all (the cosine schedule still spans --steps)",
    )
    parser.add_argument("--schedule", default=defaults.schedule, choices=("linear", "adaptive"))
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument(
        "--start-level", type=int, default=defaults.start_level,
        help="adaptive schedule: first level (max pairs per retrieval prompt)",
    )  # fmt: skip
    parser.add_argument(
        "--init-from",
        default=None,
        help="checkpoint directory (same shape) to start from; with --kind dream it may hold a "
        "LLaDA-layout model, converted (maskkv.quality.convert)",
    )
    parser.add_argument(
        "--kind", default="llada", choices=KINDS,
        help="model layout: llada (MHA), dream (GQA, shifted logits) or llada2 (GQA, MoE, "
        "block-causal)",
    )  # fmt: skip
    parser.add_argument(
        "--block-length", type=int, default=defaults.block_length,
        help="llada2: block length of the block-causal attention",
    )  # fmt: skip
    parser.add_argument("--n-layers", type=int, default=MODEL_OVERRIDES["n_layers"])
    parser.add_argument("--d-model", type=int, default=MODEL_OVERRIDES["d_model"])
    parser.add_argument("--n-heads", type=int, default=MODEL_OVERRIDES["n_heads"])
    parser.add_argument(
        "--n-kv-heads", type=int, default=None,
        help="KV heads (GQA; a divisor of --n-heads); default: --n-heads for llada and "
        "llada2, --n-heads // 2 for dream",
    )  # fmt: skip
    parser.add_argument("--mlp", type=int, default=MODEL_OVERRIDES["mlp_hidden_size"])
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="resumable training state (.pt): resumed from when it exists, rewritten every "
        "--checkpoint-minutes (keep it out of git)",
    )
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument(
        "--probe", action="store_true",
        help="print --checkpoint's routing_probe (exact match by pairs in the prompt) and exit",
    )  # fmt: skip
    parser.add_argument(
        "--export-only",
        action="store_true",
        help="write --out from --checkpoint as it stands, without training",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (background runs)"
    )
    args = parser.parse_args(argv)
    unknown = set(args.tasks.split(",")) - set(task_lib.TASKS) - {RECALL_TASK}
    if unknown:
        parser.error(f"--tasks: unknown {sorted(unknown)}; known: {[*task_lib.TASKS, RECALL_TASK]}")
    if args.start_level < 1:
        parser.error(f"--start-level: expected >= 1, got {args.start_level}")
    needs_checkpoint = args.probe or args.export_only
    if needs_checkpoint and (not args.checkpoint or not Path(args.checkpoint).is_file()):
        parser.error(f"--checkpoint: no checkpoint at {args.checkpoint!r}")
    if args.probe:
        model, _, state = _load_checkpoint_model(args.checkpoint)
        print(f"step {state['step']}: one-shot exact match by key-value pairs in the prompt")
        for task in ("kv_retrieval", "kv_retrieval_qfirst"):
            for pairs, exact in routing_probe(model, task).items():
                print(
                    f"  {task:<20} {pairs} pair{'s' * (pairs > 1)}: {exact:.2f} (copying "
                    "without routing: "
                    f"{1 / pairs:.2f} consistent, {1 / pairs**3:.2f} per token)"
                )
        return
    if args.out is None:
        parser.error("--out: required (the checkpoint directory to write)")
    if args.export_only:
        print(f"wrote {export_checkpoint(args.checkpoint, args.out)}")
        return
    try:
        shape = model_overrides(
            args.kind,
            n_layers=args.n_layers,
            d_model=args.d_model,
            n_heads=args.n_heads,
            n_kv_heads=args.n_kv_heads,
            mlp=args.mlp,
        )
    except ValueError as err:
        parser.error(str(err))
    cfg = TrainConfig(
        kind=args.kind,
        tasks=tuple(args.tasks.split(",")),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_prompt_len=args.min_prompt_len,
        max_prompt_len=args.max_prompt_len,
        full_mask_frac=args.full_mask_frac,
        prompt_mask_prob=args.prompt_mask,
        weight_decay=args.weight_decay,
        seed=args.seed,
        threads=args.threads,
        max_minutes=args.max_minutes,
        schedule=args.schedule,
        warmup=args.warmup,
        start_level=args.start_level,
        init_from=args.init_from,
        block_length=args.block_length,
        model=shape,
    )
    model, log = train(
        cfg,
        progress=not args.no_progress,
        log_every=args.log_every,
        checkpoint=args.checkpoint,
        checkpoint_minutes=args.checkpoint_minutes,
        stop_at=args.stop_at,
    )
    path = save(model, args.out, cfg, log)
    last = log[-1]
    losses = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("loss_"))
    print(f"wrote {path}: step {last['step']}, {last['minutes']:.1f} min, {losses}")


if __name__ == "__main__":
    main()
