"""``RaggedAttention``: a thin ``nn.Module`` over :func:`ragged_attention` for model code."""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks as C
from .._ragged import RaggedKV
from .op import ragged_attention

__all__ = ["RaggedAttention"]


class RaggedAttention(nn.Module):
    """Attention over [kept prompt segment ‖ dense tail] per KV head; no parameters.

    Args:
        scale: softmax scale, default ``D ** -0.5`` of the queries seen at call time.
        backend: "auto", "triton", "torch" or "reference" (see :func:`ragged_attention`).

    ``forward(q [B, Hq, Lq, D], cache: RaggedKV, k_tail=None, v_tail=None, return_lse=False)``
    returns out [B, Hq, Lq, D] (and lse [B, Hq, Lq] fp32 with ``return_lse``); the varlen
    keyword arguments of :func:`ragged_attention` (``cu_seqlens_q``, ...) pass through.
    """

    def __init__(self, scale: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        if scale is not None:
            C.check_scale(scale, 1)
        self.scale = scale
        self.backend = C.check_backend(backend)

    def forward(
        self,
        q: torch.Tensor,
        cache: RaggedKV,
        k_tail: torch.Tensor | None = None,
        v_tail: torch.Tensor | None = None,
        return_lse: bool = False,
        **varlen,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return ragged_attention(
            q, cache, k_tail, v_tail, **varlen, scale=self.scale, return_lse=return_lse,
            backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"scale={self.scale}, backend={self.backend!r}"
