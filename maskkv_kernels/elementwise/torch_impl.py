"""The eager PyTorch versions of the elementwise ops: the unfused code of a LLaDA / Qwen2 layer,
op for op, so that they round exactly as the models do. They are the reference of the Triton
kernels and what ``torch.compile`` fuses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (weight * norm(s), s) with s = x + residual (or (weight * norm(x), None)):
    normalise in fp32, cast back to the input dtype, then multiply by the weight."""
    summed = None
    if residual is not None:
        x = summed = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), summed


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool):
    if not full_precision:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return x * cos + _rotate_half(x) * sin
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def rotary_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head_dim: int,
    full_precision: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, T, Hq * D], k: [B, T, Hkv * D]; cos, sin: fp32 [B or 1, T, D].
    Rotate-half RoPE of every head; ``full_precision`` rotates in fp32 (LLaDA), otherwise in the
    model dtype with the tables cast to it (Qwen2 / Dream). Returns q, k of the same shapes."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads

    def rotate(x: torch.Tensor) -> torch.Tensor:
        heads = x.view(*x.shape[:2], -1, head_dim)
        return _rotate(heads, cos, sin, full_precision).reshape(x.shape)

    return rotate(q), rotate(k)


def silu_mul_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up (the SwiGLU product)."""
    return F.silu(gate) * up
