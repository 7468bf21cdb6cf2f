"""``maskkv.generate``: dLLM generation with the prompt KV cache pruned once, at step 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods import LayerProfile, Method, get
from .decoding import DecodingRule, Factor, FixedSteps, Threshold, get_rule
from .dream import sample_dream
from .engine import Denoiser, StepStats
from .llada import sample_llada
from .policies import CachePolicy, DLLMCache, DualCache, PrefixCache, PromptCache, get_policy

__all__ = [
    "CachePolicy",
    "DLLMCache",
    "DecodingRule",
    "DualCache",
    "Factor",
    "FixedSteps",
    "GenerationOutput",
    "PrefixCache",
    "PromptCache",
    "StepStats",
    "Threshold",
    "generate",
]


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, P + gen_length] token ids, prompt included
    stats: StepStats

    @property
    def responses(self) -> torch.Tensor:
        """[B, gen_length]: the generated part only."""
        return self.sequences[:, self.sequences.shape[1] - self.stats.gen_length :]


def generate(
    model,
    input_ids: torch.Tensor,
    *,
    method: Method | str = "maskkv",
    cache: CachePolicy | str | None = None,
    decoding: DecodingRule | str | None = None,
    gen_length: int = 128,
    block_length: int | None = None,
    steps: int | None = None,
    temperature: float = 0.0,
    attention_mask: torch.Tensor | None = None,
    profile: LayerProfile | None = None,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    alg: str = "entropy",
    alg_temp: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    eps: float = 1e-3,
    token_chunk: int = 4096,
    backend: str = "auto",
    seed: int | None = None,
    progress: bool = False,
) -> GenerationOutput:
    """Generate ``gen_length`` tokens after ``input_ids`` [B, P] (left-padded when batched).

    Args:
        model: ``LLaDAModelLM`` or ``DreamModelLM`` (``model.dllm_kind`` picks the sampler).
        method: a ``maskkv.methods.Method`` or its name (``"maskkv"`` = ``MaskKV(budget=256)``).
        cache: what each step recomputes: ``PromptCache()`` (default), ``PrefixCache()``,
            ``DualCache()``, ``DLLMCache()`` or their names ``prompt | prefix | dual | dllm``.
        decoding: how many tokens a step reveals: ``FixedSteps()`` (default), ``Threshold(tau)``,
            ``Factor(f)``. With an adaptive rule ``steps`` only fixes the block count check and
            each block runs until it has no mask left.
        gen_length, block_length, steps: the semi-autoregressive schedule (block_length
            defaults to gen_length, steps to gen_length); Dream decodes block by block too.
        attention_mask: [B, P] (1 = real token) for left-padded batches.
        profile: MaskKV / SqueezeAttention layer profile; default: the one saved next to the
            model (``maskkv calibrate``), if any.
        remasking, cfg_scale: LLaDA options; alg, alg_temp, top_p, top_k, eps: Dream options.
        token_chunk: tokens per chunk in full passes (bounds activations for long prompts).
        backend: ``maskkv_kernels`` backend.
    Returns:
        ``GenerationOutput`` with ``.sequences`` [B, P + gen_length] and ``.stats``
        (per-step times, peak memory, prompt KV bytes before/after, kept lengths per layer/head).
    """
    if isinstance(method, str):
        method = get(method)
    policy = get_policy(cache)
    rule = get_rule(decoding)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids: expected a [B, P] tensor of token ids, got {getattr(input_ids, 'shape', input_ids)}"
        )
    B, P = input_ids.shape
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (B, P)
    ):
        raise ValueError(
            f"attention_mask: expected [B={B}, P={P}], got {getattr(attention_mask, 'shape', attention_mask)}"
        )
    if not isinstance(gen_length, int) or gen_length < 1:
        raise ValueError(f"gen_length: expected a positive int, got {gen_length!r}")
    steps = gen_length if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if profile is None and getattr(model, "name_or_path", None):
        profile = LayerProfile.find(model.name_or_path)
    device = input_ids.device
    full_mask = None
    if attention_mask is not None:
        full_mask = torch.cat(
            [
                attention_mask.to(device).long(),
                torch.ones(B, gen_length, dtype=torch.long, device=device),
            ],
            1,
        )
    denoiser = Denoiser(
        model,
        method,
        P,
        full_mask,
        profile=profile,
        token_chunk=token_chunk,
        backend=backend,
        cache=policy,
    )
    if cfg_scale > 0 and full_mask is not None:
        denoiser.attention_mask = torch.cat([full_mask, full_mask])
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"{method.name} denoising", unit="step")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mask_id = model.config.mask_token_id
    try:
        if getattr(model, "dllm_kind", "llada") == "dream":
            seqs = sample_dream(
                denoiser,
                input_ids,
                mask_id=mask_id,
                gen_length=gen_length,
                steps=steps,
                temperature=temperature,
                alg=alg,
                alg_temp=alg_temp,
                top_p=top_p,
                top_k=top_k,
                eps=eps,
                generator=generator,
                progress=bar.update if bar else None,
                block_length=block_length or gen_length,
                decoding=rule,
                on_reveal=denoiser.stats.tokens_per_step.append,
            )
        else:
            seqs = sample_llada(
                denoiser,
                input_ids,
                mask_id=mask_id,
                gen_length=gen_length,
                block_length=block_length or gen_length,
                steps=steps,
                temperature=temperature,
                remasking=remasking,
                cfg_scale=cfg_scale,
                generator=generator,
                progress=bar.update if bar else None,
                decoding=rule,
                on_reveal=denoiser.stats.tokens_per_step.append,
            )
    finally:
        if bar is not None:
            bar.close()
    if device.type == "cuda":
        denoiser.stats.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    denoiser.stats.gen_length = gen_length
    return GenerationOutput(seqs, denoiser.stats)
