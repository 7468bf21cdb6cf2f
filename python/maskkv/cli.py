"""Command line: ``maskkv <command>``; ``maskkv --help`` lists the commands.

Every subcommand follows one convention (``maskkv.cli_common``): a model is a checkpoint
directory or a shipped model's name, and bad input ends in one line
``maskkv <command>: <argument>: <what is wrong>`` with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from .cli_common import (
    ASSETS,
    CommandParser,
    UsageError,
    add_model_argument,
    existing_file,
    method_name,
    number,
    torch_device,
)


def _load(args: argparse.Namespace):
    import torch

    from .models import load_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype
    ]
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_checkpoint(args.model, dtype=dtype, device=device).eval()
    return model, torch.device(device)


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _encode(tokenizer, text: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer releases
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(text)["input_ids"]


def _generate(args: argparse.Namespace) -> None:
    import torch

    from . import methods
    from .generation import generate

    if (args.prompt is None) == (args.prompt_file is None):
        raise UsageError("--prompt", "give exactly one of --prompt and --prompt-file")
    cache, decoding = _cache_policy(args), _decoding_rule(args)  # checked before the model loads
    text = args.prompt if args.prompt is not None else open(args.prompt_file).read()
    model, device = _load(args)
    tokenizer = _tokenizer(args.model)
    ids = torch.tensor([_encode(tokenizer, text, not args.no_chat_template)], device=device)
    params = (
        {"budget": args.budget}
        if args.method.lower() not in ("fullcache", "full", "nocache", "vanilla")
        else {}
    )
    method = methods.get(args.method, **params)
    if getattr(model, "dllm_kind", "llada") == "llada" and not hasattr(
        model.config, "eot_token_id"
    ):
        # --confidence-eos-eot-inf acts on <|eot_id|>: take its id from the tokenizer
        eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
        if isinstance(eot, int) and eot != tokenizer.unk_token_id:
            model.config.eot_token_id = eot
    block_length = args.block_length
    block_causal = getattr(model, "dllm_kind", "llada") == "llada2"
    if block_length is None and not block_causal:
        # the official scripts' 32, or the whole response if shorter (LLaDA2: always its 32)
        block_length = min(32, args.gen_length)
    out = generate(
        model,
        ids,
        method=method,
        cache=cache,
        decoding=decoding,
        gen_length=args.gen_length,
        block_length=block_length,
        steps=args.steps,
        temperature=args.temperature,
        remasking=args.remasking,
        cfg_scale=args.cfg_scale,
        logits_eos_inf=args.logits_eos_inf,
        confidence_eos_eot_inf=args.confidence_eos_eot_inf,
        alg=args.alg,
        alg_temp=args.alg_temp,
        top_p=args.top_p,
        top_k=args.top_k,
        confidence_dtype=None
        if args.confidence_dtype == "logits"
        else getattr(torch, args.confidence_dtype),
        seed=args.seed,
        backend=args.backend,
        progress=True,
        zero_temperature=args.zero_temperature,
        block_mask=args.block_mask,
        eos_early_stop=args.eos_early_stop,
        minimal_topk=args.minimal_topk,
        editing_threshold=args.editing_threshold,
        max_post_steps=args.max_post_steps,
    )
    answer = out.responses[0]
    eos = model.config.eos_token_id
    if eos is not None and (answer == eos).any():
        answer = answer[: int((answer == eos).nonzero()[0])]
    print(tokenizer.decode(answer.tolist(), skip_special_tokens=True))
    print(_format_stats(method, ids.shape[1], out.stats), file=sys.stderr)


_CONFIDENCE_DTYPES = ["logits", "float32", "float64"]


def _cache_policy(args: argparse.Namespace):
    from .generation import DLLMCache, DualCache, PrefixCache, PromptCache

    if args.cache == "prefix":
        return PrefixCache(refresh_prompt=args.refresh_prompt)
    if args.cache == "dual":
        return DualCache(refresh_prompt=args.refresh_prompt)
    if args.cache == "dllm":
        return DLLMCache(args.prompt_interval, args.response_interval, args.transfer_ratio)
    if args.cache == "prompt":
        return PromptCache()
    return None  # the model's default: PromptCache, or DualCache for block-causal LLaDA2


def _decoding_rule(args: argparse.Namespace):
    from .generation import Factor, Threshold

    if args.threshold is not None and args.factor is not None:
        raise UsageError("--factor", "give at most one of --threshold and --factor")
    try:
        if args.threshold is not None:
            return Threshold(args.threshold)
        if args.factor is not None:
            return Factor(args.factor)
    except ValueError as err:
        option = "--threshold" if args.threshold is not None else "--factor"
        raise UsageError.wrap(option, err) from None
    return None  # the sampler's official rule: fixed steps (LLaDA2: threshold 0.95 + quota)


def _format_stats(method, prompt_len: int, stats) -> str:
    s = stats.summary()
    lines = [
        f"method {method!r}, prompt {prompt_len} tokens, {s['steps']} steps",
        f"step 1 {1e3 * s['first_step_s']:.1f} ms, later steps {1e3 * s['later_step_s']:.1f} ms (median)",
        f"total {s['total_s']:.3f} s (refreshes {s['refresh_s']:.3f} s, inner steps "
        f"{s['inner_s']:.3f} s), {s['nfe']} forward passes, "
        f"{s['mean_tokens_per_step']:.2f} tokens per step",
    ]
    if s["response_kv_bytes"]:
        lines.append(f"cached response KV {s['response_kv_bytes'] / 2**20:.2f} MiB")
    if s["prompt_kv_bytes_full"]:
        lines.append(
            f"prompt KV {s['prompt_kv_bytes_full'] / 2**20:.2f} MiB -> {s['prompt_kv_bytes_kept'] / 2**20:.2f} MiB, "
            f"{s.get('kept_per_head_mean', 0):.1f} kept per head on average"
        )
    if s["peak_memory_bytes"]:
        lines.append(f"peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def _read_prompts(path: str) -> list[str]:
    import json

    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError("--prompts", f"{path}:{n}: not JSON ({err.msg})") from None
            if isinstance(item, dict):
                item = item.get("prompt", item.get("text"))
            if not isinstance(item, str):
                raise UsageError(
                    "--prompts",
                    f"{path}:{n}: expected a string or an object with 'prompt' or 'text'",
                )
            prompts.append(item)
    if not prompts:
        raise UsageError("--prompts", f"{path} holds no prompt")
    return prompts


def _calibrate(args: argparse.Namespace) -> None:
    import os

    import torch

    from .calibrate import calibrate
    from .methods import PROFILE_FILENAME

    if args.out is None and os.path.realpath(args.model).startswith(str(ASSETS) + os.sep):
        raise UsageError("--out", "required for a shipped model (its own profile stays as shipped)")
    prompts = _read_prompts(args.prompts)[: args.max_prompts]
    model, device = _load(args)
    tokenizer = _tokenizer(args.model)
    ids = [torch.tensor(_encode(tokenizer, p, not args.no_chat_template)) for p in prompts]
    profile = calibrate(model, ids, gen_length=args.gen_length, progress=True)
    out = args.out or os.path.join(args.model, PROFILE_FILENAME)
    path = profile.save(out)
    print(f"wrote {path}: I(l) = " + ", ".join(f"{x:.4f}" for x in profile.importance))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument(
        "--device", type=torch_device, default=None, help="default: cuda if available, else cpu"
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--no-chat-template", action="store_true", help="encode the raw prompt")


def build_parser() -> CommandParser:
    """The ``maskkv`` parser with every subcommand registered (each a ``CommandParser``)."""
    from . import methods
    from .demo import add_demo_parser

    parser = CommandParser(
        prog="maskkv",
        description="Long-prompt inference of diffusion LLMs with KV eviction: MaskKV, its "
        "baselines, the shipped trained models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    add_demo_parser(sub)

    gen = sub.add_parser("generate", help="generate with a pruned prompt cache")
    _add_model_args(gen)
    gen.add_argument("--prompt", help="the prompt text (or --prompt-file)")
    gen.add_argument("--prompt-file", type=existing_file, help="a file holding the prompt text")
    gen.add_argument(
        "--method", type=method_name, default="maskkv", help=", ".join(methods.available())
    )
    gen.add_argument(
        "--budget",
        type=number(0, kind=int),
        default=256,
        help="average prompt KV pairs kept per layer and KV head",
    )
    gen.add_argument("--gen-length", type=number(1, kind=int), default=128)
    gen.add_argument(
        "--steps",
        type=number(1, kind=int),
        default=None,
        help="denoising steps (default: LLaDA gen length, Dream 512 as the official config)",
    )
    gen.add_argument("--temperature", type=number(0.0), default=0.0, help="0 = greedy (default)")
    gen.add_argument(
        "--confidence-dtype",
        default="logits",
        choices=_CONFIDENCE_DTYPES,
        help="softmax dtype of the confidences: the logits' dtype (official, default) or "
        "float64 (LLaDA before June 2025, Fast-dLLM)",
    )
    gen.add_argument("--seed", type=int, default=None, help="torch.manual_seed before sampling")
    llada = gen.add_argument_group("LLaDA sampling (official generate.py)")
    llada.add_argument(
        "--block-length",
        type=number(1, kind=int),
        default=None,
        help="semi-autoregressive block length (default 32 as the official scripts, or the "
        "whole response if shorter)",
    )
    llada.add_argument(
        "--remasking", default="low_confidence", choices=["low_confidence", "random"]
    )
    llada.add_argument(
        "--cfg-scale", type=number(0.0), default=0.0, help="classifier-free guidance (0 = off)"
    )
    llada.add_argument(
        "--logits-eos-inf", action="store_true", help="never propose EOS (LLaDA paper, B.4)"
    )
    llada.add_argument(
        "--confidence-eos-eot-inf",
        action="store_true",
        help="give EOS / EOT no confidence (LLaDA paper, B.4)",
    )
    dream = gen.add_argument_group("Dream sampling (official diffusion_generate)")
    dream.add_argument(
        "--alg",
        default="origin",
        choices=["origin", "maskgit_plus", "topk_margin", "entropy"],
        help="default origin (official default); recommended: entropy with --temperature 0.2 "
        "--top-p 0.95",
    )
    dream.add_argument(
        "--alg-temp", type=number(0.0), default=None, help="sample positions at this temperature"
    )
    dream.add_argument(
        "--top-p", type=number(0.0, 1.0, lo_open=True), default=None, help="also LLaDA2"
    )
    dream.add_argument("--top-k", type=number(1, kind=int), default=None, help="also LLaDA2")
    llada2 = gen.add_argument_group(
        "LLaDA2 sampling (official LLaDA2MoeModelLM.generate; --block-length defaults to 32, "
        "--steps to 32 per block, --threshold to 0.95)"
    )
    llada2.add_argument(
        "--zero-temperature",
        default="greedy",
        choices=["greedy", "sample"],
        help="at temperature 0: the argmax (2.1 file, default) or a softmax draw (2.0 file)",
    )
    llada2.add_argument(
        "--block-mask",
        default="causal",
        choices=["causal", "additive"],
        help="block-causal attention (default) or the 2.1 file's additive 0/1 mask (nocache)",
    )
    llada2.add_argument("--eos-early-stop", action="store_true")
    llada2.add_argument("--minimal-topk", type=number(1, kind=int), default=1)
    llada2.add_argument(
        "--editing-threshold",
        type=number(0.0, 1.0),
        default=None,
        help="LLaDA2.1 token editing (the 2.1 file's default: 0.9)",
    )
    llada2.add_argument("--max-post-steps", type=number(0, kind=int), default=16)

    gen.add_argument(
        "--cache",
        default=None,
        choices=["prompt", "prefix", "dual", "dllm"],
        help="what each step recomputes: prompt (pruned prompt frozen, whole response; the "
        "default), prefix / dual (Fast-dLLM block caches; LLaDA2's default: committed blocks "
        "kept), dllm (dLLM-Cache interval refresh)",
    )
    gen.add_argument(
        "--refresh-prompt",
        action="store_true",
        help="prefix/dual: recompute (and re-select) the prompt at every block start",
    )
    step_count = number(1, kind=int)
    gen.add_argument("--prompt-interval", type=step_count, default=50, help="dllm: prompt refresh")
    gen.add_argument(
        "--response-interval", type=step_count, default=5, help="dllm: response refresh"
    )
    gen.add_argument(
        "--transfer-ratio",
        type=number(0.0, 1.0),
        default=0.25,
        help="dllm: share recomputed in between",
    )
    gen.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="reveal every masked token of the block with probability >= this (Fast-dLLM)",
    )
    gen.add_argument("--factor", type=float, default=None, help="Fast-dLLM's factor rule")
    gen.add_argument(
        "--backend", default="auto", choices=["auto", "triton", "cpp", "torch", "reference"]
    )
    gen.set_defaults(func=_generate)

    cal = sub.add_parser("calibrate", help="measure the MaskKV layer-importance profile")
    _add_model_args(cal)
    cal.add_argument(
        "--prompts",
        type=existing_file,
        required=True,
        help="JSONL: one string or {'prompt': ...} per line",
    )
    cal.add_argument(
        "--out",
        default=None,
        help="default: <model>/maskkv_profile.json (required for a shipped model)",
    )
    cal.add_argument("--gen-length", type=number(1, kind=int), default=128)
    cal.add_argument("--max-prompts", type=number(1, kind=int), default=64)
    cal.set_defaults(func=_calibrate)

    try:
        from .bench import add_bench_parser
    except ImportError:
        add_bench_parser = None
    if add_bench_parser is not None:
        add_bench_parser(sub)
    from .quality.evaluate import add_eval_parser

    add_eval_parser(sub)
    from .serving.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return build_parser().run(argv)


if __name__ == "__main__":
    sys.exit(main())
