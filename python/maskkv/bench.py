"""End-to-end benchmark: random-weight LLaDA / Dream models at preset shapes, every method side by
side, the numbers of DESIGN.md's "Performance contract".

What is measured per (method, prompt length), all in one process so that ratios are side by side:

- step-1 time and the median time of the later (cached) denoising steps, from
  ``maskkv.generate``'s own per-step timer (CUDA synchronised);
- speedup of the later steps against NoCache and against FullCache;
- prompt KV bytes of the whole prompt versus what the method keeps, kept tokens per KV head;
- peak device memory (CUDA);
- on CUDA, the later step's floor ``max(weight bytes / copy bandwidth, response FLOPs / matmul
  rate)``, both ceilings measured in the same run, and later-step time / floor;
- optionally (CUDA) the longest prompt that fits for FullCache versus MaskKV.

Weights are random (there is no hub here, and speed does not depend on the values). Why random
weights are still fair: every step runs the same kernels on the same shapes as the real model;
only which tokens get revealed differs, and the number revealed per step is fixed by the
schedule.

Layer profile for MaskKV / SqueezeAttention: by default one profile is calibrated on a short
random prompt (``maskkv.calibrate.calibrate``; a second or so) so that the profile-driven layer
schedules run with non-uniform budgets, as they do with a real model. A random model's profile
says nothing about quality; it only shapes the budgets. ``profile="uniform"`` skips it (both
methods then fall back to uniform layer budgets, which is just as fast).

>>> from maskkv import bench
>>> result = bench.run_e2e("tiny", methods=["nocache", "fullcache", "maskkv"])  # doctest: +SKIP
>>> print(bench.format_table(result.rows))                                     # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_METHODS",
    "PRESETS",
    "BenchResult",
    "Preset",
    "add_bench_parser",
    "build_model",
    "check_targets",
    "device_name",
    "environment",
    "format_table",
    "max_prompt_search",
    "measure_ceilings",
    "plot_results",
    "random_prompt",
    "report",
    "result_payload",
    "run_e2e",
    "step_floor",
]

# The paper's tables, in order; NoCache and FullCache first so the references exist for ratios.
DEFAULT_METHODS: tuple[str, ...] = (
    "nocache",
    "fullcache",
    "maskkv",
    "snapkv",
    "pyramidkv",
    "squeezeattention",
    "adakv",
)


@dataclass(frozen=True)
class Preset:
    """A model shape plus the benchmark defaults that go with it.

    Attributes:
        name: preset name (``llada-8b``, ``dream-7b``, ``cpu``, ``tiny``).
        kind: ``"llada"`` or ``"dream"`` (which model class and sampler).
        layers, hidden, heads, kv_heads, ffn, vocab: the model shape (head dim = hidden / heads).
        device, dtype: where and in which precision the model runs by default.
        prompt_lens: default prompt lengths of the grid.
        gen_length, steps, budget: default response length, denoising steps, KV budget.
    """

    name: str
    kind: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    device: str
    dtype: str
    prompt_lens: tuple[int, ...]
    gen_length: int = 256
    steps: int = 8
    budget: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, Preset] = {
    # DESIGN "Generation with eviction": the real shapes, random bf16 weights on a GPU.
    "llada-8b": Preset(
        name="llada-8b", kind="llada", layers=32, hidden=4096, heads=32, kv_heads=32,
        ffn=12288, vocab=126464, device="cuda", dtype="bfloat16",
        prompt_lens=(4096, 8192, 16384, 32768),
    ),
    "dream-7b": Preset(
        name="dream-7b", kind="dream", layers=28, hidden=3584, heads=28, kv_heads=4,
        ffn=18944, vocab=152064, device="cuda", dtype="bfloat16",
        prompt_lens=(4096, 8192, 16384, 32768),
    ),
    # DESIGN "Performance contract", CPU: 4 layers, d 1024 (8 heads of 128, like the real models'
    # head dim, so the attention kernels see the real per-head shape), fp32 (bf16 matmuls are slow
    # on most CPUs), a small vocabulary so the LM head does not dominate.
    "cpu": Preset(
        name="cpu", kind="llada", layers=4, hidden=1024, heads=8, kv_heads=8,
        ffn=2816, vocab=4096, device="cpu", dtype="float32", prompt_lens=(8192,), steps=8,
    ),
    # Tests: a few seconds for the whole grid. Budget 32 < prompt so every method evicts.
    "tiny": Preset(
        name="tiny", kind="llada", layers=2, hidden=64, heads=4, kv_heads=4,
        ffn=128, vocab=320, device="cpu", dtype="float32", prompt_lens=(200,),
        gen_length=32, steps=4, budget=32,
    ),
}  # fmt: skip

# DESIGN "Performance contract" targets: preset -> (prompt length, [(what, row key, op, bound)]).
_TARGETS: dict[str, tuple[int, list[tuple[str, str, str, float]]]] = {
    "cpu": (8192, [
        ("later step vs NoCache", "speedup_vs_nocache", ">=", 50),
        ("later step vs FullCache", "speedup_vs_fullcache", ">=", 2),
    ]),
    "llada-8b": (32768, [
        ("later step vs NoCache", "speedup_vs_nocache", ">=", 100),
        ("later step / floor", "later_vs_floor", "<=", 1.5),
        ("peak memory / FullCache", "peak_memory_vs_fullcache", "<=", 0.5),
    ]),
}  # fmt: skip


# ----------------------------------------------------------------------------- environment


def device_name(device: torch.device | str) -> str:
    """A file-name-safe device name: the CUDA device name, or ``cpu-<machine>``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{platform.machine()}"


def environment(device: torch.device | str) -> dict[str, Any]:
    """Device, library versions and git commit: what a number must never be separated from.

    (``benchmarks/common.py`` records the same for the scripts; this copy lets the installed CLI
    write self-describing JSON without the repository's script folder.)
    """
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed, or broken on this platform
        triton_version = None
    commit = dirty = None
    with contextlib.suppress(Exception):
        here = Path(__file__).resolve().parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True
            ).stdout
        )
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": commit,
        "git_dirty": dirty,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----------------------------------------------------------------------------- model


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(
            f"dtype: expected a torch dtype name (bfloat16, float32...), got {dtype!r}"
        )
    return resolved


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Build the parameters directly in the target dtype on the target device: an 8B model built
    # in fp32 on the CPU and then moved would need 32 GB of host memory and minutes of init.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def model_config(preset: Preset | str):
    """The ``LLaDAConfig`` / ``DreamConfig`` of a preset. The real presets keep the official
    special-token ids; the small ones put mask / eos inside their small vocabulary."""
    from .models import DreamConfig, LLaDAConfig

    p = PRESETS[preset] if isinstance(preset, str) else preset
    small = p.vocab < 100_000
    ids: dict[str, int] = {}
    if small:
        ids = {
            "mask_token_id": p.vocab - 1,
            "eos_token_id": p.vocab - 2,
            "pad_token_id": p.vocab - 2,
        }
    if p.kind == "llada":
        return LLaDAConfig(
            d_model=p.hidden,
            n_heads=p.heads,
            n_kv_heads=p.kv_heads,
            n_layers=p.layers,
            mlp_hidden_size=p.ffn,
            vocab_size=p.vocab,
            embedding_size=p.vocab,
            **ids,
        )
    if p.kind == "dream":
        if small:
            ids["bos_token_id"] = p.vocab - 2
        return DreamConfig(
            hidden_size=p.hidden,
            intermediate_size=p.ffn,
            num_attention_heads=p.heads,
            num_key_value_heads=p.kv_heads,
            num_hidden_layers=p.layers,
            vocab_size=p.vocab,
            **ids,
        )
    raise ValueError(f"kind: expected 'llada' or 'dream', got {p.kind!r}")


def build_model(
    preset: Preset | str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
):
    """A random-weight model at the preset's shape, in eval mode, without gradients.

    Weights follow the model's own init (normal(0, 0.02), norms at 1), drawn on ``device``.
    """
    from .models import DreamModelLM, LLaDAModelLM

    p = PRESETS[preset] if isinstance(preset, str) else preset
    device = torch.device(device or p.device)
    dtype = _dtype(dtype or p.dtype)
    cls = LLaDAModelLM if p.kind == "llada" else DreamModelLM
    torch.manual_seed(seed)  # seeds every device
    with _default_dtype(dtype), torch.device(device):
        model = cls(model_config(p))
    model.requires_grad_(False)
    return model.eval()


def random_prompt(
    model, length: int, *, batch: int = 1, seed: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """int64 [batch, length] random token ids, avoiding the special ids at the top of a small
    vocabulary and the mask id (a [MASK] inside the prompt would change what step 1 computes)."""
    cfg = model.config
    device = torch.device(device) if device is not None else next(model.parameters()).device
    high = min(cfg.vocab_size, cfg.mask_token_id, cfg.eos_token_id or cfg.vocab_size)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (batch, length), generator=g).to(device)


def weight_bytes(model) -> int:
    """Bytes every later step reads: all parameters except the input embedding table (a later
    step gathers only the response rows of it)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)


# ----------------------------------------------------------------------------- ceilings, floor


def _cuda_time(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` on the GPU (CUDA events), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def measure_ceilings(
    device: torch.device | str,
    dtype: torch.dtype | str = torch.bfloat16,
    *,
    copy_bytes: int = 1 << 30,
    matmul_n: int = 8192,
    reps: int = 10,
) -> dict[str, float]:
    """The two ceilings of the step floor, measured on this GPU now (CUDA only).

    - ``copy_bandwidth_Bps``: a ``copy_bytes`` device-to-device copy, counted as read + write
      bytes (a later step reads its weights once: this is the rate it can hope for);
    - ``matmul_flops``: an ``n x n x n`` matmul in ``dtype``, 2 n^3 / time.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device: the ceilings are measured on CUDA, got {device}")
    dtype = _dtype(dtype)
    # Buffers live in a dict that is cleared afterwards, so nothing stays allocated during the
    # runs (the peak memory of the first row must not include them).
    buf = {"src": torch.empty(copy_bytes, dtype=torch.uint8, device=device)}
    buf["dst"] = torch.empty_like(buf["src"])
    t_copy = _cuda_time(lambda: buf["dst"].copy_(buf["src"]), device, reps)
    buf.clear()
    buf["a"] = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    buf["b"] = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    t_mm = _cuda_time(lambda: buf["a"] @ buf["b"], device, reps)
    buf.clear()
    torch.cuda.empty_cache()
    return {
        "copy_bandwidth_Bps": 2 * copy_bytes / t_copy,
        "matmul_flops": 2 * matmul_n**3 / t_mm,
        "copy_bytes": copy_bytes,
        "matmul_n": matmul_n,
        "matmul_dtype": str(dtype).removeprefix("torch."),
    }


def later_step_need(gen_length: int, block_length: int, steps: int) -> float:
    """Mean number of masked positions whose logits a later LLaDA step asks for (the LM head runs
    on those only): the current block's masked count, averaged over steps 2..steps."""
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    counts = []
    for _ in range(num_blocks):
        masked = block_length
        base, rem = divmod(block_length, per_block)
        for i in range(per_block):
            counts.append(masked)
            masked -= base + (1 if i < rem else 0)
    later = counts[1:]
    return sum(later) / len(later) if later else float(counts[0])


def step_floor(
    model,
    *,
    gen_length: int,
    kept_per_layer: Sequence[float],
    need_tokens: float,
    ceilings: dict[str, float],
    batch: int = 1,
) -> dict[str, float]:
    """The later step's floor: max(weight bytes / copy bandwidth, response FLOPs / matmul rate).

    Response FLOPs = per layer 2 * T * (linear parameters) + attention 4 * T * Hq * D * (kept + T)
    (QK^T and PV), plus the LM head 2 * need * d * vocab; T = the positions a later step runs
    (Dream: the response plus the last prompt position). ``kept_per_layer``: mean kept prompt
    tokens per KV head of each layer.
    """
    cfg = model.config
    T = gen_length + (1 if getattr(model, "dllm_kind", "llada") == "dream" else 0)
    layer_params = sum(p.numel() for p in model.layers[0].parameters() if p.dim() == 2)
    Hq, D = cfg.num_attention_heads, cfg.head_dim
    flops = 0.0
    for kept in kept_per_layer:
        flops += 2 * T * layer_params + 4 * T * Hq * D * (kept + T)
    head = 2 * need_tokens * cfg.hidden_size * model.get_input_embeddings().weight.shape[0]
    flops = batch * (flops + head)
    wbytes = weight_bytes(model)
    t_bytes = wbytes / ceilings["copy_bandwidth_Bps"]
    t_flops = flops / ceilings["matmul_flops"]
    return {
        "floor_s": max(t_bytes, t_flops),
        "floor_bytes_s": t_bytes,
        "floor_flops_s": t_flops,
        "response_flops": flops,
        "weight_bytes": wbytes,
    }


# ----------------------------------------------------------------------------- runs


def _oom_types() -> tuple[type[BaseException], ...]:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom,) if oom is not None else (RuntimeError,)


def _release(device: torch.device) -> None:
    """Drop what the previous run left so its memory is not counted in the next one's peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _make_method(name: str, budget: int):
    from . import methods

    # FullCache / NoCache accept a budget too (ignored); give it to all so rows record it.
    return methods.get(name, budget=budget)


def _generate(model, ids, method, *, gen_length, block_length, steps, profile, backend, chunk):
    from .generation import generate
    from .methods import MissingProfileWarning

    with warnings.catch_warnings():
        # Without a profile MaskKV / SqueezeAttention warn once and use uniform layer budgets;
        # that is the documented choice here, not news.
        warnings.simplefilter("ignore", MissingProfileWarning)
        return generate(
            model,
            ids,
            method=method,
            gen_length=gen_length,
            block_length=block_length,
            steps=steps,
            profile=profile,
            token_chunk=chunk,
            backend=backend,
        )


def _row(
    preset: Preset, method, prompt_len: int, out, model, dtype: torch.dtype, batch: int
) -> dict[str, Any]:
    """One result row from a ``GenerationOutput``; the analytic full prompt KV size is filled in
    for every method (NoCache's stats carry none, it caches nothing)."""
    cfg = model.config
    stats = out.stats
    shift = 1 if preset.kind == "dream" else 0
    elem = torch.empty((), dtype=dtype).element_size()
    full = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * (prompt_len - shift)
    full *= cfg.head_dim * elem
    row: dict[str, Any] = {
        "method": method.name,
        "method_params": method.params(),
        "prompt_len": prompt_len,
        "batch": batch,
        "status": "ok",
        "steps": len(stats.step_times),
        "step_times_s": list(stats.step_times),
        "first_step_s": stats.first_step_time,
        "later_step_s": stats.later_step_time,
        "later_step_min_s": min(stats.step_times[1:], default=float("nan")),
        "prompt_kv_bytes_full": full,
        "prompt_kv_bytes_kept": None,
        "kept_per_head_mean": None,
        "kept_per_head_min": None,
        "kept_per_head_max": None,
        "kept_per_layer": None,
        "layer_budgets": stats.layer_budgets,
        "peak_memory_bytes": stats.peak_memory_bytes,
    }
    if method.caches_prompt and stats.kept_lengths is not None:
        kl = stats.kept_lengths.float()  # [layers, B, Hkv]
        row.update(
            prompt_kv_bytes_kept=int(stats.prompt_kv_bytes_kept),
            kept_per_head_mean=float(kl.mean()),
            kept_per_head_min=int(kl.min()),
            kept_per_head_max=int(kl.max()),
            kept_per_layer=[float(x) for x in kl.mean((1, 2))],
        )
    return row


def _failed_row(method, prompt_len: int, batch: int, status: str) -> dict[str, Any]:
    return {
        "method": method.name,
        "method_params": method.params(),
        "prompt_len": prompt_len,
        "batch": batch,
        "status": status,
    }


@dataclass
class BenchResult:
    """Everything one ``run_e2e`` measured; ``to_dict()`` is what the JSON file holds."""

    preset: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    ceilings: dict[str, float] | None = None
    search: dict[str, Any] | None = None
    targets: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def row(self, method: str, prompt_len: int) -> dict[str, Any] | None:
        """The row of ``method`` (any alias) at ``prompt_len``, if it ran."""
        from . import methods

        name = methods.get(method).name
        for r in self.rows:
            if r["method"] == name and r["prompt_len"] == prompt_len:
                return r
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return None
    return a / b


# Which later-step statistic the ratios and targets use. "median" is the engine's
# `later_step_time`; "min" is robust to other processes' load on a shared machine (load only ever
# adds time), at the price of being optimistic on a quiet one.
_LATER_KEY = {"median": "later_step_s", "min": "later_step_min_s"}


def _add_ratios(rows: list[dict[str, Any]], timing: str = "median") -> None:
    """Later-step speedups against NoCache / FullCache and peak memory against FullCache, at the
    same prompt length, in place. ``timing``: the later-step statistic ("median" or "min")."""
    key = _LATER_KEY[timing]
    ref: dict[tuple[str, int], dict[str, Any]] = {
        (r["method"], r["prompt_len"]): r for r in rows if r["status"] == "ok"
    }
    for r in rows:
        if r["status"] != "ok":
            continue
        nc = ref.get(("nocache", r["prompt_len"]))
        fc = ref.get(("fullcache", r["prompt_len"]))
        r["speedup_vs_nocache"] = _ratio(nc and nc[key], r[key])
        r["speedup_vs_fullcache"] = _ratio(fc and fc[key], r[key])
        if r.get("floor_s") is not None:
            r["later_vs_floor"] = _ratio(r[key], r["floor_s"])
        r["peak_memory_vs_fullcache"] = _ratio(
            r.get("peak_memory_bytes"), fc and fc.get("peak_memory_bytes")
        )
        r["kv_kept_fraction"] = _ratio(r.get("prompt_kv_bytes_kept"), r.get("prompt_kv_bytes_full"))


def run_e2e(
    preset: Preset | str,
    *,
    methods: Sequence[str] | None = None,
    prompt_lens: Sequence[int] | None = None,
    budget: int | None = None,
    gen_length: int | None = None,
    block_length: int | None = None,
    steps: int | None = None,
    nocache_steps: int | None = 3,
    timing: str = "median",
    threads: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    batch: int = 1,
    profile: str = "calibrate",
    calib_len: int = 512,
    warmup: bool = True,
    backend: str = "auto",
    token_chunk: int = 4096,
    seed: int = 0,
    max_prompt: bool = False,
    search_limit: int = 1 << 20,
    search_refine: int = 2,
    progress: bool = True,
    model=None,
) -> BenchResult:
    """Run ``generate`` for every (method, prompt length) on one random-weight model.

    Args:
        preset: a name from ``PRESETS`` or a ``Preset``; its fields are the defaults below.
        methods: method names (``maskkv.methods.get`` names/aliases); default ``DEFAULT_METHODS``.
        prompt_lens, budget, gen_length, steps: grid and schedule (defaults from the preset).
            ``steps`` only needs to be a few: step 1 plus ``steps - 1`` timed later steps.
        block_length: LLaDA block length (default ``gen_length``: one block).
        nocache_steps: NoCache recomputes everything at every step, so every step costs the same;
            it runs only this many steps (rounded up to the number of blocks) to keep long
            prompts affordable. ``None``: as many as the others.
        timing: later-step statistic behind the speedups, the floor ratio and the targets:
            ``"median"`` (the engine's ``later_step_time``) or ``"min"`` (robust to other
            processes' load on a shared machine). Rows carry both.
        threads: ``torch.set_num_threads`` for the run (CPU); None leaves it.
        device, dtype: default the preset's.
        profile: ``"calibrate"`` (one profile from a ``calib_len``-token random prompt, used by
            MaskKV and SqueezeAttention) or ``"uniform"`` (none: uniform layer budgets).
        warmup: run each method once on a short prompt first (Triton compiles, allocator warms),
            so the first timed row is not charged for it.
        backend, token_chunk: passed to ``generate``.
        max_prompt: also search the longest prompt that fits for FullCache and MaskKV (CUDA),
            doubling from the smallest prompt length up to ``search_limit`` and then
            ``search_refine`` bisection steps between the last fit and the first failure.
        model: reuse an already built model (must match the preset).
    Returns:
        ``BenchResult`` with one row per (method, prompt length), the ceilings (CUDA), the search
        and the DESIGN targets evaluated on the measured numbers.
    """
    from tqdm.auto import tqdm

    p = PRESETS[preset] if isinstance(preset, str) else preset
    device = torch.device(device or p.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = _dtype(dtype or p.dtype)
    names = list(methods or DEFAULT_METHODS)
    prompt_lens = sorted(prompt_lens or p.prompt_lens)
    budget = p.budget if budget is None else budget
    gen_length = gen_length or p.gen_length
    steps = steps or p.steps
    block_length = block_length or gen_length
    if gen_length % block_length:
        raise ValueError(
            f"block_length: expected a divisor of gen_length={gen_length}, got {block_length}"
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks or steps < 2 * num_blocks:
        raise ValueError(
            f"steps: expected a multiple of the number of blocks ({num_blocks}) and at least "
            f"{2 * num_blocks} (one timed later step), got {steps}"
        )
    if timing not in _LATER_KEY:
        raise ValueError(f"timing: expected one of {sorted(_LATER_KEY)}, got {timing!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    if profile not in ("calibrate", "uniform"):
        raise ValueError(f"profile: expected 'calibrate' or 'uniform', got {profile!r}")
    method_objs = [_make_method(n, budget) for n in names]
    if model is None:
        model = build_model(p, device=device, dtype=dtype, seed=seed)

    prof = None
    calib_s = None
    if profile == "calibrate" and any(
        m.name in ("maskkv", "squeezeattention") for m in method_objs
    ):
        from .calibrate import calibrate

        t0 = time.perf_counter()
        prof = calibrate(
            model, [random_prompt(model, calib_len, seed=seed + 1)], gen_length=gen_length
        )
        calib_s = time.perf_counter() - t0

    ceilings = measure_ceilings(device, dtype) if device.type == "cuda" else None

    def nsteps(m) -> int:
        if m.caches_prompt or nocache_steps is None:
            return steps
        return max(num_blocks, -(-nocache_steps // num_blocks) * num_blocks)

    if warmup:
        # Longer than the budget so the eviction path (and its kernels) really runs.
        w_len = min(prompt_lens[0], 2 * budget + 64)
        ids = random_prompt(model, w_len, batch=batch, seed=seed + 2, device=device)
        for m in method_objs:
            _generate(
                model,
                ids,
                m,
                gen_length=gen_length,
                block_length=block_length,
                steps=2 * num_blocks,
                profile=prof,
                backend=backend,
                chunk=token_chunk,
            )
        _release(device)

    rows: list[dict[str, Any]] = []
    grid = [(P, m) for P in prompt_lens for m in method_objs]
    bar = tqdm(grid, desc=f"e2e {p.name}", unit="run", disable=not progress)
    for P, m in bar:
        bar.set_postfix_str(f"{m.name} P={P}")
        ids = random_prompt(model, P, batch=batch, seed=seed + P, device=device)
        try:
            out = _generate(
                model,
                ids,
                m,
                gen_length=gen_length,
                block_length=block_length,
                steps=nsteps(m),
                profile=prof,
                backend=backend,
                chunk=token_chunk,
            )
            row = _row(p, m, P, out, model, dtype, batch)
            del out
        except _oom_types():
            row = _failed_row(m, P, batch, "oom")
        _release(device)
        if ceilings is not None and row["status"] == "ok" and m.caches_prompt:
            # The floor is that of a cached (response-only) step; NoCache has no such step.
            kept = row["kept_per_layer"] or [float(P)] * p.layers
            row.update(
                step_floor(
                    model,
                    gen_length=gen_length,
                    kept_per_layer=kept,
                    batch=batch,
                    need_tokens=later_step_need(gen_length, block_length, steps),
                    ceilings=ceilings,
                )
            )
        rows.append(row)
    bar.close()
    _add_ratios(rows, timing)

    search = None
    if max_prompt:
        search = max_prompt_search(
            model,
            ["fullcache", "maskkv"],
            budget=budget,
            start=prompt_lens[0],
            limit=search_limit,
            refine=search_refine,
            gen_length=gen_length,
            profile=prof,
            backend=backend,
            token_chunk=token_chunk,
            batch=batch,
            progress=progress,
        )

    config = {
        "preset": dataclasses.asdict(p),
        "methods": [m.params() for m in method_objs],
        "prompt_lens": prompt_lens,
        "budget": budget,
        "gen_length": gen_length,
        "block_length": block_length,
        "steps": steps,
        "nocache_steps": nocache_steps,
        "timing": timing,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "token_chunk": token_chunk,
        "profile": profile,
        "profile_importance": None if prof is None else list(prof.importance),
        "calibration_s": calib_s,
        "calib_len": calib_len if prof is not None else None,
        "weight_bytes": weight_bytes(model),
        "seed": seed,
    }
    result = BenchResult(p.name, config, rows, ceilings, search)
    result.targets = check_targets(result)
    return result


def max_prompt_search(
    model,
    methods: Sequence[str] = ("fullcache", "maskkv"),
    *,
    budget: int = 256,
    start: int = 4096,
    limit: int = 1 << 20,
    refine: int = 2,
    gen_length: int = 256,
    profile=None,
    backend: str = "auto",
    token_chunk: int = 4096,
    batch: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Longest prompt that fits, per method (CUDA): double from ``start`` until
    ``torch.cuda.OutOfMemoryError`` or ``limit``, then ``refine`` bisection steps.

    Each try is one denoising step (step 1: where every method's memory peaks -- the full pass,
    plus, for FullCache, the whole prompt KV of every layer). Time grows quadratically with the
    prompt (step-1 attention), so large limits take minutes.
    Returns ``{method: {"max_fit": int | None, "first_oom": int | None, "tries": [...]}}``.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out: dict[str, Any] = {}
    for name in methods:
        m = _make_method(name, budget)
        tries: list[dict[str, Any]] = []
        bar = tqdm(desc=f"max prompt {m.name}", unit="try", disable=not progress)

        def fits(P: int, m=m, tries=tries, bar=bar) -> bool:
            ids = random_prompt(model, P, batch=batch, seed=P, device=device)
            t0 = time.perf_counter()
            try:
                res = _generate(
                    model,
                    ids,
                    m,
                    gen_length=gen_length,
                    block_length=gen_length,
                    steps=1,
                    profile=profile,
                    backend=backend,
                    chunk=token_chunk,
                )
                peak = res.stats.peak_memory_bytes
                del res
                ok = True
            except _oom_types():
                peak, ok = None, False
            del ids
            _release(device)
            tries.append(
                {
                    "prompt_len": P,
                    "fits": ok,
                    "peak_memory_bytes": peak,
                    "seconds": time.perf_counter() - t0,
                }
            )
            bar.set_postfix_str(f"{m.name} P={P} {'ok' if ok else 'OOM'}")
            bar.update()
            return ok

        good, bad, P = None, None, start
        while P <= limit:
            if fits(P):
                good, P = P, 2 * P
            else:
                bad = P
                break
        if good is not None and bad is not None:
            for _ in range(refine):
                mid = (good + bad) // 2
                if mid in (good, bad):
                    break
                if fits(mid):
                    good = mid
                else:
                    bad = mid
        bar.close()
        out[m.name] = {"max_fit": good, "first_oom": bad, "limit": limit, "tries": tries}
    return out


# ----------------------------------------------------------------------------- targets, table


def _check(name: str, measured: float | None, op: str, bound: float, note: str = "") -> dict:
    if measured is None or not math.isfinite(measured):
        status = "N/A"
    else:
        status = "PASS" if (measured >= bound if op == ">=" else measured <= bound) else "MISS"
    return {
        "target": name,
        "measured": measured,
        "op": op,
        "bound": bound,
        "status": status,
        "note": note,
    }


def check_targets(result: BenchResult) -> list[dict[str, Any]]:
    """DESIGN "Performance contract" targets, from the measured rows (PASS / MISS / N/A).

    CPU preset at an 8k prompt: MaskKV later steps >= 50x NoCache and >= 2x FullCache.
    llada-8b at a 32k prompt: >= 100x NoCache, later step <= 1.5x the floor, peak memory <= 50%
    of FullCache's, and (with the search) longest prompt >= 8x FullCache's.
    N/A: the row needed was not measured (another prompt length, an OOM, a method left out).
    """
    if result.preset not in _TARGETS:
        return []
    P, specs = _TARGETS[result.preset]
    r = result.row("maskkv", P) or {}
    why = "" if r.get("status") == "ok" else f"MaskKV at P={P} not measured"
    checks = [
        _check(f"{result.preset} P={P}: MaskKV {what}", r.get(key), op, bound, why)
        for what, key, op, bound in specs
    ]
    if result.preset == "llada-8b":
        s = result.search or {}
        fc, mkv = s.get("fullcache", {}), s.get("maskkv", {})
        note = "" if s else "run with --max-prompt-search"
        if mkv and mkv.get("first_oom") is None:
            note = f"MaskKV fit up to the search limit {mkv.get('limit')}: a lower bound"
        ratio = _ratio(mkv.get("max_fit"), fc.get("max_fit"))
        checks.append(_check("llada-8b: longest prompt MaskKV / FullCache", ratio, ">=", 8, note))
    return checks


_TABLE = [
    ("method", "method", None),
    ("prompt", "prompt_len", None),
    ("step1 s", "first_step_s", 1.0),
    ("later ms", "later_step_s", 1e3),
    ("x NoCache", "speedup_vs_nocache", 1.0),
    ("x Full", "speedup_vs_fullcache", 1.0),
    ("KV full MiB", "prompt_kv_bytes_full", 2.0**-20),
    ("KV kept MiB", "prompt_kv_bytes_kept", 2.0**-20),
    ("kept/head", "kept_per_head_mean", 1.0),
    ("peak GiB", "peak_memory_bytes", 2.0**-30),
    ("/floor", "later_vs_floor", 1.0),
]


def _fmt(x: Any, scale: float | None) -> str:
    if x is None:
        return "-"
    if scale is None or isinstance(x, str):
        return str(x)
    v = x * scale
    if not math.isfinite(v):
        return "nan"
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"


def format_rows(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, float | None]]
) -> str:
    """Fixed-width table: ``columns`` are (header, row key, scale or None for as-is); columns
    without any value are left out."""
    cols = [c for c in columns if any(r.get(c[1]) is not None for r in rows)]
    cells = [[c[0] for c in cols]] + [[_fmt(r.get(k), s) for _, k, s in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)


def format_table(rows: Sequence[dict[str, Any]], timing: str = "median") -> str:
    """A compact fixed-width table of the rows (columns without any value are left out);
    ``timing`` picks the later-step column (median or min)."""
    table = [
        (f"later ms ({timing})", _LATER_KEY[timing], s) if key == "later_step_s" else (h, key, s)
        for h, key, s in _TABLE
    ]
    cols = [c for c in table if any(r.get(c[1]) is not None for r in rows)]
    cells = [[c[0] for c in cols]]
    for r in rows:
        if r.get("status", "ok") != "ok":
            cells.append([r["method"], str(r["prompt_len"]), r["status"]] + [""] * (len(cols) - 3))
            continue
        cells.append([_fmt(r.get(key), scale) for _, key, scale in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)


def format_targets(targets: Sequence[dict[str, Any]]) -> str:
    lines = []
    for t in targets:
        m = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        note = f"  ({t['note']})" if t["note"] else ""
        lines.append(f"[{t['status']:>4}] {t['target']}: {m} {t['op']} {t['bound']:g}{note}")
    return "\n".join(lines)


def format_search(search: dict[str, Any] | None) -> str:
    if not search:
        return ""
    return "\n".join(
        f"longest prompt that fits, {name}: {s['max_fit']} (first OOM: {s['first_oom']}, "
        f"limit {s['limit']})"
        for name, s in search.items()
    )


# ----------------------------------------------------------------------------- plot, save


def plot_results(result: BenchResult, path: str | os.PathLike) -> Path:
    """PNG: later-step latency vs prompt length per method (log-log); second panel peak memory
    (CUDA) or, on CPU where there is no peak counter, prompt KV bytes kept."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on benchmark machines
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ok = [r for r in result.rows if r["status"] == "ok"]
    timing = result.config.get("timing", "median")
    key = _LATER_KEY[timing]
    has_peak = any(r.get("peak_memory_bytes") for r in ok)
    mem_key = "peak_memory_bytes" if has_peak else "prompt_kv_bytes_kept"
    for i, name in enumerate(dict.fromkeys(r["method"] for r in ok)):
        style = {
            "marker": "o",
            "label": name,
            "color": f"C{i}",
        }  # one colour per method, both panels
        rs = sorted((r for r in ok if r["method"] == name), key=lambda r: r["prompt_len"])
        xs = [r["prompt_len"] for r in rs]
        ax1.plot(xs, [1e3 * r[key] for r in rs], **style)
        mem = [(r["prompt_len"], r.get(mem_key)) for r in rs if r.get(mem_key)]
        if mem:
            ax2.plot([x for x, _ in mem], [v / 2**30 for _, v in mem], **style)
    floor = [
        (r["prompt_len"], r["floor_s"]) for r in ok if r["method"] == "maskkv" and r.get("floor_s")
    ]
    if floor:
        ax1.plot(
            [x for x, _ in floor], [1e3 * f for _, f in floor], "k--", lw=1, label="floor (MaskKV)"
        )
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel(f"later-step latency, {timing} (ms)")
    ax1.set_title(f"{result.preset}: denoising step after step 1")
    ax2.set_ylabel("peak memory (GiB)" if has_peak else "prompt KV kept (GiB)")
    ax2.set_title(
        "peak device memory" if has_peak else "prompt KV bytes kept (no CPU peak counter)"
    )
    ax1.legend(fontsize=8)
    dev = device_name(result.config["device"]) if result.config.get("device") else ""
    fig.suptitle(f"maskkv e2e, {result.preset}, {dev}, budget {result.config.get('budget')}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(result: BenchResult) -> str:
    """Table, search and targets as printed at the end of a run."""
    parts = [format_table(result.rows, result.config.get("timing", "median"))]
    if result.search:
        parts.append(format_search(result.search))
    if result.ceilings:
        c = result.ceilings
        parts.append(
            f"ceilings: copy {c['copy_bandwidth_Bps'] / 1e9:.0f} GB/s, "
            f"{c['matmul_dtype']} matmul {c['matmul_flops'] / 1e12:.0f} TFLOP/s"
        )
    if result.targets:
        parts.append(format_targets(result.targets))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return out


def _str_list(text: str) -> list[str]:
    return [x for x in text.replace(" ", "").split(",") if x]


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The e2e benchmark's options (shared by ``maskkv bench`` and ``benchmarks/bench_e2e.py``)."""
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="model shape (default: llada-8b on CUDA, cpu otherwise)",
    )
    parser.add_argument(
        "--methods",
        type=_str_list,
        default=None,
        help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--budget", type=int, default=None, help="prompt KV pairs per head (256)")
    parser.add_argument(
        "--prompt-lens",
        type=_int_list,
        default=None,
        help="comma-separated prompt lengths (default: the preset's)",
    )
    parser.add_argument("--gen-length", type=int, default=None, help="response tokens (256)")
    parser.add_argument("--block-length", type=int, default=None, help="LLaDA block (gen-length)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps; a few suffice: step 1 + steps-1 timed later steps",
    )
    parser.add_argument(
        "--nocache-steps",
        type=int,
        default=3,
        help="NoCache runs only this many steps (each costs the same); 0 = --steps",
    )
    parser.add_argument(
        "--timing",
        choices=sorted(_LATER_KEY),
        default="median",
        help="later-step statistic for ratios/targets; min resists a loaded machine",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default=None, help="default: the preset's (cuda / cpu)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument(
        "--profile",
        choices=("calibrate", "uniform"),
        default="calibrate",
        help="layer profile for MaskKV/SqueezeAttention (random model: shape only)",
    )
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument(
        "--backend", default="auto", choices=("auto", "triton", "cpp", "torch", "reference")
    )
    parser.add_argument("--token-chunk", type=int, default=4096)
    parser.add_argument("--no-warmup", action="store_true", help="skip the short warm-up runs")
    parser.add_argument(
        "--max-prompt-search",
        action="store_true",
        help="CUDA: longest prompt that fits, FullCache vs MaskKV (slow)",
    )
    parser.add_argument("--search-limit", type=int, default=1 << 20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="output folder (default: benchmarks/results/<device>/)"
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--whole",
        action="store_true",
        help="whole-generation benchmark instead: total time of NoCache, the Fast-dLLM "
        "configuration, MaskKV + DLLMCache / PromptCache / DualCache (gen 256, block 32 unless "
        "given; the first of --prompt-lens)",
    )
    parser.add_argument(
        "--tokens-per-step",
        type=int,
        default=4,
        help="--whole: tokens revealed per step, the same for every configuration",
    )
    return parser


def run_from_args(args: argparse.Namespace) -> BenchResult:
    """Run the benchmark for parsed ``add_bench_arguments`` options (no saving)."""
    preset = args.preset or ("llada-8b" if torch.cuda.is_available() else "cpu")
    return run_e2e(
        preset,
        methods=args.methods,
        prompt_lens=args.prompt_lens,
        budget=args.budget,
        gen_length=args.gen_length,
        block_length=args.block_length,
        steps=args.steps,
        nocache_steps=args.nocache_steps or None,
        timing=args.timing,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        batch=args.batch,
        profile=args.profile,
        calib_len=args.calib_len,
        warmup=not args.no_warmup,
        backend=args.backend,
        token_chunk=args.token_chunk,
        seed=args.seed,
        max_prompt=args.max_prompt_search,
        search_limit=args.search_limit,
        progress=not args.quiet,
    )


def result_payload(result: BenchResult) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, rows) for a result file: ``benchmarks/common.save`` writes {env, config, rows},
    so the run-level measurements (ceilings, max-prompt search, targets) ride in ``config``."""
    config = {
        **result.config,
        "ceilings": result.ceilings,
        "search": result.search,
        "targets": result.targets,
    }
    return config, result.rows


def run_whole_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """``--whole``: run ``maskkv.bench_whole.run_whole`` and write whole_<preset>.json + .png."""
    from .bench_whole import plot_whole, report_whole, run_whole

    preset = args.preset or ("llada-8b" if torch.cuda.is_available() else "cpu")
    result = run_whole(
        preset,
        prompt_len=args.prompt_lens[0] if args.prompt_lens else None,
        gen_length=args.gen_length or 256,
        block_length=args.block_length or 32,
        tokens_per_step=args.tokens_per_step,
        budget=args.budget,
        threads=args.threads,
        seed=args.seed,
        progress=not args.quiet,
    )
    device = torch.device(result["config"]["device"])
    folder = Path(args.out or Path("benchmarks") / "results" / device_name(device))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"whole_{preset}.json"
    payload = {"env": environment(device), "config": result["config"], "rows": result["rows"]}
    payload["config"]["targets"] = result["targets"]
    path.write_text(json.dumps(payload, indent=1))
    print(report_whole(result))
    print(f"\nwrote {path}")
    if not args.no_plot:
        print(f"wrote {plot_whole(result, path.with_suffix('.png'))}")
    return result, path


def _cli(args: argparse.Namespace) -> None:
    if args.whole:
        run_whole_from_args(args)
        return
    result = run_from_args(args)
    device = torch.device(result.config["device"])
    folder = Path(args.out or Path("benchmarks") / "results" / device_name(device))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"e2e_{result.preset}.json"
    config, rows = result_payload(result)
    path.write_text(
        json.dumps({"env": environment(device), "config": config, "rows": rows}, indent=1)
    )
    print(report(result))
    print(f"\nwrote {path}")
    if not args.no_plot:
        print(f"wrote {plot_results(result, path.with_suffix('.png'))}")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``maskkv bench`` on an ``argparse`` subparsers object (from ``maskkv.cli``)."""
    parser = subparsers.add_parser(
        "bench",
        help="end-to-end benchmark: every method side by side on a random-weight model",
        description=__doc__.split("\n\n")[0],
    )
    add_bench_arguments(parser)
    parser.set_defaults(func=_cli)
    return parser
