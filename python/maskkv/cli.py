"""Command line: ``maskkv demo | generate | calibrate | bench | eval``."""

from __future__ import annotations

import argparse
import sys
import time


def _kernel_demo(args: argparse.Namespace) -> None:
    """select_and_gather + ragged_attention on one random LLaDA-shaped layer."""
    import torch

    import maskkv_kernels as mk

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, H, D, P, R = 1, 32, 128, args.prompt_len, args.gen_length
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, R, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, H, P + R, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, H, P + R, D, device=device, dtype=dtype, generator=g)
    print(
        f"device {device}, dtype {dtype}: one LLaDA-8B layer (32 heads, head dim 128), "
        f"prompt {P}, {R} mask queries, budget {args.budget}"
    )
    t0 = time.perf_counter()
    cache = mk.select_and_gather(
        q, k, v, args.budget, prompt_len=P, head_budget="prompt_preference"
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    out = mk.ragged_attention(q, cache, k[:, :, P:], v[:, :, P:])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    full_bytes = 2 * B * H * P * D * k.element_size()
    lengths = cache.lengths()
    print(
        f"kept prompt tokens per head: min {int(lengths.min())}, mean {lengths.float().mean():.1f}, "
        f"max {int(lengths.max())} of {P}"
    )
    print(
        f"prompt KV bytes: {full_bytes / 2**20:.1f} MiB -> {cache.nbytes / 2**20:.2f} MiB "
        f"({full_bytes / cache.nbytes:.1f}x smaller)"
    )
    print(
        f"select_and_gather {1e3 * (t1 - t0):.1f} ms, ragged_attention {1e3 * (t2 - t1):.1f} ms, "
        f"output {tuple(out.shape)} finite={bool(torch.isfinite(out).all())}"
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
        raise SystemExit("maskkv generate: give exactly one of --prompt and --prompt-file")
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
        cache=_cache_policy(args),
        decoding=_decoding_rule(args),
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


def _number(lo: float, hi: float | None = None, *, lo_open: bool = False, kind=float):
    """argparse type: a number in [lo, hi] ((lo, hi] with lo_open); the error names the range
    (argparse prefixes the option name)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        ok = (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
        if not ok:
            lo_text = f"({lo}" if lo_open else f"[{lo}"
            hi_text = f"{hi}]" if hi is not None else "inf)"
            raise argparse.ArgumentTypeError(
                f"expected a value in {lo_text}, {hi_text}, got {text}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


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
        raise SystemExit("maskkv generate: give at most one of --threshold and --factor")
    try:
        if args.threshold is not None:
            return Threshold(args.threshold)
        if args.factor is not None:
            return Factor(args.factor)
    except ValueError as err:
        raise SystemExit(f"maskkv generate: {err}") from None
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
            item = json.loads(line)
            if isinstance(item, dict):
                item = item.get("prompt", item.get("text"))
            if not isinstance(item, str):
                raise SystemExit(
                    f"{path}:{n}: expected a string or an object with 'prompt' or 'text'"
                )
            prompts.append(item)
    return prompts


def _calibrate(args: argparse.Namespace) -> None:
    import os

    import torch

    from .calibrate import calibrate
    from .methods import PROFILE_FILENAME

    model, device = _load(args)
    tokenizer = _tokenizer(args.model)
    prompts = _read_prompts(args.prompts)[: args.max_prompts]
    ids = [torch.tensor(_encode(tokenizer, p, not args.no_chat_template)) for p in prompts]
    profile = calibrate(model, ids, gen_length=args.gen_length, progress=True)
    out = args.out or os.path.join(args.model, PROFILE_FILENAME)
    path = profile.save(out)
    print(f"wrote {path}: I(l) = " + ", ".join(f"{x:.4f}" for x in profile.importance))


def _demo(args: argparse.Namespace) -> None:
    """Kernel demo on one LLaDA-shaped layer, then a tiny LLaDA end to end with every method."""
    import tempfile

    import torch

    from . import methods
    from .generation import generate
    from .models import load_checkpoint
    from .testing import tiny_checkpoint

    _kernel_demo(args)
    print()
    with tempfile.TemporaryDirectory() as tmp:
        model = load_checkpoint(tiny_checkpoint("llada", tmp, n_layers=4)).eval()
    prompt = torch.randint(0, 250, (1, 512), generator=torch.Generator().manual_seed(0))
    print("tiny random LLaDA (4 layers, d 64): prompt 512 tokens, 32 generated, budget 32 per head")
    order = ["nocache"] + [m for m in methods.available() if m != "nocache"]
    reference = None
    for name in order:
        method = (
            methods.get(name) if name in ("fullcache", "nocache") else methods.get(name, budget=32)
        )
        with _quiet_profile_warning():
            out = generate(model, prompt, method=method, gen_length=32, block_length=32, steps=8)
        if reference is None:
            reference = out.responses
        agree = float((out.responses == reference).float().mean())
        s = out.stats.summary()
        kept = (
            s["prompt_kv_bytes_kept"] / s["prompt_kv_bytes_full"]
            if s["prompt_kv_bytes_full"]
            else 1.0
        )
        print(
            f"  {name:17s} later step {1e3 * s['later_step_s']:6.2f} ms   prompt KV kept {kept:6.1%}   "
            f"tokens equal to NoCache's {agree:6.1%}"
        )


class _quiet_profile_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        from .methods import MissingProfileWarning

        warnings.simplefilter("ignore", MissingProfileWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="checkpoint directory (config.json + safetensors)"
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--no-chat-template", action="store_true", help="encode the raw prompt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maskkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the embedded default end to end")
    demo.add_argument("--prompt-len", type=int, default=4096)
    demo.add_argument("--gen-length", type=int, default=256)
    demo.add_argument("--budget", type=int, default=256)
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="generate with a pruned prompt cache")
    _add_model_args(gen)
    gen.add_argument("--prompt")
    gen.add_argument("--prompt-file")
    gen.add_argument(
        "--method",
        default="maskkv",
        help="maskkv, snapkv, pyramidkv, squeezeattention, adakv, fullcache, nocache",
    )
    gen.add_argument(
        "--budget", type=int, default=256, help="average prompt KV pairs kept per layer and KV head"
    )
    gen.add_argument("--gen-length", type=int, default=128)
    gen.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default: LLaDA gen length, Dream 512 as the official config)",
    )
    gen.add_argument("--temperature", type=_number(0.0), default=0.0, help="0 = greedy (default)")
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
        type=_number(1, kind=int),
        default=None,
        help="semi-autoregressive block length (default 32 as the official scripts, or the "
        "whole response if shorter)",
    )
    llada.add_argument(
        "--remasking", default="low_confidence", choices=["low_confidence", "random"]
    )
    llada.add_argument(
        "--cfg-scale", type=_number(0.0), default=0.0, help="classifier-free guidance (0 = off)"
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
        "--alg-temp", type=_number(0.0), default=None, help="sample positions at this temperature"
    )
    dream.add_argument(
        "--top-p", type=_number(0.0, 1.0, lo_open=True), default=None, help="also LLaDA2"
    )
    dream.add_argument("--top-k", type=_number(1, kind=int), default=None, help="also LLaDA2")
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
    llada2.add_argument("--minimal-topk", type=_number(1, kind=int), default=1)
    llada2.add_argument(
        "--editing-threshold",
        type=_number(0.0, 1.0),
        default=None,
        help="LLaDA2.1 token editing (the 2.1 file's default: 0.9)",
    )
    llada2.add_argument("--max-post-steps", type=_number(0, kind=int), default=16)

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
    gen.add_argument("--prompt-interval", type=int, default=50, help="dllm: prompt refresh")
    gen.add_argument("--response-interval", type=int, default=5, help="dllm: response refresh")
    gen.add_argument(
        "--transfer-ratio", type=float, default=0.25, help="dllm: share recomputed in between"
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
        "--prompts", required=True, help="JSONL: one string or {'prompt': ...} per line"
    )
    cal.add_argument("--out", default=None, help="default: <model>/maskkv_profile.json")
    cal.add_argument("--gen-length", type=int, default=128)
    cal.add_argument("--max-prompts", type=int, default=64)
    cal.set_defaults(func=_calibrate)

    try:
        from .bench import add_bench_parser
    except ImportError:
        add_bench_parser = None
    if add_bench_parser is not None:
        add_bench_parser(sub)
    from .quality.evaluate import add_eval_parser

    add_eval_parser(sub)

    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
