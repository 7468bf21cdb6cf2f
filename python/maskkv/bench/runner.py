"""The end-to-end runner: ceilings and the later step's floor, one generation per (method,
prompt length) in one process, ratios side by side, the longest-prompt search."""

from __future__ import annotations

import dataclasses
import gc
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .presets import (
    DEFAULT_METHODS,
    PRESETS,
    Preset,
    _dtype,
    build_model,
    random_prompt,
    weight_bytes,
)
from .result import _LATER_KEY, BenchResult, _ratio, check_targets

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


def measure_attention_rate(
    device: torch.device | str,
    dtype: torch.dtype | str = torch.bfloat16,
    *,
    heads: int = 32,
    kv_heads: int = 32,
    head_dim: int = 128,
    q_len: int = 4096,
    kv_len: int = 32768,
    reps: int = 5,
) -> float:
    """FLOP/s of one non-causal SDPA forward (torch's own kernel choice) at a step-1 query chunk:
    ``q_len`` queries of ``heads`` heads over ``kv_len`` keys, 4 * q_len * kv_len * heads * D FLOPs
    (CUDA only). K / V expanded to the query heads as step 1 does for GQA."""
    import torch.nn.functional as F

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device: the attention rate is measured on CUDA, got {device}")
    dtype = _dtype(dtype)
    buf = {"q": torch.randn(1, heads, q_len, head_dim, device=device, dtype=dtype)}
    buf["k"] = torch.randn(1, heads, kv_len, head_dim, device=device, dtype=dtype)
    buf["v"] = torch.randn_like(buf["k"])
    t = _cuda_time(
        lambda: F.scaled_dot_product_attention(buf["q"], buf["k"], buf["v"]), device, reps
    )
    buf.clear()
    torch.cuda.empty_cache()
    return 4 * q_len * kv_len * heads * head_dim / t


def step1_floor(
    model, prompt_len: int, gen_length: int, ceilings: dict[str, float], attention_flops: float
) -> dict[str, float]:
    """Step 1's floor: its GEMM FLOPs at the measured matmul rate plus its attention FLOPs at the
    measured attention rate. GEMMs: 2 * L * (linear parameters of a layer) per layer, plus the
    LM head on the response; attention: 4 * L^2 * Hq * D per layer (bidirectional, all L)."""
    cfg = model.config
    L = prompt_len + gen_length
    layer_params = sum(p.numel() for p in model.layers[0].parameters() if p.dim() == 2)
    layers = len(model.layers)
    vocab = model.get_input_embeddings().weight.shape[0]
    gemm = 2 * L * layer_params * layers + 2 * gen_length * cfg.hidden_size * vocab
    attn = 4 * L * L * cfg.num_attention_heads * cfg.head_dim * layers
    t_gemm, t_attn = gemm / ceilings["matmul_flops"], attn / attention_flops
    return {
        "step1_floor_s": t_gemm + t_attn,
        "step1_gemm_flops": gemm,
        "step1_attention_flops": attn,
        "step1_floor_gemm_s": t_gemm,
        "step1_floor_attention_s": t_attn,
        "attention_flops_per_s": attention_flops,
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

    Response FLOPs = per layer 2 * T * (linear parameters a token uses: in an MoE layer its k
    experts, not all) + attention 4 * T * Hq * D * (kept + T) (QK^T and PV), plus the LM head
    2 * need * d * vocab; T = the positions a later step runs (Dream: the response plus the last
    prompt position). Weight bytes: an MoE layer counts the experts the step's T * batch rows
    are expected to reach (``weight_bytes``). ``kept_per_layer``: mean kept prompt tokens per KV
    head of each layer.
    """
    from ..models._moe import ExpertList

    cfg = model.config
    T = gen_length + (1 if getattr(model, "dllm_kind", "llada") == "dream" else 0)
    Hq, D = cfg.num_attention_heads, cfg.head_dim
    k = getattr(cfg, "num_experts_per_tok", None)
    flops = 0.0
    for layer, kept in zip(model.layers, kept_per_layer):
        banks = [m for m in layer.modules() if isinstance(m, ExpertList)]
        in_banks = {id(p) for b in banks for p in b.parameters()}
        used = sum(p.numel() for p in layer.parameters() if p.dim() == 2 and id(p) not in in_banks)
        used += sum(k * sum(p.numel() for p in b[0].parameters()) for b in banks)
        flops += 2 * T * used + 4 * T * Hq * D * (kept + T)
    head = 2 * need_tokens * cfg.hidden_size * model.get_input_embeddings().weight.shape[0]
    flops = batch * (flops + head)
    wbytes = weight_bytes(model, tokens=T * batch)
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
    from .. import methods

    # FullCache / NoCache accept a budget too (ignored); give it to all so rows record it.
    return methods.get(name, budget=budget)


def _generate(model, ids, method, *, gen_length, block_length, steps, profile, backend, chunk):
    from ..generation import FixedSteps, generate
    from ..methods import MissingProfileWarning

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
            # Random weights give meaningless confidences: every model follows its fixed
            # schedule (LLaDA2's threshold rule would reveal an arbitrary number per step).
            decoding=FixedSteps(),
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
    search_limit: int = 1 << 24,
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
        max_prompt: also search the longest prompt that fits for FullCache and MaskKV (CUDA;
            ``max_prompt_search``: from the memory model's prediction, up to ``search_limit``,
            ``search_refine`` bisection steps between the last fit and the first failure).
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
        m.name in ("maskkv", "squeezeattention", "tailvote") for m in method_objs
    ):
        from ..calibrate import calibrate

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
    start: int | None = None,
    limit: int = 1 << 24,
    refine: int = 3,
    gen_length: int = 256,
    profile=None,
    backend: str = "auto",
    token_chunk: int = 4096,
    batch: int = 1,
    probe_layers: int | None = 1,
    step: float = 1.1,
    quantum: int = 1024,
    free_bytes: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Longest prompt that fits, per method (CUDA), by search around the memory model's answer.

    Each try is step 1 (where every method's memory peaks: the full pass, plus, for FullCache,
    the whole prompt KV of every layer) at prompt length P; it fits unless
    ``torch.cuda.OutOfMemoryError``. The first try is ``memory.predict_max_prompt`` for the free
    device memory (or ``start``), rounded down to ``quantum`` tokens; from there P moves by
    factors of ``step`` until one try fits and one does not, then ``refine`` bisection steps
    (down to ``quantum``).

    ``probe_layers`` (default 1): each try is a ``memory.probe`` -- the first layers run, the
    other layers' caches are allocated as placeholders, attention runs only for the query
    chunks selection needs -- so a 1M-token try takes seconds, not the quadratic time of a full
    pass; the peak is the full pass's (``tests/test_memory_model.py`` checks it on CPU, and
    ``probe_check`` rows compare both on the GPU). None runs the whole model.

    ``free_bytes``: a memory budget instead of the device's free memory; a try whose measured
    peak exceeds it does not fit (how the search runs on the CPU, in tests).

    Returns ``{method: {"max_fit", "first_oom", "predicted_max", "limit", "free_bytes",
    "tries": [{prompt_len, fits, peak_memory_bytes, peak_reserved_bytes, predicted_peak_bytes,
    seconds}]}}``; peaks are above the weights (allocated before the search).
    """
    from tqdm.auto import tqdm

    from . import memory

    device = next(model.parameters()).device
    if device.type != "cuda" and free_bytes is None:
        raise ValueError(f"free_bytes: expected a memory budget for a model on {device}")
    out: dict[str, Any] = {}
    for name in methods:
        m = _make_method(name, budget)
        _release(device)
        if free_bytes is not None:
            free = free_bytes
        else:
            free = torch.cuda.mem_get_info(device)[0]
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        kw = dict(profile=None if probe_layers else profile, batch=batch, token_chunk=token_chunk)
        kw["device"] = device
        predicted = memory.predict_max_prompt(model, m, free, gen_length=gen_length, **kw)
        tries: list[dict[str, Any]] = []
        bar = tqdm(desc=f"max prompt {m.name}", unit="try", disable=not progress)

        def fits(P: int, m=m, tries=tries, bar=bar, kw=kw) -> bool:
            ids = random_prompt(model, P, batch=batch, seed=P, device=device)

            def run(ids=ids):
                return _generate(
                    model, ids, m, gen_length=gen_length, block_length=gen_length, steps=1,
                    profile=kw["profile"], backend=backend, chunk=token_chunk,
                )  # fmt: skip

            t0 = time.perf_counter()
            peak = reserved = None
            try:
                if probe_layers:
                    with memory.probe(model, m, P, layers=probe_layers, batch=batch) as held:
                        _, peak, reserved = memory.measure_peak(run, device)
                    peak += held
                    reserved = None if reserved is None else reserved + held
                else:
                    _, peak, reserved = memory.measure_peak(run, device)
                ok = free_bytes is None or peak <= free_bytes
            except _oom_types():
                ok = False
            del ids, run
            _release(device)
            pred = memory.step1_memory(model, P, gen_length, m, **kw)
            tries.append(
                {
                    "prompt_len": P,
                    "fits": ok,
                    "peak_memory_bytes": peak,
                    "peak_reserved_bytes": reserved,
                    "predicted_peak_bytes": pred.peak_bytes,
                    "predicted_phase": pred.phase,
                    "seconds": time.perf_counter() - t0,
                }
            )
            bar.set_postfix_str(f"{m.name} P={P} {'ok' if ok else 'OOM'}")
            bar.update()
            return ok

        good, bad = None, None
        P = max(quantum, (start or predicted) // quantum * quantum)
        for _ in range(12):  # bracket: one fit, one OOM (or the limit)
            if P > limit:
                break
            if fits(P):
                good = P
                if bad is not None:
                    break
                P = int(P * step) // quantum * quantum + quantum
            else:
                bad = P
                if good is not None or P <= quantum:
                    break
                P = max(quantum, int(P / step) // quantum * quantum)
        for _ in range(refine):
            if good is None or bad is None or bad - good <= quantum:
                break
            mid = (good + bad) // 2 // quantum * quantum
            if fits(mid):
                good = mid
            else:
                bad = mid
        bar.close()
        out[m.name] = {
            "max_fit": good,
            "first_oom": bad,
            "predicted_max": predicted,
            "limit": limit,
            "free_bytes": free,
            "probe_layers": probe_layers,
            "tries": tries,
        }
    return out
