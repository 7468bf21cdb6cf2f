"""LLaDA's sampler: semi-autoregressive blocks with low-confidence (or random) remasking.

Follows the official LLaDA ``generate`` (ML-GSAI/LLaDA ``generate.py``) step for step, so that the
same model gives the same tokens in bf16 as well as fp32:

- the response is split into blocks of ``block_length``; each block gets ``steps // num_blocks``
  steps; the tokens revealed per step are the block's masked count split evenly, the remainder on
  the first steps;
- classifier-free guidance replaces the prompt by masks in a second batch half and combines the
  two halves' logits in the logits' dtype;
- ``temperature > 0`` samples by Gumbel-max in float64, with the noise drawn as the official code
  draws it (see ``gumbel_uniforms``);
- the confidence of a candidate is its softmax probability in the logits' dtype (the official code
  since June 2025; ``confidence_dtype=torch.float64`` gives the earlier float64 softmax, which
  Fast-dLLM keeps), or a uniform draw over [B, L] for ``remasking="random"``;
- the tokens to reveal are the top-k of a [B, L] confidence tensor that is -inf outside the
  current block's masked positions, one ``topk`` per row as in the official loop, so equal
  confidences are broken exactly as there.

Only the logits of the current block's masked positions are ever computed (the others carry -inf
confidence or keep their token), so the candidates and confidences are [n, V] / [n] tensors; the
[B, L] tensors are cheap.

With an adaptive decoding rule (``Threshold``, ``Factor``) a block runs until it has no mask left,
as Fast-dLLM's loops do; the rule decides how many tokens each step reveals (counting by the
candidates' probabilities), the official confidence ranking which ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .decoding import DecodingRule, FixedSteps
from .stepwise import BlockStart, NeedLogits, SamplerSteps, run_sampler

__all__ = [
    "FULL_NOISE_MAX_BYTES",
    "LLADA_EOT_TOKEN_ID",
    "REMASKING",
    "add_gumbel_noise",
    "gumbel_uniforms",
    "llada_steps",
    "low_confidence",
    "num_transfer_tokens",
    "sample_llada",
    "select_transfer",
]

REMASKING = ("low_confidence", "random")

# ``<|eot_id|>`` of LLaDA-8B-Instruct; the official code hard-codes it (and EOS 126081, which we
# read from ``config.eos_token_id``).
LLADA_EOT_TOKEN_ID = 126348

# The official code draws float64 Gumbel noise over the whole [B, L, V] sequence at every step:
# 1 GiB at B * L = 1061 with LLaDA's vocabulary, tens of GB at a 32k prompt. Up to this many
# bytes we draw exactly that tensor (same random stream as the official code) and keep the rows we
# need; above it we draw [n, V] for the n needed rows only (same distribution, different stream).
FULL_NOISE_MAX_BYTES = 1 << 30


def num_transfer_tokens(block_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """int64 [B, steps]: tokens to reveal at each step of a block, remainder on the first steps.

    block_mask: bool [B, block_length], True where the block is still masked.
    """
    masked = block_mask.sum(1, keepdim=True)
    base, rem = masked // steps, masked % steps
    out = base.expand(-1, steps).clone()
    out += (torch.arange(steps, device=block_mask.device)[None] < rem).long()
    return out


def gumbel_uniforms(
    rows: tuple[torch.Tensor, torch.Tensor], seq_shape: tuple[int, int, int], device: torch.device
) -> torch.Tensor:
    """float64 [n, V] uniforms for the Gumbel noise of the n rows ``rows`` = (batch, position).

    seq_shape: (B, L, V) of the official logits. When the official [B, L, V] draw fits in
    ``FULL_NOISE_MAX_BYTES`` it is drawn from the global generator and indexed, which consumes and
    returns exactly what the official ``torch.rand_like(logits, dtype=torch.float64)`` does;
    otherwise only [n, V] values are drawn.
    """
    B, L, V = seq_shape
    if B * L * V * 8 <= FULL_NOISE_MAX_BYTES:
        return torch.rand((B, L, V), dtype=torch.float64, device=device)[rows]
    return torch.rand((rows[0].numel(), V), dtype=torch.float64, device=device)


def add_gumbel_noise(
    logits: torch.Tensor, temperature: float, uniforms: torch.Tensor | None = None
) -> torch.Tensor:
    """Gumbel-max perturbation, in float64 (low precision Gumbel noise degrades samples, LLaDA
    paper): argmax of the result is a sample at ``temperature``. Returns ``logits`` itself when
    ``temperature == 0``.

    logits: [n, V]; uniforms: float64 [n, V] in (0, 1) (default: drawn here).
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    if uniforms is None:
        uniforms = torch.rand(logits.shape, dtype=torch.float64, device=logits.device)
    gumbel_noise = (-torch.log(uniforms)) ** temperature
    return logits.exp() / gumbel_noise


def low_confidence(
    logits: torch.Tensor, x0: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """[n]: softmax probability of the candidate ``x0`` [n] under ``logits`` [n, V].

    dtype None: softmax in the logits' dtype (the official code); else the logits are cast first
    (``torch.float64``: LLaDA before June 2025 and Fast-dLLM).
    """
    p = F.softmax(logits if dtype is None else logits.to(dtype), dim=-1)
    return torch.gather(p, -1, x0[:, None])[:, 0]


def select_transfer(confidence: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: the ``counts[b]`` most confident positions of each row.

    confidence: [B, L], -inf where nothing may be revealed; counts: int [B]. One ``topk`` per row
    over the whole sequence, as the official loop does, so ties fall where they fall there.
    """
    transfer = torch.zeros(confidence.shape, dtype=torch.bool, device=confidence.device)
    for b, k in enumerate(counts.tolist()):
        if k:
            transfer[b, torch.topk(confidence[b], k).indices] = True
    return transfer


def sample_llada(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prompt: torch.Tensor,
    **options,
) -> torch.Tensor:
    """Returns token ids [B, P + gen_length]: ``llada_steps(prompt, **options)`` driven by
    ``denoise(x, need)``, which returns logits [n, V] of the response positions ``need`` (bool
    [B, R]) of sequence ``x``; with ``cfg_scale > 0`` it receives the conditional and
    unconditional halves stacked along the batch. When ``denoise`` has a ``begin_block(lo, hi)``
    method it is called at each block start (response coordinates)."""
    return run_sampler(llada_steps(prompt, **options), denoise)


def llada_steps(
    prompt: torch.Tensor,
    *,
    mask_id: int,
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    confidence_dtype: torch.dtype | None = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    eos_id: int | None = None,
    eot_id: int = LLADA_EOT_TOKEN_ID,
    progress: Callable[[], None] | None = None,
    decoding: DecodingRule | None = None,
    on_reveal: Callable[[float], None] | None = None,
) -> SamplerSteps:
    """LLaDA's loop as a step-wise generator (``maskkv.generation.stepwise``): it yields a
    ``BlockStart`` at each block start and a ``NeedLogits`` per denoising step (with
    ``cfg_scale > 0`` the conditional and unconditional halves stacked along the batch) and
    returns token ids [B, P + gen_length]. Random draws come from the global generator, in the
    order and shapes of the official loop (see ``gumbel_uniforms`` for the one exception).
    logits_eos_inf / confidence_eos_eot_inf: the official options (LLaDA paper, Appendix B.4)
    against too short answers; ``eos_id`` / ``eot_id`` are the ids they act on.
    ``decoding``: the rule deciding how many tokens a step reveals
    (default ``FixedSteps()``); ``on_reveal(n)`` gets the mean number of tokens revealed per row
    after each step.
    """
    rule = decoding if decoding is not None else FixedSteps()
    if gen_length % block_length:
        raise ValueError(
            f"block_length: expected a divisor of gen_length={gen_length}, got {block_length}"
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps: expected a multiple of the number of blocks ({num_blocks}), got {steps}"
        )
    if remasking not in REMASKING:
        raise ValueError(f"remasking: expected one of {REMASKING}, got {remasking!r}")
    if (logits_eos_inf or confidence_eos_eot_inf) and eos_id is None:
        raise ValueError("eos_id: required by logits_eos_inf / confidence_eos_eot_inf")
    steps_per_block = steps // num_blocks
    B, P = prompt.shape
    L = P + gen_length
    device = prompt.device
    x = torch.full((B, L), mask_id, dtype=torch.long, device=device)
    x[:, :P] = prompt
    for nb in range(num_blocks):
        lo, hi = nb * block_length, (nb + 1) * block_length  # response coordinates
        transfer_counts = num_transfer_tokens(x[:, P + lo : P + hi] == mask_id, steps_per_block)
        yield BlockStart(lo, hi)
        i = 0
        while i < steps_per_block if rule.fixed else bool((x[:, P + lo : P + hi] == mask_id).any()):
            # Logits are needed only at masked positions of the current block: the others either
            # keep their token or carry -inf confidence.
            need = x[:, P:] == mask_id
            need[:, :lo] = False
            need[:, hi:] = False
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[:, :P] = mask_id
                both = yield NeedLogits(torch.cat([x, un_x]), torch.cat([need, need]))
                cond, uncond = both.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = yield NeedLogits(x, need)
            if logits_eos_inf:
                logits[:, eos_id] = -torch.inf
            uniforms = None
            rows = need.nonzero(as_tuple=True)
            rows = (rows[0], rows[1] + P)  # sequence coordinates
            if temperature > 0:
                uniforms = gumbel_uniforms(rows, (B, L, logits.shape[-1]), device)
            x0 = add_gumbel_noise(logits, temperature, uniforms).argmax(-1)
            if confidence_eos_eot_inf:
                # The official line is `logits_with_noise[..., EOS] = logits[..., EOT] = -inf`,
                # after the argmax. At temperature 0 `logits_with_noise` *is* `logits`, so both
                # tokens leave the confidence softmax; at temperature > 0 only EOT does.
                logits[:, eot_id] = -torch.inf
                if temperature == 0:
                    logits[:, eos_id] = -torch.inf
            if remasking == "low_confidence":
                conf = low_confidence(logits, x0, confidence_dtype)
            else:
                conf = torch.rand((B, L), device=device)[rows]  # the official [B, L] draw
            confidence = torch.full((B, L), -torch.inf, dtype=conf.dtype, device=device)
            confidence[rows] = conf
            masked_before = need.sum()
            if rule.fixed:
                counts = transfer_counts[:, i]
            else:
                # The rules count tokens by probability (Fast-dLLM's threshold / factor); with
                # random remasking the ranking stays random.
                if remasking == "low_confidence":
                    prob = confidence[:, P:]
                else:
                    prob = torch.zeros(need.shape, dtype=logits.dtype, device=device)
                    prob[need] = low_confidence(logits, x0, confidence_dtype).to(prob.dtype)
                counts = rule.count(prob, need)
            transfer = select_transfer(confidence, counts)
            candidates = torch.full_like(x, mask_id)
            candidates[rows] = x0
            x[transfer] = candidates[transfer]
            if on_reveal is not None:
                revealed = masked_before - (x[:, P + lo : P + hi] == mask_id).sum()
                on_reveal(float(revealed) / B)
            if progress is not None:
                progress()
            i += 1
    return x
