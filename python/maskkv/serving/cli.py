"""``maskkv serve``: the OpenAI-compatible server from the command line.

    maskkv serve                                  # tiny-llada-kv on 127.0.0.1:8000
    maskkv serve --model DIR --method maskkv --budget 256 --cache dual --kv-budget 20GiB

Bad arguments end in one line, ``maskkv serve: <argument>: <what is wrong>``, exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..cli_common import UsageError, add_model_argument, method_name, number, torch_device

DEFAULT_MODEL = "tiny-llada-kv"

__all__ = ["add_serve_parser", "parse_bytes", "serve"]


def parse_bytes(text: str) -> int:
    """``"2GiB"`` / ``"512MB"`` / ``"1e9"`` / ``"123456"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", text)
    if not m:
        raise ValueError(f"expected bytes such as 2GiB, 512MB or 1000000, got {text!r}")
    value, unit, binary = float(m.group(1)), m.group(2), m.group(3)
    base = 1024 if binary else 1000
    scale = base ** "_KMGT".index(unit) if unit else 1
    n = int(value * scale)
    if n < 1:
        raise ValueError(f"expected a positive size, got {text!r}")
    return n


def _byte_size(text: str) -> int:
    """argparse type of ``--kv-budget`` (``parse_bytes``)."""
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_serve_parser(sub) -> None:
    """Register ``maskkv serve`` (``maskkv.cli.build_parser``): the shared CLI convention of
    ``maskkv.cli_common`` (shipped model names for ``--model``, one-line errors)."""
    positive = number(1, kind=int)
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server (continuous batching with a KV budget)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p, default=DEFAULT_MODEL)
    p.add_argument("--served-model-name", default=None, help="default: the model's folder name")
    p.add_argument(
        "--device", type=torch_device, default=None, help="default: cuda if available, else cpu"
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument(
        "--method",
        type=method_name,
        default="maskkv",
        help="eviction method (maskkv.methods names)",
    )
    p.add_argument(
        "--budget", type=positive, default=256, help="prompt KV pairs per layer and head"
    )
    p.add_argument(
        "--cache",
        default=None,
        choices=["prompt", "prefix", "dual"],
        help="cache policy (default: prompt; dual for block-causal LLaDA2)",
    )
    p.add_argument("--refresh-prompt", action="store_true", help="prefix/dual: Fast-dLLM refresh")
    p.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="run the batched steps eagerly (default on CUDA: one CUDA graph per bucket of shapes)",
    )
    p.add_argument(
        "--kv-budget",
        type=_byte_size,
        default=None,
        help="KV pool size, e.g. 8GiB (default: half of free memory)",
    )
    p.add_argument("--max-running", type=positive, default=64)
    p.add_argument("--max-waiting", type=positive, default=256, help="queue length before HTTP 429")
    p.add_argument(
        "--prefill-tokens", type=positive, default=8192, help="prompt token-layers per step"
    )
    p.add_argument(
        "--max-gen-length", type=positive, default=None, help="largest max_tokens accepted"
    )
    p.add_argument("--default-max-tokens", type=positive, default=64)
    p.add_argument("--block-length", type=positive, default=32)
    p.add_argument("--tokens-per-step", type=positive, default=1, help="fixed-steps decoding rate")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cpp", "torch"])
    p.add_argument("--threads", type=positive, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=number(0, 65535, kind=int), default=8000)
    p.add_argument(
        "--shutdown-timeout",
        type=number(0.0),
        default=30.0,
        help="seconds to drain on shutdown",
    )
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=serve)


def build_server(args: argparse.Namespace):
    """(uvicorn.Server, AsyncEngine) from parsed arguments; nothing is started."""
    try:
        import uvicorn
    except ImportError:
        raise UsageError("serve", "needs the serve extra: pip install 'maskkv[serve]'") from None
    import torch
    from transformers import AutoTokenizer

    from .. import methods
    from ..generation import DualCache, PrefixCache, PromptCache
    from ..models import load_checkpoint
    from .async_engine import AsyncEngine
    from .engine import Engine
    from .server import ServerConfig, build_app

    name = args.method.lower()
    no_budget = name in ("fullcache", "full", "nocache", "vanilla")
    try:
        method = methods.get(args.method, **({} if no_budget else {"budget": args.budget}))
    except ValueError as err:
        raise UsageError.wrap("--method", err) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        model = load_checkpoint(model_dir, dtype=dtype, device=device).eval()
    except (ValueError, RuntimeError) as err:
        raise UsageError("--model", str(err).splitlines()[0]) from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cache_name = args.cache
    if cache_name is None:
        cache_name = "dual" if getattr(model, "dllm_kind", "") == "llada2" else "prompt"
    cache = {"prompt": PromptCache(), "prefix": PrefixCache, "dual": DualCache}[cache_name]
    if cache_name != "prompt":
        cache = cache(refresh_prompt=args.refresh_prompt)
    try:
        engine = Engine(
            model, method=method, cache=cache, kv_budget=args.kv_budget, tokenizer=tokenizer,
            max_running=args.max_running, max_waiting=args.max_waiting,
            prefill_tokens=args.prefill_tokens, max_gen_length=args.max_gen_length,
            backend=args.backend, cuda_graphs=not args.no_cuda_graphs,
        )  # fmt: skip
    except ValueError as err:
        if "kv_budget" in str(err):
            raise UsageError.wrap("--kv-budget", err) from None
        raise
    served = args.served_model_name or Path(model_dir).name
    config = ServerConfig(
        model_name=served,
        default_max_tokens=args.default_max_tokens,
        block_length=args.block_length,
        tokens_per_step=args.tokens_per_step,
    )
    async_engine = AsyncEngine(engine)
    app = build_app(async_engine, tokenizer, config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.shutdown_timeout,
        )  # fmt: skip
    )
    return server, async_engine


def serve(args: argparse.Namespace) -> None:
    server, async_engine = build_server(args)
    engine = async_engine.engine
    print(
        f"maskkv serve: {Path(args.model).name} ({engine.method.name}, {engine.policy.name} cache) on "
        f"http://{args.host}:{args.port}/v1, KV budget {engine.pool.capacity_bytes / 2**20:.1f} MiB",
        file=sys.stderr,
    )
    async_engine.start()
    try:
        server.run()  # returns (or re-raises SIGINT) after draining the open connections
    except KeyboardInterrupt:
        pass
    finally:
        async_engine.stop(drain_timeout=0.0)
