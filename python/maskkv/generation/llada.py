"""LLaDA's sampler: semi-autoregressive blocks with low-confidence (or random) remasking.

Follows the official LLaDA ``generate``: the response is split into blocks of
``block_length``; each block gets ``steps // num_blocks`` steps; the number of tokens revealed per
step is the block's masked count split evenly, the remainder on the first steps; positions after
the current block get -inf confidence; Gumbel-max sampling runs in float64 when
``temperature > 0``; classifier-free guidance replaces the prompt by masks in a second batch half.

With an adaptive decoding rule (``Threshold``, ``Factor``) a block runs until it has no mask left,
as Fast-dLLM's loops do; the rule decides how many tokens each step reveals, the confidence
ranking which ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .decoding import DecodingRule, FixedSteps, select_top

__all__ = ["add_gumbel_noise", "num_transfer_tokens", "sample_llada"]


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """Gumbel-max in float64: low precision Gumbel noise degrades sample quality (LLaDA paper)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def num_transfer_tokens(block_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """int64 [B, steps]: tokens to reveal at each step, remainder on the first steps."""
    masked = block_mask.sum(1, keepdim=True)
    base, rem = masked // steps, masked % steps
    out = base.expand(-1, steps).clone()
    out += (torch.arange(steps, device=block_mask.device)[None] < rem).long()
    return out


def sample_llada(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prompt: torch.Tensor,
    *,
    mask_id: int,
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
    progress: Callable[[], None] | None = None,
    decoding: DecodingRule | None = None,
    on_reveal: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """Returns token ids [B, P + gen_length].

    ``denoise(x, need)`` returns logits [n, V] of the response positions ``need`` (bool [B, R])
    of sequence ``x``; with ``cfg_scale > 0`` it receives the conditional and unconditional
    halves stacked along the batch. When ``denoise`` has a ``begin_block(lo, hi)`` method it is
    called at each block start (response coordinates). ``decoding``: the rule deciding how many
    tokens a step reveals (default ``FixedSteps()``); ``on_reveal(n)`` gets the mean number of
    tokens revealed per row after each step.
    """
    rule = decoding if decoding is not None else FixedSteps()
    begin_block = getattr(denoise, "begin_block", None)
    if gen_length % block_length:
        raise ValueError(
            f"block_length: expected a divisor of gen_length={gen_length}, got {block_length}"
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps: expected a multiple of the number of blocks ({num_blocks}), got {steps}"
        )
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking: expected 'low_confidence' or 'random', got {remasking!r}")
    steps_per_block = steps // num_blocks
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    for nb in range(num_blocks):
        lo, hi = nb * block_length, (nb + 1) * block_length  # response coordinates
        transfer = num_transfer_tokens(x[:, P + lo : P + hi] == mask_id, steps_per_block)
        if begin_block is not None:
            begin_block(lo, hi)
        i = 0
        while i < steps_per_block if rule.fixed else bool((x[:, P + lo : P + hi] == mask_id).any()):
            resp = x[:, P:]
            # Logits are needed only at masked positions of the current block: the others either
            # keep their token or carry -inf confidence.
            need = resp == mask_id
            need[:, :lo] = False
            need[:, hi:] = False
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[:, :P] = mask_id
                both = denoise(torch.cat([x, un_x]), torch.cat([need, need]))
                cond, uncond = both.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = denoise(x, need)
            x0 = add_gumbel_noise(logits, temperature, generator).argmax(-1)
            if remasking == "low_confidence":
                p = torch.softmax(logits.double(), -1)
                conf = torch.gather(p, -1, x0[:, None])[:, 0]
            else:
                conf = torch.rand(
                    x0.shape, dtype=torch.float64, device=x.device, generator=generator
                )
            full_conf = torch.full(need.shape, -torch.inf, dtype=torch.float64, device=x.device)
            full_conf[need] = conf
            cand = torch.full(need.shape, mask_id, dtype=torch.long, device=x.device)
            cand[need] = x0
            masked_before = need.sum()
            if rule.fixed:
                for b in range(B):  # per-row counts differ with padding-free but uneven masks
                    n = int(transfer[b, i])
                    if n:
                        idx = torch.topk(full_conf[b], n).indices
                        x[b, P + idx] = cand[b, idx]
            else:
                # The rules count tokens by probability (Fast-dLLM's threshold/factor); with
                # random remasking the ranking stays random.
                if remasking == "low_confidence":
                    prob = full_conf
                else:
                    prob = torch.zeros(need.shape, dtype=torch.float64, device=x.device)
                    prob[need] = torch.softmax(logits.double(), -1).gather(-1, x0[:, None])[:, 0]
                count = rule.count(prob, need)
                chosen = select_top(full_conf, count)
                x[:, P:][chosen] = cand[chosen]
            if on_reveal is not None:
                revealed = masked_before - (x[:, P + lo : P + hi] == mask_id).sum()
                on_reveal(float(revealed) / B)
            if progress is not None:
                progress()
            i += 1
    return x
