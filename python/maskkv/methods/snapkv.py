"""SnapKV (Li et al., 2024), adapted to bidirectional dLLMs: (window, uniform, uniform).

Every layer keeps B prompt KV pairs per KV head (window included); every head of a layer gets the
same k_l. Scores: attention of the last W prompt tokens over the prompt, no causal mask, summed
over the window and the query heads of a group, max-pooled (kernel 7) over [0, P - W).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import WindowMethod, register


@register("snap", "snap_kv")
@dataclass(frozen=True)
class SnapKV(WindowMethod):
    """SnapKV: window scores, k_l = B for every layer, k_lg = k_l for every head."""

    name = "snapkv"
    head_budget = "uniform"
