"""Dream's sampler: shifted logits and the ``origin`` / ``maskgit_plus`` / ``topk_margin`` /
``entropy`` algorithms of Dream's ``diffusion_generate`` (Dream-v0 ``generation_utils.py``).

Dream predicts token i from position i - 1 (the denoiser handles the shift). Timesteps run
``linspace(1, eps, steps + 1)`` on the sequence's device; at step i a fraction 1 - s/t of the
masked tokens is revealed. Everything follows the official code op for op, so the same model
gives the same tokens in bf16 as in fp32:

- ``sample_tokens`` works in the logits' dtype (top-p, top-k, softmax, confidences);
- sampling at ``temperature > 0`` goes through ``torch.distributions.Categorical`` like the
  official code, including its fallback to the most likely token when the probabilities fail
  torch's simplex check (which bf16 rounding can trigger);
- the transfer count and ``p_transfer`` are float32 tensor arithmetic, as there;
- the positions to reveal are the top-k (or, with ``alg_temp``, a multinomial draw) of a [B, L]
  confidence tensor in the logits' dtype, -inf outside the masked positions.

The one deliberate difference: when a row has fewer masked positions than the step reveals (the
official count is averaged over the batch) the official code writes [MASK] over -inf positions,
prompt included; here those positions keep their token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["ALGORITHMS", "sample_dream", "sample_tokens", "select_positions", "transfer_count"]

ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches top_p."""
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


def _categorical(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence [n], token [n]) sampled from probs [n, V], exactly as the official code does:
    ``Categorical`` renormalises in the probs' dtype and draws one ``multinomial`` sample per row;
    if its argument check rejects the rows, the official bare ``except`` takes the argmax."""
    try:
        x0 = torch.distributions.Categorical(probs=probs).sample()
        return torch.gather(probs, -1, x0[:, None])[:, 0], x0
    except (ValueError, RuntimeError):
        return probs.max(-1)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    margin_confidence: bool = False,
    neg_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence [n], token [n]) from logits [n, V], in the logits' dtype.

    Confidence: the token's probability (maskgit_plus), the top-1 minus top-2 probability
    (topk_margin) or the negative entropy (entropy). Random draws use the global generator.
    """
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p(logits, top_p)
    if top_k is not None:
        logits = _top_k(logits, top_k)
    probs = torch.softmax(logits, -1)
    if temperature > 0:
        confidence, x0 = _categorical(probs)
    else:
        confidence, x0 = probs.max(-1)
    if margin_confidence:
        top2 = torch.topk(probs, 2, -1).values
        confidence = top2[:, 0] - top2[:, 1]
    if neg_entropy:
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return confidence, x0


def transfer_count(mask_index: torch.Tensor, t: torch.Tensor, s: torch.Tensor, last: bool) -> int:
    """Tokens to reveal this step: the batch-mean masked count times 1 - s/t (all at the last
    step), in float32 tensor arithmetic as the official code, so truncation agrees with it."""
    num_mask = mask_index.sum() / mask_index.shape[0]
    return int(num_mask) if last else int(num_mask * (1 - s / t))


def select_positions(confidence: torch.Tensor, n: int, alg_temp: float | None) -> torch.Tensor:
    """int64 [B, n]: positions to reveal from confidence [B, L] (-inf where nothing may be).

    The top n, or with ``alg_temp`` a multinomial draw without replacement from
    softmax(confidence / alg_temp) in the confidence dtype, as the official code.
    """
    if not alg_temp:
        return torch.topk(confidence, n).indices
    return torch.multinomial(F.softmax(confidence / alg_temp, dim=-1), num_samples=n)


def sample_dream(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prompt: torch.Tensor,
    *,
    mask_id: int,
    gen_length: int,
    steps: int,
    temperature: float = 0.0,
    alg: str = "origin",
    alg_temp: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    eps: float = 1e-3,
    confidence_dtype: torch.dtype | None = None,
    progress: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Returns token ids [B, P + gen_length]; ``denoise(x, need)`` as in the LLaDA sampler.

    confidence_dtype: None runs ``sample_tokens`` in the logits' dtype (official); a dtype casts
    the logits first. Random draws come from the global generator in the official order.
    """
    if alg not in ALGORITHMS:
        raise ValueError(f"alg: expected one of {ALGORITHMS}, got {alg!r}")
    B, P = prompt.shape
    L = P + gen_length
    device = prompt.device
    x = torch.full((B, L), mask_id, dtype=torch.long, device=device)
    x[:, :P] = prompt
    timesteps = torch.linspace(1, eps, steps + 1, device=device)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
    for i in range(steps):
        need = x[:, P:] == mask_id
        if not need.any():  # nothing left: the official step changes nothing and draws nothing
            if progress is not None:
                progress()
            continue
        logits = denoise(x, need)
        if confidence_dtype is not None:
            logits = logits.to(confidence_dtype)
        t, s = timesteps[i], timesteps[i + 1]
        rows = need.nonzero(as_tuple=True)
        rows = (rows[0], rows[1] + P)  # sequence coordinates
        last = i == steps - 1
        if alg == "origin":
            p_transfer = 1 if last else 1 - s / t
            x0 = torch.full((logits.shape[0],), mask_id, dtype=torch.long, device=device)
            draw = torch.rand(x0.shape, device=device) < p_transfer
            if draw.any():
                x0[draw] = sample_tokens(logits[draw], **sampling)[1]
            x[rows] = x0
        else:
            conf, x0 = sample_tokens(
                logits,
                **sampling,
                margin_confidence=alg == "topk_margin",
                neg_entropy=alg == "entropy",
            )
            mask_index = x == mask_id
            n = transfer_count(mask_index, t, s, last)
            if n > 0:
                confidence = torch.full((B, L), -torch.inf, dtype=logits.dtype, device=device)
                confidence[rows] = conf
                idx = select_positions(confidence, n, alg_temp)
                candidates = x.clone()  # -inf positions (fewer masks than n) keep their token
                candidates[rows] = x0
                batch = torch.arange(B, device=device)[:, None].expand_as(idx)
                x[batch, idx] = candidates[batch, idx]
        if progress is not None:
            progress()
    return x
