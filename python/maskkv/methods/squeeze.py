"""SqueezeAttention (Wang et al., 2024) on SnapKV scores: (window, squeeze, uniform).

Layer budgets (DESIGN "Layer budgets"): the layers are clustered by their importance
I(l) = 1 - cos(residual before attention, after it) with 1-D k-means into ``clusters`` groups;
the least important group (lowest I, i.e. highest cosine) keeps floor(squeeze_fraction * B) per
layer and the budget it frees is shared evenly by the other layers (largest remainder, ties to
the lower layer, so the total is exactly B * layers; a layer above the prompt is clamped and its
excess water-filled into the others). A profile whose layers all fall in one cluster (e.g. all
equal) gives uniform budgets.

k-means (the paper does not fix one; this one is deterministic): centroids start at the sorted
importances at indices floor(j * (n - 1) / (clusters - 1)) -- min, median, max for 3 clusters;
each layer goes to the nearest centroid (ties to the lower centroid); a centroid moves to its
members' mean (an empty cluster keeps its centroid); at most 100 rounds, until no layer moves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from .base import WindowMethod, apportion, check_int, check_unit, exact, register
from .profile import LayerProfile, warn_missing_profile

KMEANS_ITERATIONS = 100


def kmeans_1d(values: Sequence[float], k: int) -> tuple[list[int], list[float]]:
    """Deterministic 1-D k-means: (cluster of each value, centroids)."""
    n = len(values)
    s = sorted(values)
    centroids = [s[(j * (n - 1)) // (k - 1)] for j in range(k)] if k > 1 else [sum(s) / n]
    labels: list[int] = []
    for _ in range(KMEANS_ITERATIONS):
        new = [min(range(k), key=lambda j, v=v: (abs(v - centroids[j]), j)) for v in values]
        if new == labels:
            break
        labels = new
        for j in range(k):
            members = [v for v, c in zip(values, labels) if c == j]
            if members:
                centroids[j] = sum(members) / len(members)
    return labels, centroids


@register("squeeze", "squeeze_attention")
@dataclass(frozen=True)
class SqueezeAttention(WindowMethod):
    """SqueezeAttention: window scores, cluster-driven layer budgets, uniform head budgets.

    Attributes:
        clusters: number of k-means clusters of the layer importances (paper: 3).
        squeeze_fraction: budget fraction of the least important cluster (paper: 0.4).
    """

    name = "squeezeattention"
    head_budget = "uniform"

    clusters: int = 3
    squeeze_fraction: float = 0.4

    def _validate(self) -> None:
        super()._validate()
        self._set("clusters", check_int(self.clusters, "clusters", minimum=1))
        self._set("squeeze_fraction", check_unit(self.squeeze_fraction, "squeeze_fraction"))

    def _schedule(self, L: int, P: int, profile: LayerProfile | None) -> list[int]:
        B = self.budget
        if profile is None:
            warn_missing_profile(self.name)
            return [B] * L
        labels, centroids = kmeans_1d([max(x, 0.0) for x in profile.importance], self.clusters)
        used = sorted(set(labels))
        low = min(used, key=lambda j: (centroids[j], j))
        n_low = labels.count(low)
        if n_low == L:
            return [B] * L
        squeezed = math.floor(exact(self.squeeze_fraction) * B)
        boosted = B + Fraction((B - squeezed) * n_low, L - n_low)
        quotas = [Fraction(squeezed) if c == low else boosted for c in labels]
        return apportion(quotas, B * L, P)
