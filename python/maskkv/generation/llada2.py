"""LLaDA2.x's sampler: block-wise iterative refinement, as ``LLaDA2MoeModelLM.generate`` of the
official 2.0 and 2.1 files does it.

The sequence is cut into blocks of ``block_length`` from the first token; the prompt's last
partial block is the first generation block (its prompt tokens stay). Each block is refined until
it has no mask left, each step running the model on the sequence up to the block's end and
sampling a candidate and its probability for every position of the block:

- 2.0 loop (``editing_threshold=None``): a step reveals every masked position whose probability is
  above ``threshold`` (strictly), or, if fewer than the step's quota pass, the quota's most
  probable ones; the quotas split ``block_length`` evenly over ``steps`` steps (remainder first),
  with ``steps`` capped at ``gen_length // minimal_topk``. After a block, a row whose response
  holds an EOS stops; with ``eos_early_stop`` a row also stops mid-block as soon as an EOS is
  revealed with no mask before it.
- 2.1 loop (``editing_threshold`` a number): the quota is 1 per step; besides revealing masks,
  a step replaces any already revealed (non-prompt) token of the block whose new candidate differs
  and has probability above ``editing_threshold``; a block ends when it has no mask and no edit,
  or after ``max_post_steps`` steps without masks. Rows stop at a complete block holding an EOS
  only with ``eos_early_stop``.

Candidates: temperature > 0 divides the fp32 logits, then top-k and top-p filter them (-inf) and
one ``torch.multinomial`` draw per position samples; at temperature 0 the candidate is the
argmax (the 2.1 file, and what the 2.0 file's docstring promises) or, with
``zero_temperature="sample"``, a draw from the unscaled softmax (what the 2.0 file's code does).

A stopped row reveals nothing more; the response after its first EOS is returned as EOS. Every
answer up to its first EOS is the official one: a block never reads later blocks, and the
official loop changes no token of a finished block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..methods import LayerProfile, Method
from .block_causal import BlockCausalDenoiser, BlockLayout
from .decoding import DecodingRule, Factor, Threshold
from .engine import StepStats
from .policies import CachePolicy
from .stepwise import BlockStart, NeedLogits, SamplerSteps, run_sampler

__all__ = [
    "BLOCK_MASKS",
    "ZERO_TEMPERATURE",
    "finish_responses",
    "generate_llada2",
    "llada2_steps",
    "sample_candidates",
    "sample_llada2",
    "transfer_schedule",
]

ZERO_TEMPERATURE = ("greedy", "sample")
BLOCK_MASKS = ("causal", "additive")


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """Tokens each step of a block must at least reveal: ``block_length`` split evenly over
    ``steps``, the remainder on the first steps (the official ``_get_num_transfer_tokens``)."""
    base, rem = divmod(block_length, steps)
    return [base + (i < rem) for i in range(steps)]


def _top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if k is None or k <= 0:
        return logits
    kth = torch.topk(logits, k)[0][..., -1, None]
    return torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)


def _top_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop = cum > p
    drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses p
    drop[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


def sample_candidates(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    zero_temperature: str = "greedy",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate int64 [n], its probability fp32 [n]) from fp32 logits [n, V], the official
    ``_sample_with_temperature_topk_topp`` (see the module docstring for temperature 0)."""
    if temperature == 0 and zero_temperature == "greedy":
        token = logits.argmax(-1, keepdim=True)
        probs = F.softmax(logits, dim=-1)
        return token[:, 0], probs.gather(-1, token)[:, 0]
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    probs = F.softmax(_top_p(_top_k(logits, top_k), top_p), dim=-1)
    token = torch.multinomial(probs, num_samples=1)
    return token[:, 0], probs.gather(-1, token)[:, 0]


def _reveal_count(
    rule: DecodingRule, threshold: float | None, prob: torch.Tensor, masked: torch.Tensor,
    quota: int,
) -> torch.Tensor:  # fmt: skip
    """int64 [B]: positions each row reveals this step (before the quota's top-k fallback)."""
    if isinstance(rule, Factor):
        return rule.count(prob, masked)
    if threshold is None:  # FixedSteps: the quota only
        return torch.full((masked.shape[0],), quota, dtype=torch.long, device=masked.device)
    high = (masked & (prob > threshold)).sum(-1)
    # The official rule: all above the threshold if that is at least the quota, else the quota.
    return torch.where(high >= quota, high, torch.full_like(high, quota))


def sample_llada2(denoiser, layout: BlockLayout, x: torch.Tensor, **options) -> torch.Tensor:
    """Refine ``x`` [B, layout.length] (``BlockLayout.build``) block by block with ``denoiser``
    (``BlockCausalDenoiser``: ``begin_block(lo, hi)`` and ``denoiser(x, need)``); returns it.
    ``options``: ``llada2_steps``'s."""
    return run_sampler(llada2_steps(layout, x, **options), denoiser)


def llada2_steps(
    layout: BlockLayout,
    x: torch.Tensor,
    *,
    mask_id: int,
    eos_id: int | None,
    steps: int = 32,
    decoding: DecodingRule | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    zero_temperature: str = "greedy",
    eos_early_stop: bool = False,
    minimal_topk: int = 1,
    editing_threshold: float | None = None,
    max_post_steps: int = 16,
    progress: Callable[[], None] | None = None,
    on_reveal: Callable[[float], None] | None = None,
) -> SamplerSteps:
    """LLaDA2's loop as a step-wise generator (``maskkv.generation.stepwise``) refining ``x``
    [B, layout.length] (``BlockLayout.build``) block by block; returns it.

    Coordinates are the tail's, ``x[:, layout.head:]`` (the complete prompt blocks are the
    cached region): it yields ``BlockStart(lo, hi)`` at each block and ``NeedLogits(x, need)``
    with ``need`` (bool [B, T]) the block's positions, and is resumed with their fp32 logits
    [B * block_length, V], row-major (``BlockCausalDenoiser``, or a request of the serving
    engine). ``decoding``: None or ``Threshold(tau)`` (reveal above tau, at least the step's
    quota; None means the official 0.95), ``FixedSteps()`` (the quota only) or ``Factor(f)``
    (Fast-dLLM's factor rule, at least one token). Random draws come from the global generator
    in the official order (one multinomial over the [B * block_length, V] probabilities per step
    when sampling).
    """
    rule = decoding if decoding is not None else Threshold(0.95)
    threshold = rule.tau if isinstance(rule, Threshold) else None
    bl = layout.block_length
    B = x.shape[0]
    device = x.device
    steps = min(steps, layout.gen_length // minimal_topk)
    schedule = transfer_schedule(bl, steps)
    editing = editing_threshold is not None
    stopped = torch.zeros(B, dtype=torch.bool)
    resp = [layout.response_start(b) for b in range(B)]
    for nb in range(layout.blocks):
        if bool(stopped.all()):
            break
        lo, hi = layout.block(nb)
        yield BlockStart(lo - layout.head, hi - layout.head)
        need = torch.zeros(B, x.shape[1] - layout.head, dtype=torch.bool, device=device)
        need[:, lo - layout.head : hi - layout.head] = True
        # Prompt positions inside the block (the first one holds the prompt's tail).
        in_prompt = torch.zeros(B, bl, dtype=torch.bool, device=device)
        for b in range(B):
            in_prompt[b, : max(0, min(resp[b] - lo, bl))] = True
        block_done = stopped.clone()
        post_steps = torch.zeros(B, dtype=torch.long)
        step = 0
        while True:
            blk = x[:, lo:hi]
            masked = (blk == mask_id) & ~block_done.to(device)[:, None]
            if editing:
                post_steps += (~masked.any(-1)).cpu() & ~block_done
                block_done |= post_steps > max_post_steps
                masked &= ~block_done.to(device)[:, None]
            elif step >= len(schedule) or not bool(masked.any()):
                break
            if bool(block_done.all()):
                break
            logits = yield NeedLogits(x, need)  # [B * bl, V] fp32
            cand, prob = sample_candidates(logits, temperature, top_k, top_p, zero_temperature)
            cand, prob = cand.view(B, bl), prob.view(B, bl)
            conf = torch.where(masked, prob, torch.full_like(prob, -torch.inf))
            quota = 1 if editing else schedule[step]
            counts = _reveal_count(rule, threshold, prob, masked, quota)
            counts = torch.minimum(counts, masked.sum(-1))
            reveal = torch.zeros_like(masked)
            for b, k in enumerate(counts.tolist()):
                if not k:
                    continue
                high = masked[b] & (prob[b] > threshold) if threshold is not None else None
                if high is not None and int(high.sum()) == k and not isinstance(rule, Factor):
                    reveal[b] = high
                else:
                    reveal[b, torch.topk(conf[b], k).indices] = True
            edits = torch.zeros_like(masked)
            if editing:
                editable = ~(blk == mask_id) & ~in_prompt & ~block_done.to(device)[:, None]
                edits = editable & (prob > editing_threshold) & (cand != blk)
            write = reveal | edits
            before = int(masked.sum())
            x[:, lo:hi] = torch.where(write, cand, blk)
            if on_reveal is not None:
                on_reveal((before - int((x[:, lo:hi] == mask_id).sum())) / B)
            if progress is not None:
                progress()
            step += 1
            if editing:
                block_done |= (~masked.any(-1) & ~edits.any(-1)).cpu()
            if eos_early_stop and eos_id is not None and not editing:
                for b in range(B):
                    if stopped[b] or not bool((cand[b][reveal[b]] == eos_id).any()):
                        continue
                    row = x[b, resp[b] : hi]
                    eos = (row == eos_id).nonzero()
                    if len(eos) and bool((row[: int(eos[0])] != mask_id).all()):
                        stopped[b] = block_done[b] = True
        for b in range(B):  # after the block
            if stopped[b] or eos_id is None:
                continue
            row = x[b, resp[b] : hi]
            if editing:
                stop = eos_early_stop and bool((row != mask_id).all())
                stop = stop and bool((row == eos_id).any())
            else:
                stop = bool((row == eos_id).any())
            stopped[b] = stop
    return x


def finish_responses(responses: torch.Tensor, mask_id: int, eos_id: int | None) -> torch.Tensor:
    """[B, gen_length] responses with everything after each row's first EOS (and any mask a
    stopped row left) set to EOS."""
    if eos_id is None:
        return responses
    out = responses.clone()
    for b in range(out.shape[0]):
        eos = (out[b] == eos_id).nonzero()
        if len(eos):
            out[b, int(eos[0]) :] = eos_id
    return out


def generate_llada2(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    method: Method,
    cache: CachePolicy | None,
    decoding: DecodingRule | None,
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    zero_temperature: str,
    block_mask: str,
    eos_early_stop: bool,
    minimal_topk: int,
    editing_threshold: float | None,
    max_post_steps: int,
    profile: LayerProfile | None,
    token_chunk: int,
    backend: str,
    cuda_graphs: bool,
    progress: Callable[[], None] | None,
) -> tuple[torch.Tensor, StepStats]:
    """``maskkv.generate`` for a block-causal model: (sequences [B, P + gen_length], stats).
    Arguments are ``generate``'s (validated there)."""
    cfg = model.config
    mask_id, eos_id = cfg.mask_token_id, cfg.eos_token_id
    layout, x = BlockLayout.build(input_ids, attention_mask, gen_length, block_length, mask_id)
    denoiser = BlockCausalDenoiser(
        model, method, layout, profile=profile, token_chunk=token_chunk, backend=backend,
        cuda_graphs=cuda_graphs, cache=cache, soft_mask=block_mask == "additive",
    )  # fmt: skip
    x = sample_llada2(
        denoiser, layout, x, mask_id=mask_id, eos_id=eos_id, steps=steps, decoding=decoding,
        temperature=temperature, top_k=top_k, top_p=top_p, zero_temperature=zero_temperature,
        eos_early_stop=eos_early_stop, minimal_topk=minimal_topk,
        editing_threshold=editing_threshold, max_post_steps=max_post_steps, progress=progress,
        on_reveal=denoiser.stats.tokens_per_step.append,
    )  # fmt: skip
    responses = finish_responses(layout.responses(x), mask_id, eos_id)
    return torch.cat([input_ids, responses.to(input_ids.device)], 1), denoiser.stats
