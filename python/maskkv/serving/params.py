"""``SamplingParams``: what one request asks for (its lengths, sampler options, decoding rule).

The engine's method, budget and cache policy are fixed when the engine starts; everything here
may differ from one request to the next. The meaning of every field is ``maskkv.generate``'s, so
a request served by the engine gives the tokens ``maskkv.generate`` gives it alone with the same
values (the engine's correctness contract).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..generation import _check_options, check_llada2_schedule, resolve_steps
from ..generation.decoding import DecodingRule, get_rule

__all__ = ["SamplingParams"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation options (defaults: ``maskkv.generate``'s).

    Args:
        gen_length: response tokens to generate (> 0).
        block_length: semi-autoregressive block (default: ``gen_length``); a divisor of it.
            LLaDA2: blocks of the whole sequence, from the first prompt token (default 32).
        steps: denoising steps (default: ``gen_length`` for LLaDA, 512 for Dream); a multiple
            of the number of blocks. LLaDA2: steps per block (default 32).
        decoding: ``FixedSteps()``, ``Threshold(tau)``, ``Factor(f)`` or ``"fixed"``; None is the
            family's default (``FixedSteps()``; LLaDA2: the official ``Threshold(0.95)``).
        temperature, remasking, logits_eos_inf, confidence_eos_eot_inf: LLaDA's sampler options.
        alg, alg_temp, top_p, top_k, eps: Dream's (top_p, top_k: LLaDA2's too).
        zero_temperature, block_mask, eos_early_stop, minimal_topk, editing_threshold,
            max_post_steps: LLaDA2's (``maskkv.generate``'s meaning).
        confidence_dtype: None (the logits' dtype, official) or a floating dtype.
        seed: the request's random stream starts as ``torch.manual_seed(seed)`` would leave it
            (``maskkv.generate(seed=...)``); None draws a fresh seed.
        stop_at_eos: finish as soon as a committed block holds the EOS token (the later blocks
            would only add what follows EOS); the response then ends with that block.
    """

    gen_length: int = 128
    block_length: int | None = None
    steps: int | None = None
    decoding: DecodingRule | str | None = None
    temperature: float = 0.0
    remasking: str = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    alg: str = "origin"
    alg_temp: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3
    confidence_dtype: torch.dtype | None = None
    zero_temperature: str = "greedy"
    block_mask: str = "causal"
    eos_early_stop: bool = False
    minimal_topk: int = 1
    editing_threshold: float | None = None
    max_post_steps: int = 16
    seed: int | None = None
    stop_at_eos: bool = False

    def __post_init__(self) -> None:
        g = self.gen_length
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"gen_length: expected a positive int, got {g!r}")
        if self.decoding is not None:
            object.__setattr__(self, "decoding", get_rule(self.decoding))
        _check_options(
            temperature=self.temperature,
            remasking=self.remasking,
            cfg_scale=0.0,
            alg=self.alg,
            alg_temp=self.alg_temp,
            top_p=self.top_p,
            top_k=self.top_k,
            eps=self.eps,
            confidence_dtype=self.confidence_dtype,
            zero_temperature=self.zero_temperature,
            block_mask=self.block_mask,
            eos_early_stop=self.eos_early_stop,
            minimal_topk=self.minimal_topk,
            editing_threshold=self.editing_threshold,
            max_post_steps=self.max_post_steps,
        )
        for name in ("logits_eos_inf", "confidence_eos_eot_inf", "stop_at_eos"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed: expected None or a non-negative int, got {seed!r}")
        block = self.block_length
        if block is not None and (
            isinstance(block, bool) or not isinstance(block, int) or block < 1
        ):
            raise ValueError(f"block_length: expected a positive int, got {block!r}")

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    def resolved(self, model) -> SamplingParams:
        """A copy with ``block_length``, ``steps`` and ``decoding`` filled in for ``model``'s
        family, and checked: ``block_length`` a divisor of ``gen_length`` and ``steps`` a
        multiple of the number of blocks (LLaDA2: ``check_llada2_schedule``)."""
        if getattr(model, "dllm_kind", "llada") == "llada2":
            block, steps = check_llada2_schedule(
                self.gen_length, self.block_length, self.steps, self.decoding, self.minimal_topk,
                self.editing_threshold,
            )  # fmt: skip
            return self.replace(block_length=block, steps=steps)
        if self.block_mask != "causal" or self.editing_threshold is not None:
            name = "block_mask" if self.block_mask != "causal" else "editing_threshold"
            raise ValueError(f"{name}: a LLaDA2 option; this model is not block-causal")
        g = self.gen_length
        block = self.block_length or g
        if g % block:
            raise ValueError(f"block_length: expected a divisor of gen_length={g}, got {block!r}")
        steps = resolve_steps(
            model,
            self.gen_length,
            self.steps,
            block,
            self.logits_eos_inf,
            self.confidence_eos_eot_inf,
        )
        blocks = self.gen_length // block
        if steps % blocks:
            raise ValueError(
                f"steps: expected a multiple of the number of blocks ({blocks}), got {steps}"
            )
        return self.replace(block_length=block, steps=steps, decoding=get_rule(self.decoding))

    def sampler_options(self) -> dict:
        """Keyword arguments of ``maskkv.generation.sampler_steps`` (after ``resolved``)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("seed", "stop_at_eos"):
            fields.pop(name)
        return fields
