"""maskkv_kernels: model-agnostic ops for per-head-budget KV-cache eviction.

Public ops (see DESIGN.md and each docstring for shapes):

- :func:`select_and_gather`: score prompt keys (mask-query voting or SnapKV window), split the
  layer budget between heads, keep the top-k per head and gather them into a :class:`RaggedKV`.
- :func:`ragged_attention`: attention over each head's kept prompt segment plus a dense tail;
  its varlen form (``cu_seqlens_q``) serves many requests at different positions in one call.
- :func:`allocate_head_budgets`, :func:`mask_scores`, :func:`window_scores`,
  :func:`topk_gather`: the steps ``select_and_gather`` fuses.
- :mod:`maskkv_kernels.reference`: eager oracles with the same names.
- :func:`rms_norm`, :func:`rotary`, :func:`silu_mul`: a transformer layer's elementwise work in
  few kernels (fused residual add + RMSNorm, q and k rotated in one launch, SwiGLU product).

Every op takes ``backend=`` "auto" (Triton on CUDA, the C++ kernels of ``csrc/`` on CPU, else
torch), "triton", "cpp", "torch" or "reference".
"""

from . import reference
from ._dispatch import resolve_backend
from ._ragged import RaggedKV
from .attention import RaggedAttention, ragged_attention
from .budgets import allocate_head_budgets
from .elementwise import rms_norm, rotary, silu_mul
from .select import MaskKVSelector, mask_scores, select_and_gather, topk_gather, window_scores

__all__ = [
    "MaskKVSelector",
    "RaggedAttention",
    "RaggedKV",
    "allocate_head_budgets",
    "mask_scores",
    "ragged_attention",
    "reference",
    "resolve_backend",
    "rms_norm",
    "rotary",
    "select_and_gather",
    "silu_mul",
    "topk_gather",
    "window_scores",
]
