"""``MaskKVSelector``: a thin ``nn.Module`` holding one layer's eviction configuration."""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks as C
from .._ragged import RaggedKV
from .op import select_and_gather

__all__ = ["MaskKVSelector"]


class MaskKVSelector(nn.Module):
    """Holds the configuration of ``select_and_gather`` so that a model can own one per layer.

    Args:
        budget: default layer budget k_l (average kept prompt pairs per KV head); may be given
            (or overridden) per call instead.
        score: "mask" (MaskKV) or "window" (SnapKV family).
        head_budget: "uniform", "prompt_preference" (mask mode only) or "adakv".
        pool, pool_kernel: window-mode pooling. alpha: head-budget parameter (None = default).
        scale: softmax scale (None = D ** -0.5). backend: "auto", "triton", "cpp", "torch", "reference".

    ``forward(q, k, v, *, prompt_len, prompt_lens=None, lse=None, budget=None,
    return_scores=False)`` returns what ``select_and_gather`` returns. No parameters, no buffers.
    """

    def __init__(
        self,
        budget: int | None = None,
        *,
        score: str = "mask",
        head_budget: str = "uniform",
        pool: str = "max",
        pool_kernel: int = 7,
        alpha: float | None = None,
        scale: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if budget is not None:
            C.check_layer_budget(budget)
        C.check_choice(score, "score", C.SCORES)
        C.check_choice(head_budget, "head_budget", C.HEAD_BUDGETS)
        C.check_pool(pool, pool_kernel)
        C.check_alpha(alpha, head_budget)
        C.check_backend(backend)
        if scale is not None:
            C.check_scale(scale, 1)
        if head_budget == "prompt_preference" and score == "window":
            raise C.fail(
                "head_budget", "'uniform' or 'adakv' with score='window' (no mask mass)",
                repr(head_budget),
            )  # fmt: skip
        self.budget = budget
        self.score = score
        self.head_budget = head_budget
        self.pool = pool
        self.pool_kernel = pool_kernel
        self.alpha = alpha
        self.scale = scale
        self.backend = backend

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        prompt_len: int,
        prompt_lens: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
        budget: int | torch.Tensor | None = None,
        return_scores: bool = False,
    ) -> RaggedKV | tuple[RaggedKV, torch.Tensor]:
        """q: [B, Hq, M, D]; k, v: [B, Hkv, L, D]; see ``select_and_gather``."""
        budget = self.budget if budget is None else budget
        if budget is None:
            raise C.fail("budget", "an int (given here or to MaskKVSelector(budget=...))", "None")
        return select_and_gather(
            q, k, v, budget, prompt_len=prompt_len, prompt_lens=prompt_lens, score=self.score,
            head_budget=self.head_budget, pool=self.pool, pool_kernel=self.pool_kernel,
            alpha=self.alpha, lse=lse, scale=self.scale, return_scores=return_scores,
            backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        parts = [f"budget={self.budget}", f"score={self.score!r}"]
        parts.append(f"head_budget={self.head_budget!r}")
        if self.score == "window":
            parts.append(f"pool={self.pool!r}, pool_kernel={self.pool_kernel}")
        if self.alpha is not None:
            parts.append(f"alpha={self.alpha}")
        if self.scale is not None:
            parts.append(f"scale={self.scale}")
        parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
