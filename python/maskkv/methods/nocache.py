"""NoCache: the vanilla dLLM loop. Every denoising step runs the whole [prompt || response]
sequence through the model; no KV is cached or evicted.

The baseline for speed (what the paper's "up to 31x" is measured against) and the reference for
exactness: FullCache and the eviction methods approximate it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, check_int, register


@register("no_cache", "vanilla", "none", "recompute")
@dataclass(frozen=True)
class NoCache(Method):
    """Recompute everything every step: nothing cached, nothing evicted.

    ``layer_budgets`` reports the prompt length for every layer (every step attends to the whole,
    freshly recomputed prompt).

    Attributes:
        budget: ignored; ``None`` by default (see :class:`FullCache`).
    """

    name = "nocache"
    score = None
    head_budget = "uniform"

    budget: int | None = None  # type: ignore[assignment]

    def _validate(self) -> None:
        if self.budget is not None:
            self._set("budget", check_int(self.budget, "budget"))

    @property
    def evicts(self) -> bool:
        return False

    @property
    def caches_prompt(self) -> bool:
        return False
