"""AdaKV (Feng et al., 2024) on SnapKV scores: (window, uniform, adakv).

Layer budgets are uniform (B per layer). Inside a layer the Hkv * k_l pairs are shared
adaptively: every head first keeps its top max(1, floor(safeguard * k_l)) keys, then the rest go
to the highest remaining scores across all heads of the layer (DESIGN "Head budgets").
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import WindowMethod, check_unit, register


@register("ada", "ada_kv")
@dataclass(frozen=True)
class AdaKV(WindowMethod):
    """AdaKV: window scores, uniform layer budgets, adaptive head budgets.

    Attributes:
        safeguard: fraction of k_l every head keeps before the cross-head top-k (the allocator's
            ``alpha``); AdaKV's default 0.2.
    """

    name = "adakv"
    head_budget = "adakv"

    safeguard: float = 0.2

    def _validate(self) -> None:
        super()._validate()
        self._set("safeguard", check_unit(self.safeguard, "safeguard"))

    @property
    def head_alpha(self) -> float:
        return self.safeguard
