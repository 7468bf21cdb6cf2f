"""Dream's sampler: shifted logits and the ``origin`` / ``maskgit_plus`` / ``topk_margin`` /
``entropy`` algorithms of Dream's ``diffusion_generate``.

Dream predicts token i from position i - 1 (the denoiser handles the shift). Timesteps run
``linspace(1, eps, steps + 1)``; at step i a fraction 1 - s/t of the masked tokens is revealed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

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
) -> torch.Tensor:
    """Returns token ids [B, P + gen_length]; ``denoise(x, need)`` as in the LLaDA sampler."""
    if alg not in ALGORITHMS:
        raise ValueError(f"alg: expected one of {ALGORITHMS}, got {alg!r}")
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        need = x[:, P:] == mask_id
        if not need.any():
            if progress is not None:
                progress()
            continue
        logits = denoise(x, need)
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
        if progress is not None:
            progress()
    return x
