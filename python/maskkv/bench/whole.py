"""Whole-generation benchmark: total time of a full response under each (method, cache policy).

DESIGN "Performance contract", whole generation: NoCache, the Fast-dLLM configuration (no
eviction, ``DualCache(refresh_prompt=True)``), the MaskKV paper's configuration (MaskKV +
``DLLMCache(50, 5, 0.25)``), MaskKV + ``PromptCache`` and MaskKV + ``DualCache``, side by side on
one random-weight model.

On CUDA each cached configuration's row also gets step 1's share of its total and step 1
against its floor (``runner.step1_floor``: its GEMM and attention FLOPs at the matmul and
attention rates measured in the same run): at 32k, step 1 is most of a whole generation.

Random weights give meaningless confidences, so a threshold rule would reveal a different,
arbitrary number of tokens per step in each configuration. Every configuration therefore runs
the same fixed schedule (``FixedSteps`` with ``gen_length / tokens_per_step`` steps), standing in
for the threshold rule of the real runs; the JSON states it. NoCache recomputes everything at
every step, so its total is the median of a few full passes times the step count (stated as
extrapolated).

Block-causal presets (LLaDA2) run ``LLADA2_CONFIGURATIONS`` instead: their exact cache is the
committed-block cache (``DualCache``; what dInfer and SGLang run), the Fast-dLLM analogue
recomputes the prompt at every block start, and dLLM-Cache does not apply.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["CONFIGURATIONS", "LLADA2_CONFIGURATIONS", "plot_whole", "report_whole", "run_whole"]

# (label, method name, cache policy factory name, refresh_prompt / DLLMCache args)
CONFIGURATIONS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("NoCache", "nocache", "prompt", {}),
    ("Fast-dLLM (FullCache + DualCache refresh_prompt)", "fullcache", "dual",
     {"refresh_prompt": True}),
    ("paper (MaskKV + DLLMCache 50/5/0.25)", "maskkv", "dllm",
     {"prompt_interval": 50, "response_interval": 5, "transfer_ratio": 0.25}),
    ("MaskKV + PromptCache", "maskkv", "prompt", {}),
    ("MaskKV + DualCache", "maskkv", "dual", {}),
]  # fmt: skip


LLADA2_CONFIGURATIONS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("NoCache", "nocache", "prompt", {}),
    ("Fast-dLLM (FullCache + DualCache refresh_prompt)", "fullcache", "dual",
     {"refresh_prompt": True}),
    ("FullCache + DualCache (exact)", "fullcache", "dual", {}),
    ("MaskKV + PromptCache", "maskkv", "prompt", {}),
    ("MaskKV + DualCache", "maskkv", "dual", {}),
]  # fmt: skip


def _policy(name: str, kwargs: dict[str, Any]):
    from ..generation import DLLMCache, DualCache, PrefixCache, PromptCache

    return {"prompt": PromptCache, "prefix": PrefixCache, "dual": DualCache, "dllm": DLLMCache}[
        name
    ](**kwargs)


def run_whole(
    preset: str = "cpu",
    *,
    prompt_len: int | None = None,
    gen_length: int = 256,
    block_length: int = 32,
    tokens_per_step: int = 4,
    budget: int | None = None,
    nocache_passes: int = 2,
    threads: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Total generation time of every configuration in ``CONFIGURATIONS``.

    Args:
        preset: a ``maskkv.bench.PRESETS`` name (model shape, device, dtype, default budget).
        prompt_len: default the preset's longest prompt length.
        gen_length, block_length: the response and its blocks (the DESIGN run: 256, 32).
        tokens_per_step: tokens revealed per step, the same for every configuration.
        nocache_passes: full passes timed for NoCache's extrapolated total.
        threads: ``torch.set_num_threads`` (CPU).
    Returns:
        ``{"config": ..., "rows": [...], "targets": [...]}`` ready for a result file.
    """
    from .. import methods
    from ..calibrate import calibrate
    from ..generation import FixedSteps, generate
    from ..generation.block_causal import BlockCausalDenoiser, BlockLayout
    from ..generation.engine import Denoiser
    from .presets import PRESETS, _dtype, build_model, random_prompt

    p = PRESETS[preset]
    device = torch.device(p.device)
    dtype = _dtype(p.dtype)
    prompt_len = prompt_len or max(p.prompt_lens)
    budget = p.budget if budget is None else budget
    if gen_length % block_length or gen_length % tokens_per_step:
        raise ValueError(
            f"block_length, tokens_per_step: expected divisors of gen_length={gen_length}, got "
            f"{block_length}, {tokens_per_step}"
        )
    steps = gen_length // tokens_per_step
    if steps % (gen_length // block_length):
        raise ValueError(
            f"tokens_per_step: {tokens_per_step} gives {steps} steps, not a multiple of the "
            f"{gen_length // block_length} blocks"
        )
    if threads is not None:
        torch.set_num_threads(threads)
    model = build_model(p, device=device, dtype=dtype, seed=seed)
    profile = calibrate(model, [random_prompt(model, 512, seed=seed + 1)], gen_length=gen_length)
    ids = random_prompt(model, prompt_len, seed=seed + prompt_len, device=device)
    floor = None
    if device.type == "cuda":
        from .runner import measure_attention_rate, measure_ceilings, step1_floor

        cfg = model.config
        rate = measure_attention_rate(
            device, dtype, heads=cfg.num_attention_heads, head_dim=cfg.head_dim,
            kv_len=prompt_len + gen_length,
        )  # fmt: skip
        floor = step1_floor(model, prompt_len, gen_length, measure_ceilings(device, dtype), rate)
    rows: list[dict[str, Any]] = []
    block_causal = p.kind == "llada2"
    configurations = LLADA2_CONFIGURATIONS if block_causal else CONFIGURATIONS
    for label, name, cache_name, cache_kwargs in configurations:
        method = methods.get(name, budget=budget)
        policy = _policy(cache_name, cache_kwargs)
        if progress:
            print(f"[whole] {label} ...", flush=True)
        row: dict[str, Any] = {
            "config": label,
            "method": method.name,
            "cache": repr(policy),
            "decoding": f"FixedSteps ({tokens_per_step} tokens per step)",
        }
        if not method.caches_prompt and block_causal:
            # Passes over [prompt ‖ first block]: the later blocks' windows are longer by at
            # most gen_length tokens.
            mask_id = model.config.mask_token_id
            layout, x = BlockLayout.build(ids, None, gen_length, block_length, mask_id)
            den = BlockCausalDenoiser(model, method, layout, token_chunk=4096)
            for _ in range(nocache_passes):
                den.block_logits(x, 0)
        elif not method.caches_prompt:
            x = torch.nn.functional.pad(ids, (0, gen_length), value=model.config.mask_token_id)
            need = torch.zeros(1, gen_length, dtype=torch.bool, device=device)
            need[:, :block_length] = True
            den = Denoiser(model, method, prompt_len, token_chunk=4096)
            for _ in range(nocache_passes):
                den(x, need)
        if not method.caches_prompt:
            per = sorted(den.stats.step_times)[len(den.stats.step_times) // 2]
            row.update(
                total_s=per * steps,
                extrapolated=True,
                nfe=steps,
                per_pass_s=per,
                refresh_s=per * steps,
                inner_s=0.0,
                mean_tokens_per_step=tokens_per_step,
                response_kv_bytes=0,
                prompt_kv_bytes=0,
            )
        else:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", methods.MissingProfileWarning)
                out = generate(
                    model,
                    ids,
                    method=method,
                    cache=policy,
                    gen_length=gen_length,
                    block_length=block_length,
                    # LLaDA2 counts steps per block
                    steps=steps // (gen_length // block_length) if block_causal else steps,
                    profile=profile,
                    decoding=FixedSteps(),
                )
            wall = time.perf_counter() - t0
            s = out.stats
            row.update(
                total_s=s.total_time,
                wall_s=wall,
                extrapolated=False,
                nfe=s.nfe,
                first_step_s=s.first_step_time,
                refresh_s=s.refresh_time,
                inner_s=s.inner_time,
                first_step_share=s.first_step_time / s.total_time,
                passes={k: s.step_kinds.count(k) for k in sorted(set(s.step_kinds))},
                mean_tokens_per_step=s.mean_tokens_per_step,
                response_kv_bytes=s.response_kv_bytes,
                prompt_kv_bytes=s.prompt_kv_bytes_kept,
            )
        if floor is not None and "first_step_s" in row:
            row["first_step_vs_floor"] = row["first_step_s"] / floor["step1_floor_s"]
        rows.append(row)
        if progress:
            print(f"[whole]   total {row['total_s']:.2f} s, {row['nfe']} passes", flush=True)
    by = {r["config"]: r["total_s"] for r in rows}
    nocache, fast = by[configurations[0][0]], by[configurations[1][0]]
    for r in rows:
        r["speedup_vs_nocache"] = nocache / r["total_s"]
        r["speedup_vs_fastdllm"] = fast / r["total_s"]
    ours = next(r for r in rows if r["config"] == "MaskKV + DualCache")
    targets = [
        _target("MaskKV + DualCache vs Fast-dLLM config", ours["speedup_vs_fastdllm"], 5),
        _target("MaskKV + DualCache vs NoCache", ours["speedup_vs_nocache"], 100),
    ]
    if block_causal:
        exact = by["FullCache + DualCache (exact)"]
        for r in rows:
            r["speedup_vs_exact_cache"] = exact / r["total_s"]
    config = {
        "preset": p.name,
        "shape": {k: getattr(p, k) for k in ("layers", "hidden", "heads", "kv_heads", "ffn")},
        "device": str(device),
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "prompt_len": prompt_len,
        "gen_length": gen_length,
        "block_length": block_length,
        "budget": budget,
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "tokens_per_step_note": "fixed and identical for every configuration: random weights "
        "give meaningless confidences, so this fixed schedule stands in for Threshold(0.9)",
        "nocache_note": f"NoCache total = median of {nocache_passes} full passes x {steps} steps",
        "step1_floor": floor,
    }
    return {"config": config, "rows": rows, "targets": targets}


def _target(what: str, measured: float, bound: float) -> dict[str, Any]:
    return {
        "target": what,
        "measured": measured,
        "bound": f">= {bound}",
        "status": "PASS" if measured >= bound else "MISS",
    }


def report_whole(result: dict[str, Any]) -> str:
    """A plain-text table of the rows and the targets."""
    from ..tables import format_rows

    cols = [
        ("config", "config", None),
        ("total s", "total_s", 1.0),
        ("passes", "nfe", None),
        ("refresh s", "refresh_s", 1.0),
        ("inner s", "inner_s", 1.0),
        ("resp KV MiB", "response_kv_bytes", 2.0**-20),
        ("x NoCache", "speedup_vs_nocache", 1.0),
        ("x Fast-dLLM", "speedup_vs_fastdllm", 1.0),
        ("step1 s", "first_step_s", 1.0),
        ("step1 share", "first_step_share", 1.0),
        ("step1 / floor", "first_step_vs_floor", 1.0),
    ]
    lines = [format_rows(result["rows"], cols), ""]
    floor = result["config"].get("step1_floor")
    if floor:
        lines.append(
            f"step 1 floor {floor['step1_floor_s']:.3f} s = GEMMs {floor['step1_floor_gemm_s']:.3f}"
            f" s + attention {floor['step1_floor_attention_s']:.3f} s (at "
            f"{floor['attention_flops_per_s'] / 1e12:.0f} TFLOP/s)"
        )
    for t in result["targets"]:
        lines.append(f"{t['status']}  {t['target']}: {t['measured']:.1f}x ({t['bound']})")
    return "\n".join(lines)


def plot_whole(result: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of total generation time per configuration (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [r["config"].replace(" (", "\n(") for r in rows]
    bars = ax.barh(labels, [r["total_s"] for r in rows], color="tab:blue")
    for bar, r in zip(bars, rows):
        note = " (extrapolated)" if r.get("extrapolated") else ""
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {r['total_s']:.1f} s{note}", va="center", fontsize=8)  # fmt: skip
    ax.set_xscale("log")
    ax.invert_yaxis()
    c = result["config"]
    ax.set_xlabel("total generation time (s, log)")
    ax.set_title(
        f"{c['preset']}: prompt {c['prompt_len']}, gen {c['gen_length']}, block "
        f"{c['block_length']}, {c['tokens_per_step']} tokens/step, budget {c['budget']}",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
