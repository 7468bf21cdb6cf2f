"""``maskkv.generate``: dLLM generation with the prompt KV cache pruned once, at step 1."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..methods import LayerProfile, Method, get
from .batch_invariant import batch_invariant as batch_invariant_mode
from .block_causal import BlockLayout
from .decoding import DecodingRule, Factor, FixedSteps, Threshold, get_rule
from .dream import ALGORITHMS, dream_steps
from .engine import Denoiser, FirstPassMemo, StepStats
from .llada import LLADA_EOT_TOKEN_ID, REMASKING, llada_steps
from .llada2 import BLOCK_MASKS, ZERO_TEMPERATURE, generate_llada2, llada2_steps
from .policies import CachePolicy, DLLMCache, DualCache, PrefixCache, PromptCache, get_policy
from .stepwise import run_sampler

__all__ = [
    "CachePolicy",
    "DLLMCache",
    "DecodingRule",
    "DualCache",
    "Factor",
    "FirstPassMemo",
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


DREAM_DEFAULT_STEPS = 512  # DreamGenerationConfig's default
LLADA2_DEFAULT_BLOCK_LENGTH = 32  # LLaDA2MoeModelLM.generate's defaults
LLADA2_DEFAULT_STEPS = 32


def _check_options(
    *,
    temperature: float,
    remasking: str,
    cfg_scale: float,
    alg: str,
    alg_temp: float | None,
    top_p: float | None,
    top_k: int | None,
    eps: float,
    confidence_dtype: torch.dtype | None,
    zero_temperature: str = "greedy",
    block_mask: str = "causal",
    eos_early_stop: bool = False,
    minimal_topk: int = 1,
    editing_threshold: float | None = None,
    max_post_steps: int = 16,
) -> None:
    """ValueError naming the first bad sampling option (NaN fails every range check)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking: expected one of {REMASKING}, got {remasking!r}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not cfg_scale >= 0:
        raise ValueError(f"cfg_scale: expected a number >= 0, got {cfg_scale!r}")
    if alg not in ALGORITHMS:
        raise ValueError(f"alg: expected one of {ALGORITHMS}, got {alg!r}")
    if alg_temp is not None and (
        isinstance(alg_temp, bool) or not isinstance(alg_temp, (int, float)) or not alg_temp >= 0
    ):
        raise ValueError(f"alg_temp: expected None or a number >= 0, got {alg_temp!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected None or a positive int, got {top_k!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
        raise ValueError(f"eps: expected a number in [0, 1), got {eps!r}")
    if confidence_dtype is not None and (
        not isinstance(confidence_dtype, torch.dtype) or not confidence_dtype.is_floating_point
    ):
        raise ValueError(
            f"confidence_dtype: expected None or a floating torch.dtype, got {confidence_dtype!r}"
        )
    if zero_temperature not in ZERO_TEMPERATURE:
        raise ValueError(
            f"zero_temperature: expected one of {ZERO_TEMPERATURE}, got {zero_temperature!r}"
        )
    if block_mask not in BLOCK_MASKS:
        raise ValueError(f"block_mask: expected one of {BLOCK_MASKS}, got {block_mask!r}")
    if not isinstance(eos_early_stop, bool):
        raise ValueError(f"eos_early_stop: expected a bool, got {eos_early_stop!r}")
    for name, value in (("minimal_topk", minimal_topk), ("max_post_steps", max_post_steps)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (name == "minimal_topk")
        ):
            least = 1 if name == "minimal_topk" else 0
            raise ValueError(f"{name}: expected an int >= {least}, got {value!r}")
    if editing_threshold is not None and (
        isinstance(editing_threshold, bool)
        or not isinstance(editing_threshold, (int, float))
        or not 0 <= editing_threshold <= 1
    ):
        raise ValueError(
            f"editing_threshold: expected None or a number in [0, 1], got {editing_threshold!r}"
        )


def resolve_steps(
    model,
    gen_length: int,
    steps: int | None,
    block_length: int | None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
) -> int:
    """The number of denoising steps (default: ``gen_length`` for LLaDA, 512 for Dream), after
    checking ``steps``, ``block_length`` and, for LLaDA's EOS options, the config's token ids."""
    is_dream = getattr(model, "dllm_kind", "llada") == "dream"
    if steps is None:
        steps = DREAM_DEFAULT_STEPS if is_dream else gen_length
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if block_length is not None and (not isinstance(block_length, int) or block_length < 1):
        raise ValueError(f"block_length: expected a positive int, got {block_length!r}")
    if not is_dream and (logits_eos_inf or confidence_eos_eot_inf):
        vocab = model.config.vocab_size
        for name, tok in (
            ("eos_token_id", model.config.eos_token_id),
            ("eot_token_id", _eot(model)),
        ):
            if not isinstance(tok, int) or not 0 <= tok < vocab:
                raise ValueError(
                    f"model.config.{name}: expected a token id in [0, {vocab}) for "
                    f"logits_eos_inf / confidence_eos_eot_inf, got {tok!r}"
                )
    return steps


def check_llada2_schedule(
    gen_length: int,
    block_length: int | None,
    steps: int | None,
    decoding: DecodingRule | None,
    minimal_topk: int,
    editing_threshold: float | None,
) -> tuple[int, int]:
    """(block_length, steps) of a LLaDA2 generation (defaults 32 and 32 per block), after
    checking them and the options that depend on them."""
    block_length = LLADA2_DEFAULT_BLOCK_LENGTH if block_length is None else block_length
    steps = LLADA2_DEFAULT_STEPS if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if not isinstance(block_length, int) or isinstance(block_length, bool) or block_length < 1:
        raise ValueError(f"block_length: expected a positive int, got {block_length!r}")
    if minimal_topk > gen_length:
        raise ValueError(
            f"minimal_topk: expected at most gen_length={gen_length} (steps = gen_length // "
            f"minimal_topk), got {minimal_topk}"
        )
    if editing_threshold is not None and isinstance(decoding, FixedSteps):
        raise ValueError(
            "decoding: the LLaDA2.1 editing loop reveals by threshold (Threshold(tau), "
            "Factor(f) or None), not FixedSteps()"
        )
    return block_length, steps


def _eot(model) -> int:
    eot_id = getattr(model.config, "eot_token_id", None)
    return LLADA_EOT_TOKEN_ID if eot_id is None else eot_id


def sampler_steps(
    model,
    input_ids: torch.Tensor,
    *,
    gen_length: int,
    block_length: int | None,
    steps: int,
    decoding: DecodingRule,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    alg: str = "origin",
    alg_temp: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    eps: float = 1e-3,
    confidence_dtype: torch.dtype | None = None,
    zero_temperature: str = "greedy",
    block_mask: str = "causal",
    eos_early_stop: bool = False,
    minimal_topk: int = 1,
    editing_threshold: float | None = None,
    max_post_steps: int = 16,
    progress=None,
    on_reveal=None,
):
    """The model family's sampler over ``input_ids`` [B, P] as a step-wise generator
    (``maskkv.generation.stepwise``), with checked options (``generate``'s meaning; ``steps``
    resolved by ``resolve_steps``, LLaDA2's by ``check_llada2_schedule``). ``generate`` drives
    it with a ``Denoiser``; the serving engine drives one per request. LLaDA2's sampler runs on
    the block layout of ``input_ids`` (``BlockLayout.build``, no padding) in tail coordinates
    (``llada2_steps``); ``block_mask`` is the denoiser's business."""
    if getattr(model, "dllm_kind", "llada") == "llada2":
        cfg = model.config
        layout, x = BlockLayout.build(input_ids, None, gen_length, block_length, cfg.mask_token_id)
        return llada2_steps(
            layout, x, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id, steps=steps,
            decoding=decoding, temperature=temperature, top_k=top_k, top_p=top_p,
            zero_temperature=zero_temperature, eos_early_stop=eos_early_stop,
            minimal_topk=minimal_topk, editing_threshold=editing_threshold,
            max_post_steps=max_post_steps, progress=progress, on_reveal=on_reveal,
        )  # fmt: skip
    common = dict(
        mask_id=model.config.mask_token_id,
        gen_length=gen_length,
        block_length=block_length or gen_length,
        steps=steps,
        temperature=temperature,
        confidence_dtype=confidence_dtype,
        progress=progress,
        decoding=decoding,
        on_reveal=on_reveal,
    )
    if getattr(model, "dllm_kind", "llada") == "dream":
        return dream_steps(
            input_ids, alg=alg, alg_temp=alg_temp, top_p=top_p, top_k=top_k, eps=eps, **common
        )
    return llada_steps(
        input_ids,
        remasking=remasking,
        cfg_scale=cfg_scale,
        logits_eos_inf=logits_eos_inf,
        confidence_eos_eot_inf=confidence_eos_eot_inf,
        eos_id=model.config.eos_token_id,
        eot_id=_eot(model),
        **common,
    )


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
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    alg: str = "origin",
    alg_temp: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    eps: float = 1e-3,
    confidence_dtype: torch.dtype | None = None,
    token_chunk: int = 4096,
    backend: str = "auto",
    cuda_graphs: bool = True,
    fusion: str = "auto",
    seed: int | None = None,
    progress: bool = False,
    first_pass: FirstPassMemo | None = None,
    batch_invariant: bool = True,
    zero_temperature: str = "greedy",
    block_mask: str = "causal",
    eos_early_stop: bool = False,
    minimal_topk: int = 1,
    editing_threshold: float | None = None,
    max_post_steps: int = 16,
) -> GenerationOutput:
    """Generate ``gen_length`` tokens after ``input_ids`` [B, P] (left-padded when batched).

    With ``method="nocache"`` the output is the official samplers' output token for token, in
    bf16 and fp16 as in fp32 (LLaDA's ``generate.py``, Dream's ``diffusion_generate``,
    ``LLaDA2MoeModelLM.generate`` of the LLaDA2.0 / 2.1 files), except where noted below. Every
    default is the official one; the official recommended settings are ``block_length=32`` for
    LLaDA and ``alg="entropy", temperature=0.2, top_p=0.95`` for Dream.

    Args:
        model: ``LLaDAModelLM``, ``DreamModelLM``, ``LLaDAMoEModelLM`` (LLaDA's sampler) or
            ``LLaDA2MoeModelLM`` (``model.dllm_kind`` picks the sampler).
        method: a ``maskkv.methods.Method`` or its name (``"maskkv"`` = ``MaskKV(budget=256)``).
        cache: what each step recomputes: ``PromptCache()`` (default; LLaDA2: ``DualCache()``),
            ``PrefixCache()``, ``DualCache()``, ``DLLMCache()`` or their names
            ``prompt | prefix | dual | dllm``.
        decoding: how many tokens a step reveals: ``FixedSteps()`` (default), ``Threshold(tau)``,
            ``Factor(f)``. With an adaptive rule ``steps`` only fixes the block count check and
            each block runs until it has no mask left. LLaDA2: None or ``Threshold(tau)`` is
            the official rule (every masked token above tau, strictly, and at least the step's
            quota; None: tau 0.95), ``FixedSteps()`` the quota alone (the official rule with
            the threshold off), ``Factor(f)`` the factor rule (at least one token).
        gen_length: response length.
        block_length, steps: the semi-autoregressive schedule; ``block_length`` defaults to
            ``gen_length`` and ``steps`` to ``gen_length`` for LLaDA (the official defaults, 128
            and 128, at the default ``gen_length``). Dream decodes block by block too
            (``block_length = gen_length`` is its official loop); its ``steps`` defaults to 512,
            as ``DreamGenerationConfig``. LLaDA2: blocks of ``block_length`` (default 32) from
            the first prompt token, ``steps`` per block (default 32; the quota schedule).
        temperature: 0 is greedy.
        attention_mask: [B, P] (1 = real token) for left-padded batches. Positions count real
            tokens only (a padded row generates what it would alone); the official LLaDA code
            counts the padding too, so in a padded LLaDA batch the padded rows' logits differ
            from it in rounding.
        profile: MaskKV / SqueezeAttention layer profile; default: the one saved next to the
            model (``maskkv calibrate``), if any.
        remasking: LLaDA: ``"low_confidence"`` or ``"random"``.
        cfg_scale: LLaDA classifier-free guidance scale (>= 0; 0 = off).
        logits_eos_inf: LLaDA: EOS never becomes a candidate (its logit is -inf).
        confidence_eos_eot_inf: LLaDA: EOS and EOT (``config.eot_token_id``, default 126348)
            get no confidence. Reproduces the official line exactly: at ``temperature > 0`` only
            EOT is removed from the confidence softmax (the official write to EOS lands on the
            noisy copy, after the argmax).
        alg: Dream: ``"origin"`` (official default), ``"maskgit_plus"``, ``"topk_margin"`` or
            ``"entropy"``.
        alg_temp: Dream: positions are drawn from softmax(confidence / alg_temp) instead of
            taken top-k (None or 0: top-k).
        top_p: Dream, LLaDA2: nucleus sampling, in (0, 1]. top_k: Dream, LLaDA2: positive int.
        eps: Dream's final timestep.
        confidence_dtype: None (official): confidences in the logits' dtype, the current
            official LLaDA and Dream code. ``torch.float64``: LLaDA's code before June 2025 and
            Fast-dLLM, which take a float64 softmax (for Dream: the whole token sampler runs on
            logits cast to this dtype).
        token_chunk: tokens per chunk in full passes (bounds activations for long prompts).
        backend: ``maskkv_kernels`` backend.
        cuda_graphs: on CUDA, run every later (cached) step as one replayed CUDA graph.
        fusion: how later steps run each layer's elementwise work: "auto" (fused Triton
            kernels on CUDA, else the model's eager layers), "none", "triton", "compile"
            (``torch.compile`` of the layer body) or "torch" (see ``Denoiser``).
        seed: None draws from torch's global generators, as the official code. An int runs the
            loop inside ``torch.random.fork_rng`` after ``torch.manual_seed(seed)``: the same
            draws as ``torch.manual_seed(seed)`` followed by the official loop, and the caller's
            generator states are restored afterwards.
        progress: show a progress bar.
        first_pass: a ``FirstPassMemo`` shared by several ``generate`` calls on the same batch
            (e.g. one per method and budget): step 1's full pass runs once and is replayed,
            exactly, by the others; each still makes its own selection (not LLaDA2).
        zero_temperature: LLaDA2: ``"greedy"`` (the argmax at temperature 0: the 2.1 file, and
            the 2.0 file's documented behaviour) or ``"sample"`` (a draw from the softmax at
            temperature 1: what the 2.0 file's code does at temperature 0).
        block_mask: LLaDA2: ``"causal"`` (block-causal attention, as trained and as the 2.0 file,
            dInfer and SGLang compute it) or ``"additive"`` (the 2.1 file: its 0/1 block pattern
            added to the scores, so positions also read later blocks of the window; NoCache only).
        eos_early_stop, minimal_topk: LLaDA2: the official arguments (stop a row as soon as an
            EOS is revealed with no mask before it; cap ``steps`` at
            ``gen_length // minimal_topk``).
        editing_threshold, max_post_steps: LLaDA2.1's token editing (None: the 2.0 loop without
            editing; the 2.1 file's defaults are 0.9 and 16).
        batch_invariant: run the linear layers batch-invariantly
            (``maskkv.generation.batch_invariant``): a row's logits do not depend on how many
            rows share a matrix multiply, so the serving engine, which batches requests, gives
            each request the tokens ``generate`` gives it alone. False: the plain kernels.

    Random streams: Dream's (``origin``'s uniform draw, Categorical sampling, the ``alg_temp``
    multinomial) and LLaDA's random remasking ([B, L] uniforms per step) are the official ones.
    LLaDA's Gumbel noise at ``temperature > 0`` is the official float64 [B, L, V] draw while that
    tensor is at most ``maskkv.generation.llada.FULL_NOISE_MAX_BYTES`` (1 GiB; B * L <= 1061 with
    LLaDA's vocabulary); above, noise is drawn for the masked positions of the current block only
    (same distribution, not the official stream), so long prompts cost no [B, L, V] tensor.

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
    _check_options(
        temperature=temperature,
        remasking=remasking,
        cfg_scale=cfg_scale,
        alg=alg,
        alg_temp=alg_temp,
        top_p=top_p,
        top_k=top_k,
        eps=eps,
        confidence_dtype=confidence_dtype,
        zero_temperature=zero_temperature,
        block_mask=block_mask,
        eos_early_stop=eos_early_stop,
        minimal_topk=minimal_topk,
        editing_threshold=editing_threshold,
        max_post_steps=max_post_steps,
    )
    if getattr(model, "dllm_kind", "llada") == "llada2":
        return _generate_llada2(
            model, input_ids, attention_mask, method=method, cache=cache,
            decoding=None if decoding is None else rule, gen_length=gen_length, block_length=block_length, steps=steps,
            temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
            zero_temperature=zero_temperature, block_mask=block_mask,
            eos_early_stop=eos_early_stop, minimal_topk=minimal_topk,
            editing_threshold=editing_threshold, max_post_steps=max_post_steps, profile=profile,
            token_chunk=token_chunk, backend=backend, cuda_graphs=cuda_graphs, seed=seed,
            progress=progress, batch_invariant=batch_invariant,
        )  # fmt: skip
    steps = resolve_steps(
        model, gen_length, steps, block_length, logits_eos_inf, confidence_eos_eot_inf
    )
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
        cuda_graphs=cuda_graphs,
        fusion=fusion,
        cache=policy,
        first_pass=first_pass,
    )
    if cfg_scale > 0 and full_mask is not None:
        denoiser.attention_mask = torch.cat([full_mask, full_mask])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"{method.name} denoising", unit="step")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with _seeded(seed, device), batch_invariant_mode(batch_invariant):
            steps_gen = sampler_steps(
                model,
                input_ids,
                gen_length=gen_length,
                block_length=block_length,
                steps=steps,
                temperature=temperature,
                remasking=remasking,
                cfg_scale=cfg_scale,
                logits_eos_inf=logits_eos_inf,
                confidence_eos_eot_inf=confidence_eos_eot_inf,
                alg=alg,
                alg_temp=alg_temp,
                top_p=top_p,
                top_k=top_k,
                eps=eps,
                confidence_dtype=confidence_dtype,
                decoding=rule,
                progress=bar.update if bar else None,
                on_reveal=denoiser.stats.tokens_per_step.append,
            )
            seqs = run_sampler(steps_gen, denoiser)
    finally:
        if bar is not None:
            bar.close()
    if device.type == "cuda":
        denoiser.stats.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    denoiser.stats.gen_length = gen_length
    return GenerationOutput(seqs, denoiser.stats)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """``torch.manual_seed(seed)`` inside ``torch.random.fork_rng`` (the caller's generator
    states come back afterwards); nothing for ``seed=None``."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _generate_llada2(
    model, input_ids, attention_mask, *, method, cache, decoding, gen_length, block_length,
    steps, cfg_scale, seed, progress, profile, batch_invariant, **kwargs,
) -> GenerationOutput:  # fmt: skip
    """``generate`` for a block-causal model (LLaDA2): validation, then ``generate_llada2``."""
    block_length, steps = check_llada2_schedule(
        gen_length, block_length, steps, decoding, kwargs["minimal_topk"],
        kwargs["editing_threshold"],
    )  # fmt: skip
    if cfg_scale:
        raise ValueError("cfg_scale: expected 0 for LLaDA2 (its sampler has no guidance)")
    if profile is None and getattr(model, "name_or_path", None):
        profile = LayerProfile.find(model.name_or_path)
    if isinstance(cache, str) or cache is None:
        cache = get_policy(cache) if cache is not None else None
    device = input_ids.device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"{method.name} denoising", unit="step")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with _seeded(seed, device), batch_invariant_mode(batch_invariant):
            seqs, stats = generate_llada2(
                model, input_ids, attention_mask, method=method, cache=cache,
                decoding=decoding, gen_length=gen_length, block_length=block_length,
                steps=steps, profile=profile,
                progress=None if bar is None else bar.update, **kwargs,
            )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    if device.type == "cuda":
        stats.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    stats.gen_length = gen_length
    return GenerationOutput(seqs, stats)
