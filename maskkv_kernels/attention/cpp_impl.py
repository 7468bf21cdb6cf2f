"""C++ CPU backend of ``ragged_attention``: an adapter onto ``torch.ops.maskkv_cpp``.

The kernel (``csrc/ragged_attention_cpu.cpp``) runs one flash-style online softmax per
(segment, query tile) over [kept segment || dense tail], the G query heads of a KV head packed
as G * Lq rows, fp32 accumulation; parallel over segments.
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
    if seg_starts is not None:  # pool views: the torch path until the C++ kernel reads starts
        from .torch_impl import ragged_attention_torch

        return ragged_attention_torch(
            q, k, v, cu_seqlens, max_seqlen, num_kv_heads, k_tail, v_tail, scale, return_lse,
            seg_starts,
        )  # fmt: skip
    out, lse = torch.ops.maskkv_cpp.ragged_attention(
        q, _last_dim_contiguous(k), _last_dim_contiguous(v), cu_seqlens, num_kv_heads,
        _last_dim_contiguous(k_tail), _last_dim_contiguous(v_tail), scale, return_lse,
    )  # fmt: skip
    return out, lse if return_lse else None
