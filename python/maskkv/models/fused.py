"""Layer bodies for cached (later) denoising steps with the elementwise work fused.

The layer protocol (``qkv`` / ``attn_output`` / ``mlp_block``, see ``_common``) runs a layer as
eager PyTorch: fp32 RMSNorm, RoPE in fp32, SiLU, products and residual adds are about 30 small
kernels per layer. A later step of a 32-layer model at 256 tokens is therefore ~1000 launches
whose run time, even replayed from a CUDA graph, is a third of the step. Here the same math runs
as one loop over the layers with five elementwise kernels per layer::

    h, x = rms_norm(h, attn_norm, residual=delta)  # previous layer's MLP residual add + norm
    q, k, v = x Wq (+ bq), x Wk (+ bk), x Wv (+ bv)  # GEMMs; biases in the GEMM, as nn.Linear
    q, k = rotary(q, k, cos, sin)                 # q and k in one launch
    attn = attend(i, q, k, v)                     # the caller's attention (ragged)
    o = merge_heads(attn) Wo                      # the one layout copy left
    h, x = rms_norm(h, mlp_norm, residual=o)      # attention residual add + norm
    delta = silu_mul(x Wgate, x Wup) Wdown        # added by the next layer's norm

Three ways to run it (``FUSIONS``):

- ``"triton"``: the ``maskkv_kernels`` elementwise kernels; each rounds exactly as the eager code
  except for the order of the RMSNorm sum and the last bit of ``exp`` (one bf16 step at most).
- ``"compile"``: ``torch.compile`` of the eager bodies (inductor writes its own fused kernels;
  it keeps intermediates in fp32, so it also differs from eager within bf16 rounding). One
  compilation per token count, shared by every layer: the weights are arguments.
- ``"torch"``: the eager bodies themselves, bit-identical to the layer protocol (the reference).

Only the layer classes of this package are known (``layer_tensors``); for any other the caller
keeps the layer protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import maskkv_kernels as mk

from ._common import merge_heads, split_heads
from .dream import DreamDecoderLayer
from .llada import LLaDABlock

__all__ = ["FUSIONS", "FusedLayers", "LayerTensors", "layer_tensors", "resolve_fusion"]

FUSIONS = ("auto", "none", "torch", "triton", "compile")

# attend(layer index, q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D]) -> [B, Hq, T, D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerTensors:
    """The tensors and constants of one pre-norm SwiGLU decoder layer with RoPE."""

    attn_norm: torch.Tensor
    attn_norm_eps: float
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    mlp_norm: torch.Tensor
    mlp_norm_eps: float
    w_gate: torch.Tensor
    b_gate: torch.Tensor | None
    w_up: torch.Tensor
    b_up: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_full_precision: bool  # rotate in fp32 (LLaDA) or in the model dtype (Qwen2 / Dream)


def layer_tensors(layer: torch.nn.Module) -> LayerTensors | None:
    """The ``LayerTensors`` of a LLaDA block or a Dream decoder layer; None for other layers."""
    if isinstance(layer, LLaDABlock):
        norm1, norm2 = layer.attn_norm, layer.ff_norm
        q, k, v, o = layer.q_proj, layer.k_proj, layer.v_proj, layer.attn_out
        gate, up, down = layer.ff_proj, layer.up_proj, layer.ff_out
        heads, kv_heads, full = layer.num_heads, layer.num_kv_heads, True
    elif isinstance(layer, DreamDecoderLayer):
        attn, mlp = layer.self_attn, layer.mlp
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        heads, kv_heads, full = attn.num_heads, attn.num_kv_heads, False
    else:
        return None
    return LayerTensors(
        norm1.weight, norm1.eps, q.weight, q.bias, k.weight, k.bias, v.weight, v.bias,
        o.weight, o.bias, norm2.weight, norm2.eps, gate.weight, gate.bias, up.weight, up.bias,
        down.weight, down.bias, heads, kv_heads, q.out_features // heads, full,
    )  # fmt: skip


# ----------------------------------------------------------------------------- the two bodies


def _pre_attention(
    h, delta, norm, eps, wq, bq, wk, bk, wv, bv, cos, sin,
    heads: int, kv_heads: int, head_dim: int, full_precision: bool, backend: str,
):  # fmt: skip
    """(h + delta, q, k, v): the residual add, the attention norm, q/k/v and RoPE."""
    if delta is None:
        x = mk.rms_norm(h, norm, eps, backend=backend, check_inputs=False)
    else:
        x, h = mk.rms_norm(h, norm, eps, residual=delta, backend=backend, check_inputs=False)
    q, k = mk.rotary(
        F.linear(x, wq, bq), F.linear(x, wk, bk), cos, sin,
        head_dim=head_dim, full_precision=full_precision, backend=backend, check_inputs=False,
    )  # fmt: skip
    v = F.linear(x, wv, bv)
    return h, split_heads(q, heads), split_heads(k, kv_heads), split_heads(v, kv_heads)


def _post_attention(
    h, attn, wo, bo, norm, eps, w_gate, b_gate, w_up, b_up, w_down, b_down, backend: str
):  # fmt: skip
    """(h + attention output, the MLP's output still to be added)."""
    x, h = mk.rms_norm(
        h, norm, eps, residual=F.linear(merge_heads(attn), wo, bo), backend=backend,
        check_inputs=False,
    )  # fmt: skip
    a = mk.silu_mul(
        F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up), backend=backend, check_inputs=False
    )
    return h, F.linear(a, w_down, b_down)


class FusedLayers:
    """All layers of a model as one loop of fused bodies (see the module docstring).

    Args:
        model: a model whose ``layers`` are all known to ``layer_tensors``.
        fusion: "torch", "triton" or "compile".
        compile_backend: the ``torch.compile`` backend of "compile" ("inductor"; tests pass
            "eager" to check the plumbing without a compiler).

    ``layers(h, cos, sin, attend)``: h [B, T, d] (the embedded tokens), cos / sin fp32
    [B, T, D] -> hidden states [B, T, d] after the last layer.
    """

    def __init__(self, model, fusion: str, *, compile_backend: str = "inductor") -> None:
        tensors = [layer_tensors(layer) for layer in model.layers]
        if any(t is None for t in tensors):
            raise ValueError(
                f"fusion: expected 'none' for layers of type {type(model.layers[0]).__name__} "
                "(fused bodies know LLaDA and Dream layers)"
            )
        if fusion not in ("torch", "triton", "compile"):
            raise ValueError(f"fusion: expected 'torch', 'triton' or 'compile', got {fusion!r}")
        self.fusion = fusion
        self.tensors: list[LayerTensors] = tensors
        self._backend = "triton" if fusion == "triton" else "torch"
        self._pre, self._post = _pre_attention, _post_attention
        if fusion == "compile":
            self._pre = torch.compile(_pre_attention, dynamic=False, backend=compile_backend)
            self._post = torch.compile(_post_attention, dynamic=False, backend=compile_backend)

    def __call__(self, h, cos, sin, attend: Attend) -> torch.Tensor:
        delta = None
        for i, t in enumerate(self.tensors):
            h, q, k, v = self._pre(
                h, delta, t.attn_norm, t.attn_norm_eps, t.wq, t.bq, t.wk, t.bk, t.wv, t.bv,
                cos, sin, t.num_heads, t.num_kv_heads, t.head_dim, t.rope_full_precision,
                self._backend,
            )  # fmt: skip
            attn = attend(i, q, k, v)
            h, delta = self._post(
                h, attn, t.wo, t.bo, t.mlp_norm, t.mlp_norm_eps, t.w_gate, t.b_gate, t.w_up,
                t.b_up, t.w_down, t.b_down, self._backend,
            )  # fmt: skip
        return h + delta


def resolve_fusion(fusion: str, model, device: torch.device) -> str:
    """The fused body to run: "auto" is "triton" on CUDA for LLaDA / Dream layers (Triton
    importable), else "none"; other values are checked and returned."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion: expected one of {FUSIONS}, got {fusion!r}")
    if fusion != "auto":
        return fusion
    known = all(layer_tensors(layer) is not None for layer in model.layers)
    if device.type == "cuda" and known and mk.resolve_backend("auto", device) == "triton":
        return "triton"
    return "none"
