"""``MaskKVLM``: an lm-evaluation-harness model (registered as ``maskkv``) that runs
``maskkv.generate`` with a KV eviction method on a LLaDA, Dream, LLaDA2 or LLaDA-MoE checkpoint.

    python -m maskkv.eval_harness --model maskkv \\
        --model_args pretrained=DIR,method=maskkv,budget=256,gen_length=256,block_length=32 \\
        --tasks gsm8k --batch_size 8

model_args (``key=value``, comma-separated; unknown keys are an error):

==================  ===========================================================================
pretrained          checkpoint directory (config.json + safetensors + tokenizer), required
method, budget      ``maskkv.methods.get(method, budget=budget)``; default ``maskkv`` at its
                    default budget; ``fullcache`` / ``nocache`` take no budget
dtype               ``auto`` (bfloat16 on CUDA, float32 on CPU), ``bfloat16``, ``float16``,
                    ``float32``
gen_length          response tokens when a request names none (``max_gen_toks`` wins)
block_length        LLaDA's semi-autoregressive block (default: gen_length); Dream ignores it;
                    LLaDA2: its block (default 32)
steps               denoising steps for ``gen_length`` tokens (default: gen_length); a request
                    with another length keeps the tokens-per-step ratio; LLaDA2: steps per
                    block (default 32)
temperature,        sampler options of ``maskkv.generate`` (greedy by default); a request's
remasking, seed     ``temperature`` (with ``do_sample``) wins
cfg                 classifier-free guidance scale (generation and likelihood), default 0
add_bos_token       true: every context starts with the tokenizer's BOS; false: no special
                    tokens added; default: the tokenizer's own rule (unless the text already
                    starts with BOS, e.g. from a chat template)
mc_num,             Monte Carlo samples per likelihood and rows per forward (default 128, 32)
mc_batch_size
max_length          longest context + continuation scored (default: the config's
                    ``max_sequence_length`` / ``max_position_embeddings``)
cache, threshold,   cache policy (prompt, prefix, dual, dllm and their options) and decoding
factor, ...         rule, passed to ``maskkv.generate(cache=..., decoding=...)``
==================  ===========================================================================

Every key and value is checked, and the checkpoint directory looked at, before the model loads.

Likelihoods are **Monte Carlo estimates** (LLaDA's evaluation; see ``loglikelihood``), not exact
log-probabilities: a masked diffusion model has no left-to-right factorisation to sum. On
LLaDA2 each sample is the model's full block-causal forward (the method applies to generation).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

__all__ = ["CACHE_POLICY_KEYS", "MODEL_ARGS", "MaskKVLM", "parse_model_args"]

#: model_args of the cache-policy / parallel-decoding feature (DESIGN "Cache policies"):
#: ``cache=prompt|prefix|dual|dllm`` and its options, ``threshold=TAU`` (Fast-dLLM's confidence
#: threshold rule) or ``factor=F`` (Fast-dLLM's factor rule). See ``_cache_policy_kwargs``.
CACHE_POLICY_KEYS = (
    "cache",
    "refresh_prompt",
    "prompt_interval",
    "response_interval",
    "transfer_ratio",
    "threshold",
    "factor",
)

#: Every accepted model_arg with its default. ``batch_size``, ``max_batch_size`` and ``device``
#: come from lm-eval's own ``--batch_size`` / ``--max_batch_size`` / ``--device``.
MODEL_ARGS: dict[str, Any] = {
    "pretrained": None,
    "method": "maskkv",
    "budget": None,
    "dtype": "auto",
    "gen_length": 256,
    "block_length": None,
    "steps": None,
    "temperature": 0.0,
    "remasking": "low_confidence",
    "seed": None,
    "cfg": 0.0,
    "add_bos_token": None,
    "mc_num": 128,
    "mc_batch_size": 32,
    "max_length": None,
    "batch_size": 1,
    "max_batch_size": None,
    "device": None,
    **dict.fromkeys(CACHE_POLICY_KEYS),
}

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}: expected a positive int, got {value!r}")
    return value


def parse_model_args(**kwargs: Any) -> dict[str, Any]:
    """Validate lm-eval model_args (already typed by lm-eval's parser) without loading anything.

    Returns the full option dict (defaults filled in) plus ``method_obj`` (the built
    ``maskkv.methods.Method``) and ``policy_kwargs`` (``maskkv.generate``'s ``cache`` and
    ``decoding`` arguments). Raises ``ValueError`` naming the offending key or path.
    """
    from maskkv import methods

    unknown = sorted(set(kwargs) - set(MODEL_ARGS))
    if unknown:
        raise ValueError(
            f"model_args: unknown key(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(MODEL_ARGS)}"
        )
    opts = {**MODEL_ARGS, **{k: v for k, v in kwargs.items() if v is not None}}

    pretrained = opts["pretrained"]
    if pretrained is None:
        raise ValueError("pretrained: required, the checkpoint directory (pretrained=DIR)")
    config_path = Path(str(pretrained)) / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"pretrained: {pretrained} has no config.json (expected a LLaDA or Dream "
            "checkpoint directory: config.json, safetensors weights, tokenizer files)"
        )
    opts["pretrained"] = str(pretrained)

    budget = opts["budget"]
    if budget is not None:
        budget = _positive_int("budget", budget)
    opts["method_obj"] = methods.get(
        str(opts["method"]), **({} if budget is None else {"budget": budget})
    )

    if str(opts["dtype"]) != "auto" and str(opts["dtype"]) not in _DTYPES:
        raise ValueError(
            f"dtype: expected auto or one of {', '.join(_DTYPES)}, got {opts['dtype']!r}"
        )
    for key in ("gen_length", "mc_num", "mc_batch_size"):
        _positive_int(key, opts[key])
    for key in ("block_length", "steps", "max_length"):
        if opts[key] is not None:
            _positive_int(key, opts[key])
    gen, block = opts["gen_length"], opts["block_length"] or opts["gen_length"]
    if gen % block:
        raise ValueError(f"block_length: expected a divisor of gen_length={gen}, got {block}")
    steps = opts["steps"] or gen
    if steps % (gen // block):
        raise ValueError(
            f"steps: expected a multiple of gen_length / block_length = {gen // block}, got {steps}"
        )
    for key in ("temperature", "cfg"):
        if not isinstance(opts[key], (int, float)) or isinstance(opts[key], bool) or opts[key] < 0:
            raise ValueError(f"{key}: expected a number >= 0, got {opts[key]!r}")
    if opts["remasking"] not in ("low_confidence", "random"):
        raise ValueError(f"remasking: expected low_confidence or random, got {opts['remasking']!r}")
    if opts["add_bos_token"] is not None and not isinstance(opts["add_bos_token"], bool):
        raise ValueError(f"add_bos_token: expected true or false, got {opts['add_bos_token']!r}")
    opts["batch_size"] = _batch_size(opts["batch_size"])
    opts["policy_kwargs"] = _cache_policy_kwargs({k: opts[k] for k in CACHE_POLICY_KEYS})
    return opts


def _batch_size(value: Any) -> int:
    """lm-eval passes ``--batch_size`` as given on its command line (int or string)."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"batch_size: expected a positive int (prompts generated together; 'auto' is not "
            f"supported), got {value!r}"
        )
    return value


def _cache_policy_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """Map the cache-policy / decoding model_args onto ``maskkv.generate(cache=..., decoding=...)``.

    ``cache=prompt|prefix|dual|dllm`` picks the policy, ``refresh_prompt`` (prefix, dual) and
    ``prompt_interval`` / ``response_interval`` / ``transfer_ratio`` (dllm) are its fields;
    ``threshold`` or ``factor`` picks the decoding rule. Each object validates its own values
    (``ValueError`` naming the field); an option the chosen policy has no field for is an error.
    """
    import dataclasses

    import maskkv

    given = {k: v for k, v in options.items() if v is not None}
    out: dict[str, Any] = {}
    policies = {
        "prompt": maskkv.PromptCache,
        "prefix": maskkv.PrefixCache,
        "dual": maskkv.DualCache,
        "dllm": maskkv.DLLMCache,
    }
    policy = given.pop("cache", None)
    policy_options = {
        k: given.pop(k)
        for k in ("refresh_prompt", "prompt_interval", "response_interval", "transfer_ratio")
        if k in given
    }
    if policy is not None:
        cls = policies.get(str(policy).lower())
        if cls is None:
            raise ValueError(f"cache: expected one of {', '.join(policies)}, got {policy!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(policy_options) - fields)
        if extra:
            raise ValueError(
                f"{', '.join(extra)}: not an option of cache={policy} "
                f"(its options: {', '.join(sorted(fields)) or 'none'})"
            )
        out["cache"] = cls(**policy_options)
    elif policy_options:
        raise ValueError(f"{', '.join(policy_options)}: need cache=prefix|dual|dllm")
    if "threshold" in given and "factor" in given:
        raise ValueError("threshold, factor: give one decoding rule, not both")
    if "threshold" in given:
        out["decoding"] = maskkv.Threshold(float(given["threshold"]))
    elif "factor" in given:
        out["decoding"] = maskkv.Factor(float(given["factor"]))
    return out


def _distributed():
    """(accelerator or None, rank, world size). Under ``accelerate launch`` / torchrun with more
    than one process, accelerate's Accelerator sets up torch.distributed (NCCL on GPUs, gloo on
    CPUs); a single process gets no accelerator."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, 0, 1
    from accelerate import Accelerator

    # Without an accelerator device, ask accelerate for its multi-CPU mode (gloo), so that
    # `accelerate launch --multi_gpu --num_processes N` (a torchrun launch) also runs on CPUs.
    has_device = (
        torch.accelerator.is_available()
        if hasattr(torch, "accelerator")
        else torch.cuda.is_available()
    )
    accelerator = Accelerator(cpu=not has_device)
    if accelerator.num_processes <= 1:
        return None, 0, 1
    return accelerator, accelerator.process_index, accelerator.num_processes


@register_model("maskkv")
class MaskKVLM(LM):
    """lm-eval model running ``maskkv.generate`` with a KV eviction method (see the module
    docstring for model_args). Requests are split over processes by lm-eval itself (``rank`` /
    ``world_size`` below); the gathers go through accelerate / torch.distributed."""

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        opts = parse_model_args(**model_args)  # every check before anything loads
        from transformers import AutoTokenizer

        from maskkv.methods import LayerProfile
        from maskkv.models import load_checkpoint

        self.opts = opts
        self.method = opts["method_obj"]
        self.accelerator, self._rank, self._world_size = _distributed()
        if self.accelerator is not None:
            device = self.accelerator.device
        else:
            device = opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's --device defaults to cuda; on a CPU-only box run on the CPU (as HFLM).
                warnings.warn(
                    f"device: {device} requested but CUDA is unavailable; using cpu", stacklevel=2
                )
                device = "cpu"
        self._device = torch.device(device)
        dtype = opts["dtype"]
        dtype = (
            (torch.bfloat16 if self._device.type == "cuda" else torch.float32)
            if dtype == "auto"
            else _DTYPES[dtype]
        )
        self.model = load_checkpoint(opts["pretrained"], dtype=dtype, device=self._device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(opts["pretrained"], trust_remote_code=False)
        self.profile = LayerProfile.find(opts["pretrained"])
        config = self.model.config
        self.mask_id = config.mask_token_id
        self.eos_id = config.eos_token_id
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        )
        self.batch_size = opts["batch_size"]
        self.max_length = opts["max_length"] or getattr(
            config, "max_sequence_length", getattr(config, "max_position_embeddings", None)
        )
        self._warned_gen_kwargs: set[str] = set()
        self.generator = (
            None
            if opts["seed"] is None
            else torch.Generator(device=self._device).manual_seed(int(opts["seed"]))
        )

    # -- lm-eval's distributed protocol (evaluator.py splits requests by rank) ---------------

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.accelerator is None:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    # -- chat template --------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.opts["pretrained"].rstrip("/").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        if chat_template and not template:
            raise ValueError(
                f"apply_chat_template: the tokenizer of {self.opts['pretrained']} has no chat "
                "template"
            )
        return template

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The checkpoint's own chat template as text (its special tokens are re-read as such
        when the text is tokenized)."""
        self.chat_template(True)
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # -- tokens ---------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        """Token ids of ``text`` under the ``add_bos_token`` rule (see the module docstring)."""
        flag, bos_text = self.opts["add_bos_token"], self.tokenizer.bos_token
        starts_with_bos = bos_text is not None and text.startswith(bos_text)
        ids = self.tokenizer(text, add_special_tokens=flag is None and not starts_with_bos)
        ids = list(ids["input_ids"])
        bos = self.tokenizer.bos_token_id
        if flag and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def _decode_response(self, ids: Sequence[int], until: Sequence[str]) -> str:
        """The text before the first EOS token, then cut at the earliest stop sequence."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in until if s and s in text), default=len(text))
        return text[:cut]

    # -- generate_until -----------------------------------------------------------------------

    def _schedule(self, gen_length: int) -> tuple[int, int]:
        """(block_length, steps) for a request of ``gen_length`` tokens: model_args' block, the
        model_args' tokens-per-step ratio, steps a multiple of the number of blocks. LLaDA2
        (block-causal): model_args' block_length and steps as they are (steps per block; None:
        the sampler's defaults)."""
        if getattr(self.model, "dllm_kind", "llada") == "llada2":
            return self.opts["block_length"], self.opts["steps"]
        block = min(self.opts["block_length"] or self.opts["gen_length"], gen_length)
        if gen_length % block:
            raise ValueError(
                f"max_gen_toks: a request asks for {gen_length} tokens, not a multiple of "
                f"block_length={block}; set block_length to a divisor of every task's length"
            )
        blocks = gen_length // block
        ratio = (self.opts["steps"] or self.opts["gen_length"]) / self.opts["gen_length"]
        steps = max(blocks, round(gen_length * ratio / blocks) * blocks)
        return block, steps

    def _engine(self):
        """The serving engine (``maskkv.serving.Engine``) that runs ``generate_until``, or None
        where it cannot (classifier-free guidance, dLLM-Cache): then left-padded batches of
        ``maskkv.generate`` run instead. ``batch_size`` is the most requests running at once."""
        from maskkv.generation import DLLMCache
        from maskkv.serving import Engine

        cache = self.opts["policy_kwargs"].get("cache")
        if float(self.opts["cfg"]) > 0 or isinstance(cache, DLLMCache):
            return None
        if getattr(self, "_engine_obj", None) is None:
            self._engine_obj = Engine(
                self.model, method=self.method, cache=cache, profile=self.profile,
                max_running=self.batch_size,
            )  # fmt: skip
        return self._engine_obj

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Every request generated as ``maskkv.generate`` would generate it alone, each answer
        cut at the first EOS and at the earliest of its request's ``until`` strings.

        Runs on the serving engine (continuous batching, ``batch_size`` requests at once; a
        request's seed is model_args' ``seed`` plus its index) where it supports the options;
        otherwise requests are grouped by (gen length, temperature), longest prompts first,
        ragged prompts left-padded, through batched ``maskkv.generate``."""
        from maskkv.generation import generate

        jobs = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            gen_length = _positive_int(
                "max_gen_toks", int(gen_kwargs.pop("max_gen_toks", self.opts["gen_length"]))
            )
            sample = gen_kwargs.pop("do_sample", None)
            temperature = float(gen_kwargs.pop("temperature", self.opts["temperature"]))
            if sample is False:
                temperature = 0.0
            ignored = sorted(set(gen_kwargs) - self._warned_gen_kwargs)
            if ignored:  # e.g. top_p: maskkv.generate's LLaDA sampler has no such option
                self._warned_gen_kwargs.update(ignored)
                warnings.warn(
                    f"generation_kwargs: {', '.join(ignored)} not supported by the maskkv model; "
                    "ignored",
                    stacklevel=2,
                )
            ids = self._encode(context)
            jobs.append((i, ids, until, gen_length, temperature))
        engine = self._engine()
        if engine is not None:
            return self._generate_with_engine(engine, requests, jobs, disable_tqdm)
        groups: dict[tuple[int, float], list] = {}
        for job in sorted(jobs, key=lambda j: (-len(j[1]), j[0])):
            groups.setdefault((job[3], job[4]), []).append(job)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="maskkv generate", disable=disable_tqdm or self.rank)
        for (gen_length, temperature), group in groups.items():
            block, steps = self._schedule(gen_length)
            for s in range(0, len(group), self.batch_size):
                batch = group[s : s + self.batch_size]
                P = max(len(j[1]) for j in batch)
                ids = torch.full((len(batch), P), self.pad_id, dtype=torch.long)
                attn = torch.zeros(len(batch), P, dtype=torch.long)
                for r, job in enumerate(batch):
                    ids[r, P - len(job[1]) :] = torch.tensor(job[1])
                    attn[r, P - len(job[1]) :] = 1
                ragged = bool((attn == 0).any())
                result = generate(
                    self.model,
                    ids.to(self._device),
                    method=self.method,
                    gen_length=gen_length,
                    block_length=block,
                    steps=steps,
                    temperature=temperature,
                    attention_mask=attn.to(self._device) if ragged else None,
                    profile=self.profile,
                    remasking=self.opts["remasking"],
                    cfg_scale=float(self.opts["cfg"]),
                    seed=None if self.opts["seed"] is None else int(self.opts["seed"]) + s,
                    **self.opts["policy_kwargs"],
                )
                for job, resp in zip(batch, result.responses.tolist()):
                    text = self._decode_response(resp, job[2])
                    out[job[0]] = text
                    self.cache_hook.add_partial("generate_until", requests[job[0]].args, text)
                bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    def _generate_with_engine(self, engine, requests, jobs, disable_tqdm: bool) -> list[str]:
        from maskkv.serving import SamplingParams

        seed = self.opts["seed"]
        params = []
        for i, _, _, gen_length, temperature in jobs:
            block, steps = self._schedule(gen_length)
            params.append(
                SamplingParams(
                    gen_length=gen_length,
                    block_length=block,
                    steps=steps,
                    temperature=temperature,
                    remasking=self.opts["remasking"],
                    seed=None if seed is None else int(seed) + i,
                    **self._decoding(),
                )  # fmt: skip
            )
        outs = engine.generate(
            [job[1] for job in jobs], params, progress=not (disable_tqdm or self.rank)
        )
        texts = []
        for job, out in zip(jobs, outs):
            text = self._decode_response(out.token_ids, job[2])
            texts.append(text)
            self.cache_hook.add_partial("generate_until", requests[job[0]].args, text)
        return texts

    def _decoding(self) -> dict:
        decoding = self.opts["policy_kwargs"].get("decoding")
        return {} if decoding is None else {"decoding": decoding}

    # -- loglikelihood: LLaDA's Monte Carlo estimate ------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids; trailing spaces of the context move to the
        continuation (lm-eval's convention); an empty context becomes [BOS] (or [EOS])."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        if whole[: len(ctx)] != ctx:  # merged across the boundary: encode separately
            cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        else:
            cont = whole[len(ctx) :]
        if not ctx:
            bos = self.tokenizer.bos_token_id
            ctx = [bos if bos is not None else self.eos_id]
        return ctx, cont

    @torch.no_grad()
    def _mc_loglikelihood(self, context: list[int], continuation: list[int]) -> float:
        """Monte Carlo estimate of log p(continuation | context), LLaDA's evaluation:

        for each of ``mc_num`` samples, mask k of the R continuation tokens (k stratified over
        the rows of a forward: one uniform draw, then evenly spaced), and add the masked
        tokens' cross-entropy weighted by R / k (the 1/t weight with t = k / R); the estimate is
        minus the mean over samples. It lower-bounds (ELBO) the log-likelihood in expectation.

        The eviction method applies as in generation: a first pass over [context ‖ all-masked
        continuation] prunes the context KV (``maskkv.generate``'s step 1), and every sample
        reads that pruned cache. With ``method=nocache`` every sample is a full forward pass,
        exactly LLaDA's estimator. ``cfg > 0``: logits = u + (cfg + 1)(c - u), with u computed
        on the context replaced by masks.
        """
        from maskkv.generation.engine import Denoiser

        P, R = len(context), len(continuation)
        rows = min(self.opts["mc_batch_size"], self.opts["mc_num"])
        seq = torch.tensor(context + continuation, device=self._device)[None].repeat(rows, 1)
        cfg = float(self.opts["cfg"])
        block_causal = getattr(self.model, "dllm_kind", "llada") == "llada2"
        if block_causal:
            # LLaDA2: the model's own block-causal forward (exact; the method applies to
            # generate_until, whose committed-block cache is the block-causal pass).
            denoiser = _BlockCausalForward(self.model, P, self.opts["block_length"] or 32)
        else:
            denoiser = Denoiser(self.model, self.method, P, profile=self.profile)

        def logits_of(x: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
            if cfg <= 0:
                return denoiser(x, need)
            uncond = x.clone()
            uncond[:, :P] = self.mask_id
            cond, un = denoiser(torch.cat([x, uncond]), torch.cat([need, need])).chunk(2)
            return un + (cfg + 1) * (cond - un)

        if self.method.caches_prompt and not block_causal:  # step 1 prunes the context KV once
            first = seq.clone()
            first[:, P:] = self.mask_id
            logits_of(first, torch.ones(rows, R, dtype=torch.bool, device=self._device))
        total, samples = 0.0, 0
        g = self.generator
        while samples < self.opts["mc_num"]:
            n = min(rows, self.opts["mc_num"] - samples)
            # k in 1..R: one uniform draw, evenly spaced over the n rows (LLaDA's stratification)
            k0 = int(torch.randint(1, R + 1, (), generator=g, device=g.device if g else "cpu"))
            k = torch.round(torch.linspace(float(k0), k0 + (n - 1) * R / n, n)).long()
            k = (k - 1) % R + 1
            order = torch.argsort(torch.rand(n, R, generator=g, device=g.device if g else "cpu"))
            masked = (order < k[:, None]).to(self._device)  # [n, R], k[i] random positions
            x = seq[:n].clone()
            x[:, P:][masked] = self.mask_id
            x = x if n == rows else torch.cat([x, seq[n:]])  # keep the cached batch size
            need = torch.zeros(rows, R, dtype=torch.bool, device=self._device)
            need[:n] = masked
            logits = logits_of(x, need)  # [sum k, V] in row-major order
            targets = seq[:n, P:][masked]
            weights = (R / k.to(self._device).float()).repeat_interleave(k.to(self._device))
            ce = F.cross_entropy(logits.float(), targets, reduction="none")
            total += float((ce * weights).sum())
            samples += n
        return -total / samples

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(estimated log p(continuation | context), False) per request.

        The log-probability is LLaDA's Monte Carlo estimate (``_mc_loglikelihood``, ``mc_num``
        samples): an estimate with sampling noise, comparable across choices of one question
        (the usual multiple-choice use), not an exact log-probability. ``is_greedy`` is always
        False (LLaDA's default, ``is_check_greedy=False``); metrics that need it are not
        supported.
        """
        out = []
        for req in tqdm(requests, desc="maskkv loglikelihood", disable=disable_tqdm or self.rank):
            ctx, cont = self._encode_pair(*req.args)
            if not cont:
                raise ValueError(f"loglikelihood: empty continuation for context {req.args[0]!r}")
            if self.max_length is not None and len(ctx) + len(cont) > self.max_length:
                raise ValueError(
                    f"loglikelihood: context + continuation is {len(ctx)} + {len(cont)} tokens, "
                    f"more than max_length={self.max_length}"
                )
            result = (self._mc_loglikelihood(ctx, cont), False)
            out.append(result)
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "loglikelihood_rolling (perplexity tasks such as wikitext): a masked diffusion model "
            "has no left-to-right factorisation, so there are no per-token conditional "
            "log-probabilities to sum over rolling windows; the maskkv model offers "
            "loglikelihood (a Monte Carlo estimate) and generate_until only"
        )

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results config."""
        return {
            "maskkv_method": repr(self.method),
            "maskkv_profile": None if self.profile is None else self.profile.importance,
            "maskkv_dtype": str(next(self.model.parameters()).dtype),
        }


class _BlockCausalForward:
    """``Denoiser``'s call for the Monte Carlo likelihood of a block-causal model: the logits of
    response positions ``need`` from the full block-causal forward of ``x``."""

    def __init__(self, model, prompt_len: int, block_length: int) -> None:
        self.model, self.P, self.block_length = model, prompt_len, block_length

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        logits = self.model(x, block_length=self.block_length).logits[:, self.P :]
        return logits[need]
