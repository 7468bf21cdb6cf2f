"""MaskKV ("Mask Tokens as Prophet", arXiv 2510.09309): (mask, maskkv profile, prompt_preference).

Scores: at the first denoising step every response token is [MASK]; the attention the mask
queries pay to each prompt key (summed over the queries and the query heads of a KV head) ranks
the keys -- the masks "vote" for the prompt tokens the answer will need.

Layer budgets (DESIGN "Layer budgets"): total T = B * layers; every layer first gets
floor(beta * B); the remainder R = T - layers * floor(beta * B) is split between the boundary
group (first ``boundary_first`` + last ``boundary_last`` layers) and the middle group in
proportion to each group's summed importance I(l) (by group size if both sums are 0), evenly
within a group, then rounded by largest remainder (ties to the lower layer) so the sum is T.
A layer whose share exceeds the prompt is clamped and the excess is water-filled into the other
layers in proportion to their shares, so the total stays T.

Head budgets: k_lg = alpha * k_l + (1 - alpha) * Hkv * k_l * P^(g), P^(g) the head's prompt
preference S_p / (S_p + S_m) normalised over the layer's heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from .base import Method, apportion, check_int, check_unit, exact, register
from .profile import LayerProfile, warn_missing_profile


@register("mask_kv")
@dataclass(frozen=True)
class MaskKV(Method):
    """MaskKV: mask-query scores, profile-driven layer budgets, prompt-preference head budgets.

    Attributes:
        budget: B, average prompt KV pairs kept per (layer, KV head).
        alpha: uniform part of the head split (``alpha * k_l`` per head before preference).
        beta: fraction of B every layer keeps before the importance-driven remainder.
        boundary_first: number of leading layers in the boundary group.
        boundary_last: number of trailing layers in the boundary group.
        uniform_layers: ablation: B for every layer (no profile needed).
    """

    name = "maskkv"
    score = "mask"
    head_budget = "prompt_preference"

    alpha: float = 0.1
    beta: float = 0.4
    boundary_first: int = 2
    boundary_last: int = 2
    uniform_layers: bool = False

    def _validate(self) -> None:
        super()._validate()
        self._set("alpha", check_unit(self.alpha, "alpha"))
        self._set("beta", check_unit(self.beta, "beta"))
        self._set("boundary_first", check_int(self.boundary_first, "boundary_first"))
        self._set("boundary_last", check_int(self.boundary_last, "boundary_last"))
        if not isinstance(self.uniform_layers, bool):
            raise ValueError(f"uniform_layers: expected a bool, got {self.uniform_layers!r}")

    @property
    def head_alpha(self) -> float:
        return self.alpha

    def _schedule(self, L: int, P: int, profile: LayerProfile | None) -> list[int]:
        B = self.budget
        if self.uniform_layers:
            return [B] * L
        if profile is None:
            warn_missing_profile(self.name)
            return [B] * L
        total = B * L
        base = math.floor(exact(self.beta) * B)
        rest = total - L * base
        boundary = [i < self.boundary_first or i >= L - self.boundary_last for i in range(L)]
        n_b = sum(boundary)
        n_m = L - n_b
        if n_b == 0 or n_m == 0:
            # One group only (e.g. num_layers <= boundary_first + boundary_last): evenly.
            return apportion([Fraction(total, L)] * L, total, P)
        # I = 1 - cos is >= 0 up to rounding; a slightly negative mean cosine error reads as 0.
        imp = [max(Fraction(x), Fraction(0)) for x in profile.importance]
        s_b = sum((i for i, b in zip(imp, boundary) if b), Fraction(0))
        s_m = sum((i for i, b in zip(imp, boundary) if not b), Fraction(0))
        if s_b + s_m == 0:
            s_b, s_m = Fraction(n_b), Fraction(n_m)
        rest_b = rest * s_b / (s_b + s_m)
        per_b, per_m = rest_b / n_b, (rest - rest_b) / n_m
        quotas = [base + (per_b if b else per_m) for b in boundary]
        return apportion(quotas, total, P)
