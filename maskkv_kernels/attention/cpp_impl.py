"""C++ CPU backend of ``ragged_attention``: an adapter onto ``torch.ops.maskkv_cpp``.

The kernel (``csrc/ragged_attention_cpu.cpp``) runs one flash-style online softmax per
(segment, query tile) over [kept segment || tail], the G query heads of a KV head packed as
G * Lq rows (dense form) or G rows per query (varlen form), fp32 accumulation; parallel over
segments.
"""

from __future__ import annotations

import torch

from .._cpp import last_dim_contiguous as _last_dim_contiguous


def ragged_attention_cpp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    num_kv_heads: int,
    k_tail: torch.Tensor | None,
    v_tail: torch.Tensor | None,
    scale: float,
    return_lse: bool,
    seg_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as the torch/Triton launchers: out [B, Hq, Lq, D] in q's dtype, lse
    [B, Hq, Lq] fp32 (None without ``return_lse``). ``max_seqlen`` is not needed on the CPU."""
    out, lse = torch.ops.maskkv_cpp.ragged_attention(
        q, _last_dim_contiguous(k), _last_dim_contiguous(v), cu_seqlens, num_kv_heads,
        _last_dim_contiguous(k_tail), _last_dim_contiguous(v_tail), scale, return_lse, seg_starts,
    )  # fmt: skip
    return out, lse if return_lse else None


def ragged_attention_varlen_cpp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_starts: torch.Tensor | None,
    max_seqlen: int,
    num_kv_heads: int,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    k_tail: torch.Tensor | None,
    v_tail: torch.Tensor | None,
    cu_seqlens_tail: torch.Tensor | None,
    tail_starts: torch.Tensor | None,
    max_seqlen_tail: int,
    scale: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Varlen form (same contract as the torch launcher): out [Nq, Hq, D] in q's dtype, lse
    [Nq, Hq] fp32 or None. The host bounds (``max_seqlen*``) are not needed on the CPU."""
    out, lse = torch.ops.maskkv_cpp.ragged_attention_varlen(
        q, _last_dim_contiguous(k), _last_dim_contiguous(v), cu_seqlens, seg_starts,
        num_kv_heads, cu_seqlens_q, _last_dim_contiguous(k_tail), _last_dim_contiguous(v_tail),
        cu_seqlens_tail, tail_starts, scale, return_lse,
    )  # fmt: skip
    return out, lse if return_lse else None
