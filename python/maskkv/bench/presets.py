"""Benchmark presets: the model shapes (LLaDA-8B, Dream-7B, the CPU and test presets), the
random-weight models and prompts built from them, the DESIGN targets, and the environment record
every result file carries."""

from __future__ import annotations

import contextlib
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
        name: preset name (``llada-8b``, ``dream-7b``, ``llada2-mini``, ``llada-moe-7b``,
            ``cpu``, ``cpu-llada2``, ``tiny``).
        kind: ``"llada"``, ``"dream"``, ``"llada2"`` or ``"lladamoe"`` (model class and sampler).
        layers, hidden, heads, kv_heads, ffn, vocab: the model shape (head dim = hidden / heads;
            ``ffn``: the dense MLP width).
        device, dtype: where and in which precision the model runs by default.
        prompt_lens: default prompt lengths of the grid.
        gen_length, steps, budget: default response length, denoising steps, KV budget
            (LLaDA2: ``steps`` per block).
        extra: further config fields of the MoE families (experts, routing, rotary), as
            (name, value) pairs.
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
    extra: tuple[tuple[str, Any], ...] = ()

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
    # LLaDA2.0-mini / 2.1-mini, the official config.json: 20 layers (the first dense), d 2048,
    # 16 query / 4 KV heads of 128 (half of each rotated), q/k norms, 256 experts of 512 (top-8
    # within 4 of 8 groups, scaling 2.5) plus one shared expert, vocabulary 157184. One block
    # of 32 (its official length) generated in 8 fixed steps: step 1 plus 7 later steps.
    "llada2-mini": Preset(
        name="llada2-mini", kind="llada2", layers=20, hidden=2048, heads=16, kv_heads=4,
        ffn=5120, vocab=157184, device="cuda", dtype="bfloat16",
        prompt_lens=(4096, 8192, 16384, 32768), gen_length=32, steps=8,
        extra=(("head_dim", 128), ("first_k_dense_replace", 1), ("num_experts", 256),
               ("num_experts_per_tok", 8), ("n_group", 8), ("topk_group", 4),
               ("moe_intermediate_size", 512), ("num_shared_experts", 1),
               ("routed_scaling_factor", 2.5), ("partial_rotary_factor", 0.5),
               ("rope_theta", 600000.0), ("max_position_embeddings", 32768),
               ("use_qk_norm", True), ("use_bias", False), ("rms_norm_eps", 1e-6)),
    ),
    # LLaDA-MoE-7B-A1B (model card and paper: 16 layers, d 2048, 16 heads of 128, 64 experts of
    # 1024, top-8, q/k norms, vocabulary 157184; its config.json was not available to check the
    # rest: no shared expert and every layer MoE are assumed, as in OLMoE, whose layout it uses).
    "llada-moe-7b": Preset(
        name="llada-moe-7b", kind="lladamoe", layers=16, hidden=2048, heads=16, kv_heads=16,
        ffn=8192, vocab=157184, device="cuda", dtype="bfloat16",
        prompt_lens=(4096, 8192, 16384, 32768),
        extra=(("num_experts", 64), ("num_experts_per_tok", 8),
               ("expert_intermediate_size", 1024), ("shared_expert_intermediate_size", None),
               ("moe_layer_freq", (1,) * 16), ("qk_layernorm", True),
               ("partial_rotary_factor", 1.0), ("rope_theta", 50000.0),
               ("max_position_embeddings", 8192)),
    ),
    # The CPU counterpart of llada2-mini for the same scripts: 4 layers (the first dense),
    # d 1024, 8 query / 2 KV heads of 128, 32 experts of 256 (top-4 within 2 of 4 groups) plus
    # a shared expert, fp32, small vocabulary.
    "cpu-llada2": Preset(
        name="cpu-llada2", kind="llada2", layers=4, hidden=1024, heads=8, kv_heads=2,
        ffn=2816, vocab=4096, device="cpu", dtype="float32", prompt_lens=(8192,),
        gen_length=32, steps=8,
        extra=(("head_dim", 128), ("first_k_dense_replace", 1), ("num_experts", 32),
               ("num_experts_per_tok", 4), ("n_group", 4), ("topk_group", 2),
               ("moe_intermediate_size", 256), ("num_shared_experts", 1),
               ("routed_scaling_factor", 2.5), ("partial_rotary_factor", 0.5),
               ("rope_theta", 600000.0), ("use_qk_norm", True), ("use_bias", False)),
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
    """The model config of a preset (``LLaDAConfig``, ``DreamConfig``, ``LLaDA2MoeConfig``,
    ``LLaDAMoEConfig``). The real presets keep the official special-token ids; the small ones
    put mask / eos inside their small vocabulary."""
    from ..models import DreamConfig, LLaDA2MoeConfig, LLaDAConfig, LLaDAMoEConfig

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
    if p.kind in ("llada2", "lladamoe"):
        extra = {k: list(v) if isinstance(v, tuple) else v for k, v in p.extra}
        shape = dict(
            hidden_size=p.hidden,
            num_hidden_layers=p.layers,
            num_attention_heads=p.heads,
            num_key_value_heads=p.kv_heads,
            vocab_size=p.vocab,
        )
        if p.kind == "llada2":
            return LLaDA2MoeConfig(intermediate_size=p.ffn, **shape, **ids, **extra)
        return LLaDAMoEConfig(dense_intermediate_size=p.ffn, **shape, **ids, **extra)
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
    raise ValueError(f"kind: expected 'llada', 'dream', 'llada2' or 'lladamoe', got {p.kind!r}")


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
    from ..models import DreamModelLM, LLaDA2MoeModelLM, LLaDAModelLM, LLaDAMoEModelLM

    p = PRESETS[preset] if isinstance(preset, str) else preset
    device = torch.device(device or p.device)
    dtype = _dtype(dtype or p.dtype)
    classes = {
        "llada": LLaDAModelLM,
        "dream": DreamModelLM,
        "llada2": LLaDA2MoeModelLM,
        "lladamoe": LLaDAMoEModelLM,
    }
    cls = classes[p.kind]
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


def weight_bytes(model, tokens: int | None = None) -> int:
    """Bytes a later step reads: all parameters except the input embedding table (a later step
    gathers only the response rows of it). With MoE layers and ``tokens`` (the rows a step
    routes), only the experts those rows are expected to reach count: with uniform routing of
    k of E experts per row, E * (1 - (1 - k / E) ** tokens) per layer."""
    from ..models._moe import ExpertList

    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)
    if tokens is None:
        return total
    k = getattr(model.config, "num_experts_per_tok", None)
    for experts in (m for m in model.modules() if isinstance(m, ExpertList)):
        E = len(experts)
        per_expert = sum(p.numel() * p.element_size() for p in experts[0].parameters())
        reached = E * (1 - (1 - k / E) ** tokens)
        total -= int((E - reached) * per_expert)
    return total
