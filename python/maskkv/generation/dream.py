"""Dream's sampler: shifted logits and the ``origin`` / ``maskgit_plus`` / ``topk_margin`` /
``entropy`` algorithms of Dream's ``diffusion_generate``.

Dream predicts token i from position i - 1 (the denoiser handles the shift). Timesteps run
``linspace(1, eps, steps + 1)``; at step i a fraction 1 - s/t of the masked tokens is revealed.

Block-wise decoding (Fast-dLLM's ``generation_utils_block.py``): with ``block_length`` <
``gen_length`` the response is decoded block by block, each block getting ``steps // num_blocks``
steps of the same schedule over its own masks (positions after the block are not revealed);
``block_length = gen_length`` (the default) is Dream's original loop. Unlike Fast-dLLM, the block
start pass reveals by the same rule as the other steps (Fast-dLLM forces the block's first token).
With an adaptive rule (``Threshold``, ``Factor``) a block runs until it has no mask left.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .decoding import DecodingRule, FixedSteps, select_top

__all__ = ["sample_dream", "sample_tokens"]

ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, -1), -1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    margin_confidence: bool = False,
    neg_entropy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence [n], token [n]) from logits [n, V]."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p(logits, top_p)
    if top_k is not None:
        logits = _top_k(logits, top_k)
    probs = torch.softmax(logits, -1)
    if temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=generator)[:, 0]
        confidence = torch.gather(probs, -1, x0[:, None])[:, 0]
    else:
        confidence, x0 = probs.max(-1)
    if margin_confidence:
        top2 = torch.topk(probs, 2, -1).values
        confidence = top2[:, 0] - top2[:, 1]
    if neg_entropy:
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return confidence, x0


def sample_dream(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prompt: torch.Tensor,
    *,
    mask_id: int,
    gen_length: int,
    steps: int,
    temperature: float = 0.0,
    alg: str = "entropy",
    alg_temp: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    progress: Callable[[], None] | None = None,
    block_length: int | None = None,
    decoding: DecodingRule | None = None,
    on_reveal: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """Returns token ids [B, P + gen_length]; ``denoise(x, need)``, ``decoding`` and
    ``on_reveal`` as in the LLaDA sampler; ``block_length`` defaults to ``gen_length``."""
    if alg not in ALGORITHMS:
        raise ValueError(f"alg: expected one of {ALGORITHMS}, got {alg!r}")
    block_length = gen_length if block_length is None else block_length
    if not isinstance(block_length, int) or block_length < 1 or gen_length % block_length:
        raise ValueError(
            f"block_length: expected a divisor of gen_length={gen_length}, got {block_length}"
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps: expected a multiple of the number of blocks ({num_blocks}), got {steps}"
        )
    rule = decoding if decoding is not None else FixedSteps()
    if not rule.fixed and alg_temp:
        raise ValueError(f"alg_temp: not supported with decoding={rule!r} (use FixedSteps)")
    begin_block = getattr(denoise, "begin_block", None)
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    for nb in range(num_blocks):
        lo, hi = nb * block_length, (nb + 1) * block_length
        if begin_block is not None:
            begin_block(lo, hi)
        _sample_block(
            denoise, x, P, lo, hi, steps // num_blocks, mask_id, temperature, alg, alg_temp,
            top_p, top_k, eps, generator, progress, rule, on_reveal,
        )  # fmt: skip
    return x


def _sample_block(
    denoise, x, P, lo, hi, steps, mask_id, temperature, alg, alg_temp, top_p, top_k, eps,
    generator, progress, rule, on_reveal,
) -> None:  # fmt: skip
    """Decode response positions [lo, hi) of ``x`` in place (Dream's schedule over the block)."""
    B = x.shape[0]
    timesteps = torch.linspace(1, eps, steps + 1)
    i = 0
    while i < steps if rule.fixed else bool((x[:, P + lo : P + hi] == mask_id).any()):
        need = x[:, P:] == mask_id
        need[:, :lo] = False
        need[:, hi:] = False
        if not need.any():
            if progress is not None:
                progress()
            i += 1
            continue
        masked_before = need.sum()
        logits = denoise(x, need)
        if not rule.fixed:
            _reveal_adaptive(x, P, need, logits, temperature, alg, top_p, top_k, generator, rule)
            if on_reveal is not None:
                on_reveal(float(masked_before - (x[:, P + lo : P + hi] == mask_id).sum()) / B)
            if progress is not None:
                progress()
            i += 1
            continue
        t, s = timesteps[i].item(), timesteps[i + 1].item()
        resp = x[:, P:]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1.0
            x0 = torch.full((logits.shape[0],), mask_id, dtype=torch.long, device=x.device)
            draw = torch.rand(x0.shape, device=x.device, generator=generator) < p_transfer
            if draw.any():
                x0[draw] = sample_tokens(
                    logits[draw], temperature, top_p, top_k, generator=generator
                )[1]
            resp[need] = x0
        else:
            confidence, x0 = sample_tokens(
                logits,
                temperature,
                top_p,
                top_k,
                margin_confidence=alg == "topk_margin",
                neg_entropy=alg == "entropy",
                generator=generator,
            )
            num_mask = need.sum().item() / B
            n = int(num_mask * (1 - s / t)) if i < steps - 1 else int(num_mask)
            full_conf = torch.full(need.shape, -torch.inf, dtype=logits.dtype, device=x.device)
            full_conf[need] = confidence
            if n > 0:
                if not alg_temp:
                    idx = torch.topk(full_conf, n).indices
                else:
                    idx = torch.multinomial(
                        F.softmax(full_conf / alg_temp, -1), n, generator=generator
                    )
                # Positions with -inf confidence (a row with fewer masks than n) keep their token.
                cand = resp.clone()
                cand[need] = x0
                rows = torch.arange(B, device=x.device)[:, None].expand_as(idx)
                resp[rows, idx] = cand[rows, idx]
        x[:, P:] = resp
        if on_reveal is not None:
            on_reveal(float(masked_before - (x[:, P + lo : P + hi] == mask_id).sum()) / B)
        if progress is not None:
            progress()
        i += 1


def _reveal_adaptive(x, P, need, logits, temperature, alg, top_p, top_k, generator, rule):
    """One step of an adaptive rule: the rule counts by the candidate's probability, the
    algorithm's confidence (``origin``: a random draw) chooses which positions."""
    cand = x[:, P:].clone()
    if alg == "origin":
        _, x0 = sample_tokens(logits, temperature, top_p, top_k, generator=generator)
        rank = torch.rand(x0.shape, device=x.device, generator=generator)
    else:
        rank, x0 = sample_tokens(
            logits,
            temperature,
            top_p,
            top_k,
            margin_confidence=alg == "topk_margin",
            neg_entropy=alg == "entropy",
            generator=generator,
        )
    scaled = logits / temperature if temperature > 0 else logits
    p = torch.softmax(scaled.float(), -1).gather(-1, x0[:, None])[:, 0]
    prob = torch.zeros(need.shape, dtype=torch.float64, device=x.device)
    prob[need] = p.double()
    conf = torch.full(need.shape, -torch.inf, dtype=torch.float64, device=x.device)
    conf[need] = rank.double()
    chosen = select_top(conf, rule.count(prob, need))
    cand[need] = x0
    x[:, P:][chosen] = cand[chosen]
