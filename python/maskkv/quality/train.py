"""Train the quality suite's tiny LLaDA on the synthetic tasks with LLaDA's masked-diffusion SFT
objective, on the CPU, in minutes.

Objective (LLaDA SFT, Nie et al. 2025): for a prompt p and answer r0 (padded with EOS to
``gen_length``), draw t, mask every answer token independently with probability
p_mask = (1 - eps) t + eps, and minimise the cross-entropy of the masked tokens weighted by
1 / p_mask, averaged over the answer positions. The prompt is never masked (SFT; inference starts
from a clean prompt).

One deviation, for speed: t ~ U(0, 1) for a fraction ``1 - full_mask_frac`` of the rows, and
t = 1 (every answer token masked, weight 1) for the others. t = 1 is the state generation starts
from; in short CPU runs the pure U(0, 1) draw, whose 1/t weights make the loss very noisy on
3-token answers, learned the retrieval markedly slower (one-shot exact match 8% after 1000 steps,
against 56% after 600 steps with t = 1 only; those two runs also differed in the task mix).

Curriculum: the prompt length is drawn per batch from [min_prompt_len, L(step)], L growing
linearly from min_prompt_len to max_prompt_len over the first ``curriculum`` fraction of the
steps: short prompts are cheap and teach the retrieval, the long ones make it hold at the
evaluated length.

    python -m maskkv.quality.train --out python/maskkv/assets/tiny-llada-retrieval

>>> from maskkv.quality.train import TrainConfig, train
>>> model, log = train(TrainConfig(steps=50))                                     # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import tasks as task_lib

__all__ = [
    "MODEL_OVERRIDES",
    "TrainConfig",
    "build_model",
    "calibrate_profile",
    "make_batch",
    "masked_diffusion_loss",
    "save",
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


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the asset's train_log.json)."""

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
    gen_length: int = 8
    min_prompt_len: int = 40
    max_prompt_len: int = task_lib.DEFAULT_PROMPT_LEN
    curriculum: float = 0.5
    seed: int = 0
    threads: int = 1  # more threads only pay on an idle machine
    max_minutes: float | None = None  # stop early (the cosine schedule still assumes `steps`)
    model: dict[str, Any] = field(default_factory=lambda: dict(MODEL_OVERRIDES))


def make_batch(
    task: str, seeds: list[int], prompt_len: int, gen_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """An SFT batch: token ids x0 [B, prompt_len + gen_length] = prompt || answer (EOS-padded),
    and the bool mask of the positions that may be masked (the answer)."""
    rows = []
    for s in seeds:
        ex = task_lib.make_example(task, s, prompt_len)
        rows.append(task_lib.encode_prompt(ex) + task_lib.encode_answer(ex, gen_length))
    x0 = torch.tensor(rows, dtype=torch.long)
    targets = torch.zeros_like(x0, dtype=torch.bool)
    targets[:, prompt_len:] = True
    return x0, targets


def masked_diffusion_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    targets: torch.Tensor,
    mask_id: int,
    generator: torch.Generator,
    eps: float = 1e-3,
    full_mask_frac: float = 0.0,
) -> torch.Tensor:
    """LLaDA's masked-diffusion loss on a batch x0 [B, L].

    Per row t (stratified over the batch, or 1 for the first ``round(full_mask_frac * B)`` rows);
    each position of ``targets`` (bool [B, L]) is masked with probability
    p_mask = (1 - eps) t + eps; the cross-entropy of the masked positions, weighted by 1 / p_mask,
    is summed and divided by the number of target positions.
    """
    B, L = x0.shape
    # Stratified t (one uniform draw shifted evenly over the rows): the same distribution as B
    # independent draws, less variance, which matters with the 1 / p_mask weights.
    u = torch.rand(1, generator=generator)
    t = ((u + torch.arange(B) / B) % 1.0)[:, None]
    t[: round(full_mask_frac * B)] = 1.0
    p_mask = (1 - eps) * t + eps  # [B, 1]
    masked = (torch.rand(B, L, generator=generator) < p_mask) & targets
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = model(xt).logits
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # [B, L]
    return (ce * masked / p_mask).sum() / targets.sum()


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min((step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1), 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _max_len_at(step: int, cfg: TrainConfig) -> int:
    ramp = min(step / max(cfg.curriculum * cfg.steps, 1), 1.0)
    return round(cfg.min_prompt_len + ramp * (cfg.max_prompt_len - cfg.min_prompt_len))


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """A freshly initialised LLaDA of the asset's shape (``maskkv.testing.random_model``)."""
    from maskkv.testing import random_model

    return random_model("llada", seed=cfg.seed, **cfg.model).train()


def train(
    cfg: TrainConfig, *, progress: bool = True, log_every: int = 100
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train from scratch; returns (model in eval mode, log rows).

    Log rows: step, lr, minutes, prompt_len (the batch's) and ``loss_<task>``, an exponential
    average over that task's recent batches. Seeded throughout (model init, the "train" split's
    example seeds, prompt lengths, masks); bitwise reproducibility across machines and thread
    counts is not promised (float reductions differ).
    """
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    mask_id = model.config.mask_token_id
    # No weight decay on norms and embeddings (the usual transformer recipe).
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "wte" in n]
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
    t_start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="training", unit="step", disable=not progress)
    for step in bar:
        task = cfg.tasks[step % len(cfg.tasks)]
        prompt_len = rng.randint(cfg.min_prompt_len, _max_len_at(step, cfg))
        seeds = list(range(next_seed, next_seed + cfg.batch_size))
        next_seed += cfg.batch_size
        x0, targets = make_batch(task, seeds, prompt_len, cfg.gen_length)
        lr = _lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = masked_diffusion_loss(
            model, x0, targets, mask_id, gen, cfg.eps, full_mask_frac=cfg.full_mask_frac
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
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()} | {"P": prompt_len})
        minutes = (time.perf_counter() - t_start) / 60
        done = cfg.max_minutes is not None and minutes > cfg.max_minutes
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps or done:
            log.append(
                {"step": step + 1, "lr": lr, "minutes": minutes, "prompt_len": prompt_len}
                | {f"loss_{k}": v for k, v in running.items()}
            )
        if done:
            break
    bar.close()
    return model.eval(), log


def calibrate_profile(model: torch.nn.Module, cfg: TrainConfig, per_task: int = 16):
    """MaskKV's layer-importance profile (``maskkv.calibrate.calibrate``) on ``per_task`` prompts
    of every task from the "calib" split (training distribution, held out from training and
    test), at the evaluated prompt length."""
    from maskkv.calibrate import calibrate

    prompts = [
        torch.tensor(task_lib.encode_prompt(ex))
        for task in cfg.tasks
        for ex in task_lib.make_examples(
            task, per_task, split="calib", prompt_len=cfg.max_prompt_len
        )
    ]
    profile = calibrate(model, prompts, gen_length=cfg.gen_length)
    profile.meta.update(
        {"tasks": list(cfg.tasks), "split": "calib", "prompt_len": cfg.max_prompt_len}
    )
    return profile


def save(model: torch.nn.Module, path: str | Path, cfg: TrainConfig, log: list[dict]) -> Path:
    """Write the checkpoint in the official LLaDA file layout: config.json and the tokenizer files
    of ``maskkv.testing.tiny_checkpoint``, model.safetensors with the trained weights (fp32, the
    official tensor names), train_log.json (config and loss curve) and maskkv_profile.json
    (``calibrate_profile``)."""
    from safetensors.torch import save_file

    from maskkv.testing import tiny_checkpoint

    path = Path(path)
    # tiny_checkpoint writes config.json + tokenizer files + random weights of this shape; the
    # weights are then replaced by the trained ones under the same names.
    tiny_checkpoint("llada", path, seed=cfg.seed, **cfg.model)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    record = {"config": dataclasses.asdict(cfg), "log": log}
    (path / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")
    calibrate_profile(model.eval(), cfg).save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--min-prompt-len", type=int, default=defaults.min_prompt_len)
    parser.add_argument("--max-prompt-len", type=int, default=defaults.max_prompt_len)
    parser.add_argument("--full-mask-frac", type=float, default=defaults.full_mask_frac)
    parser.add_argument("--tasks", default=",".join(defaults.tasks))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--max-minutes", type=float, default=None)
    args = parser.parse_args(argv)
    cfg = TrainConfig(
        tasks=tuple(args.tasks.split(",")),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_prompt_len=args.min_prompt_len,
        max_prompt_len=args.max_prompt_len,
        full_mask_frac=args.full_mask_frac,
        seed=args.seed,
        threads=args.threads,
        max_minutes=args.max_minutes,
    )
    model, log = train(cfg)
    path = save(model, args.out, cfg, log)
    last = log[-1]
    losses = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("loss_"))
    print(f"wrote {path}: step {last['step']}, {last['minutes']:.1f} min, {losses}")


if __name__ == "__main__":
    main()
