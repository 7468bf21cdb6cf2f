"""C++ CPU backend of the select steps: thin adapters onto ``torch.ops.maskkv_cpp``.

Same contract as ``torch_impl`` (``score_keys`` / ``pool_window`` / ``topk_gather``). The
kernels live in ``csrc/select_cpu.cpp``; the head-budget allocators between scoring and top-k
stay the Python ones of :mod:`maskkv_kernels.budgets` (O(B * Hkv * P), exact by construction).
"""

from __future__ import annotations

import torch

from .._cpp import last_dim_contiguous as _last_dim_contiguous

_POOL_CODES = {"none": 0, "max": 1, "avg": 2}


def score_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    first: torch.Tensor,
    *,
    prompt_len: int,
    window: bool,
    lse: torch.Tensor | None,
    scale: float,
    need_mass: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw column-sum scores fp32 [B, Hkv, P] and mask mass fp32 [B, Hkv] (None unless
    ``need_mass``), as ``torch_impl.score_keys``."""
    scores, mass = torch.ops.maskkv_cpp.score_keys(
        q, _last_dim_contiguous(k), first.to(torch.int32).contiguous(),
        None if lse is None else lse.float(), prompt_len, window, scale, need_mass,
    )  # fmt: skip
    return scores, mass if need_mass else None


def pool_window(
    raw: torch.Tensor, first: torch.Tensor, window: int, pool: str, pool_kernel: int
) -> torch.Tensor:
    """SnapKV pooling over [0, P - W), +inf on the window, 0 on padding: fp32 [B, Hkv, P]."""
    return torch.ops.maskkv_cpp.pool_window(
        raw, first.to(torch.int32).contiguous(), window, _POOL_CODES[pool], pool_kernel
    )


def topk_gather(
    scores: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budgets: torch.Tensor,
    first: torch.Tensor,
    cu_seqlens: torch.Tensor,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``torch_impl.topk_gather`` (nth_element per segment, no sort of P)."""
    return torch.ops.maskkv_cpp.topk_gather(
        scores.float(), _last_dim_contiguous(k), _last_dim_contiguous(v),
        budgets.to(torch.int32).contiguous(), first.to(torch.int32).contiguous(),
        cu_seqlens.to(torch.int32).contiguous(), n,
    )  # fmt: skip
