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

__all__ = [
    "ALGORITHMS",
    "dream_steps",
    "sample_dream",
    "sample_tokens",
    "select_positions",
    "transfer_count",
]

from .decoding import DecodingRule, FixedSteps, select_top
from .stepwise import BlockStart, NeedLogits, SamplerSteps, run_sampler

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
    **options,
) -> torch.Tensor:
    """Returns token ids [B, P + gen_length]: ``dream_steps(prompt, **options)`` driven by
    ``denoise(x, need)`` as in the LLaDA sampler."""
    return run_sampler(dream_steps(prompt, **options), denoise)


def dream_steps(
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
    block_length: int | None = None,
    decoding: DecodingRule | None = None,
    on_reveal: Callable[[float], None] | None = None,
) -> SamplerSteps:
    """Dream's loop as a step-wise generator (events as ``llada_steps``; returns token ids
    [B, P + gen_length]); ``decoding`` and ``on_reveal`` as in the LLaDA sampler;
    ``block_length`` defaults to ``gen_length``.

    confidence_dtype: None runs ``sample_tokens`` in the logits' dtype (official); a dtype casts
    the logits first. Random draws come from the global generator in the official order.
    """
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
    B, P = prompt.shape
    L = P + gen_length
    device = prompt.device
    x = torch.full((B, L), mask_id, dtype=torch.long, device=device)
    x[:, :P] = prompt
    for nb in range(num_blocks):
        lo, hi = nb * block_length, (nb + 1) * block_length
        yield BlockStart(lo, hi)
        yield from _sample_block(
            x, P, lo, hi, steps // num_blocks, mask_id, alg, alg_temp, eps,
            confidence_dtype, dict(temperature=temperature, top_p=top_p, top_k=top_k), progress,
            rule, on_reveal, whole=num_blocks == 1,
        )  # fmt: skip
    return x


def _sample_block(
    x, P, lo, hi, steps, mask_id, alg, alg_temp, eps, confidence_dtype, sampling,
    progress, rule, on_reveal, whole,
) -> None:  # fmt: skip
    """Decode response positions [lo, hi) of ``x`` in place: Dream's schedule over the block
    (a generator of ``NeedLogits`` events).

    ``whole``: the block is the whole response, where the masked count is the official one over
    the whole sequence (the official loop counts every [MASK] in ``x``)."""
    B, L = x.shape
    device = x.device
    timesteps = torch.linspace(1, eps, steps + 1, device=device)
    i = 0
    while i < steps if rule.fixed else bool((x[:, P + lo : P + hi] == mask_id).any()):
        need = x[:, P:] == mask_id
        need[:, :lo] = False
        need[:, hi:] = False
        if not need.any():  # nothing left: the official step changes nothing and draws nothing
            if progress is not None:
                progress()
            i += 1
            continue
        masked_before = need.sum()
        logits = yield NeedLogits(x, need)
        if confidence_dtype is not None:
            logits = logits.to(confidence_dtype)
        rows = need.nonzero(as_tuple=True)
        rows = (rows[0], rows[1] + P)  # sequence coordinates
        if not rule.fixed:
            _reveal_adaptive(x, need, logits, alg, sampling, rule)
        elif alg == "origin":
            t, s = timesteps[i], timesteps[i + 1]
            p_transfer = 1 if i == steps - 1 else 1 - s / t
            x0 = torch.full((logits.shape[0],), mask_id, dtype=torch.long, device=device)
            draw = torch.rand(x0.shape, device=device) < p_transfer
            if draw.any():
                x0[draw] = sample_tokens(logits[draw], **sampling)[1]
            x[rows] = x0
        else:
            t, s = timesteps[i], timesteps[i + 1]
            conf, x0 = sample_tokens(
                logits,
                **sampling,
                margin_confidence=alg == "topk_margin",
                neg_entropy=alg == "entropy",
            )
            if whole:
                mask_index = x == mask_id
            else:
                mask_index = torch.zeros_like(x, dtype=torch.bool)
                mask_index[:, P + lo : P + hi] = x[:, P + lo : P + hi] == mask_id
            n = transfer_count(mask_index, t, s, i == steps - 1)
            if n > 0:
                confidence = torch.full((B, L), -torch.inf, dtype=logits.dtype, device=device)
                confidence[rows] = conf
                idx = select_positions(confidence, n, alg_temp)
                candidates = x.clone()  # -inf positions (fewer masks than n) keep their token
                candidates[rows] = x0
                batch = torch.arange(B, device=device)[:, None].expand_as(idx)
                x[batch, idx] = candidates[batch, idx]
        if on_reveal is not None:
            on_reveal(float(masked_before - (x[:, P + lo : P + hi] == mask_id).sum()) / B)
        if progress is not None:
            progress()
        i += 1


def _reveal_adaptive(x, need, logits, alg, sampling, rule) -> None:
    """One step of an adaptive rule: the rule counts by the candidate's probability, the
    algorithm's confidence (``origin``: a random draw) chooses which positions."""
    if alg == "origin":
        _, x0 = sample_tokens(logits, **sampling)
        rank = torch.rand(x0.shape, device=x.device)
    else:
        rank, x0 = sample_tokens(
            logits, **sampling, margin_confidence=alg == "topk_margin", neg_entropy=alg == "entropy"
        )
    temperature = sampling["temperature"]
    scaled = logits / temperature if temperature > 0 else logits
    p = torch.softmax(scaled.float(), -1).gather(-1, x0[:, None])[:, 0]
    prob = torch.zeros(need.shape, dtype=torch.float64, device=x.device)
    prob[need] = p.double()
    conf = torch.full(need.shape, -torch.inf, dtype=torch.float64, device=x.device)
    conf[need] = rank.double()
    chosen = select_top(conf, rule.count(prob, need))
    P = x.shape[1] - need.shape[1]
    cand = x[:, P:].clone()
    cand[need] = x0
    x[:, P:][chosen] = cand[chosen]
