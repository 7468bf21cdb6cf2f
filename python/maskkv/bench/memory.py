"""Peak memory of step 1 (the full pass over [prompt ‖ masks]): a model that predicts it, the
measurement it is checked against, and the probe that makes a longest-prompt search affordable.

Why step 1: it is where every method peaks. The pass runs layer by layer over L = P + R tokens
(``Denoiser._full_pass``); what it holds is

- for the whole pass: the hidden states [B, L, d], the RoPE tables (fp32 [B, L, D] twice), the
  prompt caches of the layers done so far -- FullCache: all prompt KV of every layer; an eviction
  method: ``budget`` rows per KV head -- and, with a response-KV policy, every layer's response KV;
- per layer: q, k, v of all L tokens (the keys and values are needed by every query chunk and by
  ``select_and_gather``), K / V expanded to the query heads for GQA, and one token chunk's
  transients (norms in fp32, projections, attention output, MLP), which the in-place residual
  adds keep from growing with L.

So FullCache grows by ``2 * layers * Hkv * D`` elements per token and an eviction method by the
activations only (~4 d elements per token for an MHA model): the longest prompt that fits is
bound by activations, not by the KV of all layers. ``step1_memory`` adds these up per phase of a
layer and reports the largest; ``measure_peak`` measures the same quantity (bytes allocated above
what was allocated before) on CUDA from the caching allocator's statistics and on the CPU from the
profiler's allocation events; ``tests/test_memory_model.py`` checks the one against the other.

``max_prompt_search`` (``runner.py``) uses the model to start its search next to the answer and
records the prediction beside every measured try; with ``probe`` each try runs the first layer
only, with the other layers' caches allocated as placeholders and the attention of only the
query chunks step 1 needs for selection: the same peak (every layer holds the same transients;
the skipped query chunks would allocate and free the same buffers), in seconds instead of the
quadratic time of a 1M-token pass.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Step1Memory", "measure_peak", "predict_max_prompt", "probe", "step1_memory"]


# ----------------------------------------------------------------------------- measurement


def measure_peak(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, int, int | None]:
    """Run ``fn()``; return (its result, peak bytes allocated above the bytes allocated before,
    peak bytes reserved by the CUDA caching allocator above its reservation before, or None).

    CUDA: ``torch.cuda`` memory statistics. CPU: the profiler's allocation events (every CPU
    allocator call, C++ kernels included), summed in time order; allocations made before the
    call and freed during it count zero, as on CUDA they lower the current total below the base.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        base_reserved = torch.cuda.memory_reserved(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return out, peak, torch.cuda.max_memory_reserved(device) - base_reserved
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    sizes: list[tuple[int, int]] = []

    def walk(node) -> None:
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    total = peak = 0
    for _, size in sorted(sizes):
        total += size
        peak = max(peak, total)
    return out, peak, None


# ----------------------------------------------------------------------------- the model


@dataclass
class Step1Memory:
    """Predicted step-1 peak above the weights and the input ids.

    ``peak_bytes`` is the largest phase; ``phase`` names it ("rope", "qkv", "attention",
    "select", "mlp" of layer ``layer``, or "head"); ``persistent`` / ``transient`` split that
    phase into what the pass holds (hidden states, tables, caches, q / k / v) and what the phase
    adds; ``per_token`` is d(peak) / dL at this L (the slope that bounds the longest prompt).
    """

    peak_bytes: int
    phase: str
    layer: int
    persistent: dict[str, int] = field(default_factory=dict)
    transient: dict[str, int] = field(default_factory=dict)
    per_token: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "phase": self.phase,
            "layer": self.layer,
            "persistent": dict(self.persistent),
            "transient": dict(self.transient),
            "per_token": self.per_token,
        }


def _kept_rows(method, layers: int, Pc: int, batch: int, kv_heads: int, profile) -> list[int]:
    """Prompt KV rows each layer keeps after step 1 (all heads of all rows)."""
    if not method.caches_prompt:
        return [0] * layers
    if not method.evicts:
        return [batch * kv_heads * Pc] * layers
    with warnings.catch_warnings():  # no profile: uniform layer budgets, as the engine falls back
        warnings.simplefilter("ignore")
        budgets = method.layer_budgets(layers, Pc, profile)
    return [batch * kv_heads * min(int(k), Pc) for k in budgets]


def _phases(shape: dict[str, Any], L: int, kept: list[int]) -> list[tuple[str, int, dict, dict]]:
    """(phase, layer, persistent parts, transient parts) of every phase of the pass, in order."""
    B, e, d, Hq, Hkv, D, F = (shape[k] for k in ("B", "e", "d", "Hq", "Hkv", "D", "F"))
    layers, V, Pc, R, device = (
        shape["layers"],
        shape["V"],
        shape["Pc"],
        L - shape["P"],
        shape["device"],
    )
    c = min(shape["chunk"], L)
    G = Hq // Hkv
    keep_tail = 2 * e * B * Hkv * (L - Pc) * D if shape["keeps_response_kv"] else 0
    base = {"positions": 8 * B * L, "rope tables": 8 * B * L * D, "hidden": e * B * L * d}
    # RoPE tables: fp32 positions, half-width frequencies, the doubled table, cos, sin.
    out = [("rope", -1, {"positions": 8 * B * L}, {"tables": (4 + 2 * D + 12 * D) * B * L})]
    # One token chunk's transients. qkv: the fp32 norm (two fp32 copies), or the normed chunk,
    # the projections and the RoPE of q (fp32: the input, two products, the rotated half; in
    # the model dtype for Qwen2-style RoPE).
    rope_q = (16 if shape["rope_fp32"] else 4 * e) * B * c * Hq * D
    t_qkv = max(8 * B * c * d, e * B * c * (d + (Hq + 2 * Hkv) * D) + rope_q)
    # attention: the chunk's output, its merged copy, the output projection and the sum.
    t_attn = e * B * c * (Hq * D + 3 * d) + 4 * B * Hq * (c + R)  # + LSE chunks
    t_mlp = max(8 * B * c * d, e * B * c * (2 * d + 3 * F))
    qkv = e * B * L * (Hq + 2 * Hkv) * D
    expand = 2 * e * B * Hq * L * D if G > 1 else 0
    # torch's CPU flash attention packs K and V per call (their size, at the query heads).
    packed = 2 * e * B * Hq * L * D if device == "cpu" else 0
    done = 0
    for i in range(layers):
        held = {**base, "caches": done + i * keep_tail}
        bufs = qkv if L > c else 0  # one chunk: q, k, v are the chunk's own outputs
        out.append(("qkv", i, held, {"q k v": bufs, "chunk": t_qkv + (qkv if L <= c else 0)}))
        att = {"gqa expand": expand, "cpu packed k v": packed, "chunk": t_attn}
        out.append(("attention", i, {**held, "q k v": qkv}, att))
        cache = kept[i] * (2 * e * D + 4) + 4 * (B * Hkv + 1)
        if shape["evicts"]:  # scores, mask mass, budgets: fp32 / int32 per (row, head, key)
            sel = {"scores": 4 * B * Hkv * Pc, "new cache": cache}
        elif kept[i]:  # keep-all gather: int64 row indices (built on the host), the copy
            sel = {"indices": (40 if device == "cpu" else 8) * kept[i], "new cache": cache}
        else:
            sel = {}
        out.append(("select", i, {**held, "q k v": qkv}, sel))
        done += cache
        out.append(("mlp", i, {**base, "caches": done + (i + 1) * keep_tail}, {"chunk": t_mlp}))
    head = {"rows": e * B * R * d, "fp32 norm": 8 * B * R * d, "logits": e * B * R * V}
    out.append(("head", layers, {**base, "caches": done + layers * keep_tail}, head))
    return out


def step1_memory(
    model,
    prompt_len: int,
    gen_length: int,
    method,
    *,
    profile=None,
    batch: int = 1,
    token_chunk: int = 4096,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    keeps_response_kv: bool = False,
) -> Step1Memory:
    """Predicted peak of step 1 of ``generate(model, ..., method=method)`` above the weights.

    Args:
        model: a LLaDA / Dream model (only its config, kind and dtype are read).
        prompt_len, gen_length: P and R.
        method: a ``maskkv.methods.Method`` (its layer budgets decide the kept rows).
        profile: the layer profile the method would get. batch: B.
        token_chunk: the Denoiser's token chunk. device, dtype: default the model's.
        keeps_response_kv: a cache policy that stores the response KV (Prefix / Dual / DLLMCache).
    """
    cfg = model.config
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    shift = 1 if getattr(model, "dllm_kind", "llada") == "dream" else 0
    layers = cfg.num_hidden_layers
    shape = {
        "B": batch, "e": torch.finfo(dtype).bits // 8, "d": cfg.hidden_size,
        "Hq": cfg.num_attention_heads, "Hkv": cfg.num_key_value_heads, "D": cfg.head_dim,
        "F": cfg.intermediate_size, "layers": layers, "V": model.get_input_embeddings().weight.shape[0],
        "P": prompt_len, "Pc": max(prompt_len - shift, 0), "chunk": token_chunk,
        "device": device.type, "rope_fp32": shift == 0, "evicts": method.evicts,
        "keeps_response_kv": keeps_response_kv,
    }  # fmt: skip

    def at(L: int) -> Step1Memory:
        Pc = max(L - gen_length - shift, 0)
        kept = _kept_rows(method, layers, Pc, batch, shape["Hkv"], profile)
        best = None
        for phase, layer, held, extra in _phases({**shape, "Pc": Pc, "P": L - gen_length}, L, kept):
            total = sum(held.values()) + sum(extra.values())
            if best is None or total > best.peak_bytes:
                best = Step1Memory(total, phase, layer, held, extra)
        return best

    L = prompt_len + gen_length
    result = at(L)
    result.per_token = (at(L + 1024).peak_bytes - result.peak_bytes) / 1024
    return result


def predict_max_prompt(
    model, method, free_bytes: int, *, gen_length: int = 256, limit: int = 1 << 24, **kwargs
) -> int:
    """Longest prompt (a multiple of 256) whose predicted step-1 peak fits in ``free_bytes``;
    0 when not even 256 tokens fit. ``kwargs`` go to ``step1_memory``."""

    def fits(P: int) -> bool:
        return step1_memory(model, P, gen_length, method, **kwargs).peak_bytes <= free_bytes

    lo, hi = 0, 256
    while hi <= limit and fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 256:  # invariant: lo fits (or is 0), hi does not (or passed the limit)
        mid = (lo + hi) // 2 // 256 * 256
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ----------------------------------------------------------------------------- the probe


def _layer_list_owner(model) -> tuple[torch.nn.Module, str]:
    """(parent module, attribute) holding the ModuleList that ``model.layers`` returns."""
    layers = model.layers
    for module in model.modules():
        for attr, child in module.named_children():
            if child is layers:
                return module, attr
    raise ValueError("model: expected its `layers` ModuleList among its submodules")


@contextlib.contextmanager
def probe(model, method, prompt_len: int, *, layers: int = 1, batch: int = 1) -> Iterator[int]:
    """Run step 1 as a memory probe inside this context: only the first ``layers`` layers run
    (every weight stays allocated), the caches the other layers would keep are allocated as
    placeholders on entry, and the attention of a full pass runs for the first query chunk and
    the chunks holding the response rows only (the others would allocate and free the same
    buffers: the peak is the same; the hidden states are not, so the output is meaningless).

    Yields the placeholder bytes: a peak measured inside the context plus these is the probed
    peak of the whole pass. (Caches of the skipped layers sized with uniform layer budgets.)
    """
    from ..generation import engine

    owner, attr = _layer_list_owner(model)
    full = getattr(owner, attr)
    cfg, param = model.config, next(model.parameters())
    Pc = max(prompt_len - (1 if getattr(model, "dllm_kind", "llada") == "dream" else 0), 0)
    kept = _kept_rows(method, len(full), Pc, batch, cfg.num_key_value_heads, None)
    placeholders = [  # per skipped layer: its K and V rows, its positions
        (
            torch.empty(2 * rows * cfg.head_dim, dtype=param.dtype, device=param.device),
            torch.empty(rows, dtype=torch.int32, device=param.device),
        )
        for rows in kept[layers:]
        if rows
    ]
    attend = engine.attend_chunks

    def attend_needed(q, k, v, key_valid, query_chunk, consume, lse_from=None, lse_op="cudnn"):
        start = min(prompt_len, q.shape[2]) // query_chunk * query_chunk  # holds the responses
        if start < query_chunk:  # the first chunk is one of them: nothing to skip
            return attend(q, k, v, key_valid, query_chunk, consume, lse_from, lse_op)
        attend(q[:, :, :query_chunk], k, v, key_valid, query_chunk, consume)
        return attend(
            q[:, :, start:], k, v, key_valid, query_chunk,
            lambda s, out: consume(s + start, out),
            None if lse_from is None else lse_from - start, lse_op,
        )  # fmt: skip

    setattr(owner, attr, torch.nn.ModuleList(list(full)[:layers]))
    engine.attend_chunks = attend_needed
    try:
        yield sum(a.nbytes + b.nbytes for a, b in placeholders)
    finally:
        setattr(owner, attr, full)
        engine.attend_chunks = attend
        del placeholders
