"""FullCache: the prompt KV of the first step is cached whole and reused; nothing is evicted.

The upper reference for quality and the baseline for memory: later steps attend to the cached
prompt KV plus the response, so they skip the prompt's QKV/MLP but not its attention reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, check_int, register


@register("full", "full_cache", "dense")
@dataclass(frozen=True)
class FullCache(Method):
    """Cache the whole prompt KV (no eviction): every layer budget is the prompt length.

    Attributes:
        budget: ignored; ``None`` by default. Accepted so that one ``--budget`` can be passed to
            every method of a benchmark sweep.
    """

    name = "fullcache"
    score = None
    head_budget = "uniform"

    budget: int | None = None  # type: ignore[assignment]

    def _validate(self) -> None:
        if self.budget is not None:
            self._set("budget", check_int(self.budget, "budget"))

    @property
    def evicts(self) -> bool:
        return False
