"""Decoding rules: how many masked tokens each denoising step reveals.

The samplers compute, per masked position of the current block, the candidate token and its
confidence exactly as before (LLaDA's low-confidence remasking, Dream's four algorithms). A rule
only decides *how many* tokens each row reveals; *which* ones stays the algorithm's ranking.

- ``FixedSteps``: the schedule of the official samplers (LLaDA: the block's masks split evenly
  over its steps; Dream: ``1 - s/t`` of the masks). The samplers keep their own code for it.
- ``Threshold(tau)`` (Fast-dLLM): every masked token of the block whose probability is >= tau,
  and always at least the most confident one.
- ``Factor(f)`` (Fast-dLLM's factor rule): with the probabilities sorted in decreasing order
  p_1 >= p_2 >= ..., reveal the longest prefix in which the n-th token satisfies
  ``p_n >= 1 - f / (n + 1)`` (the first always passes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DecodingRule", "Factor", "FixedSteps", "Threshold", "get_rule", "select_top"]


class DecodingRule:
    """Base class: ``fixed`` rules follow the sampler's schedule; the others ``count``."""

    name: str = ""
    fixed: bool = False

    def count(self, prob: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        """prob: [B, R] probability of each position's candidate token (any value outside
        ``need``); need: bool [B, R] masked positions of the current block.
        Returns int64 [B]: tokens to reveal per row (0 for a row with nothing masked)."""
        raise NotImplementedError


@dataclass(frozen=True)
class FixedSteps(DecodingRule):
    """The official samplers' fixed schedule (today's behaviour, the default)."""

    name = "fixed"
    fixed = True

    def count(self, prob, need):  # the samplers apply their own schedule
        raise NotImplementedError("FixedSteps follows the sampler's schedule")


def _sorted_probs(prob: torch.Tensor, need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: masked probabilities sorted in decreasing order (-inf after the masked ones),
    and the number of masked positions."""
    p = torch.where(need, prob.to(torch.float64), -torch.inf)
    return p.sort(-1, descending=True).values, need.sum(-1)


@dataclass(frozen=True)
class Threshold(DecodingRule):
    """Reveal every masked token of the block with probability >= tau, at least one.

    Args:
        tau: the threshold, in (0, 1] (Fast-dLLM uses 0.9).
    """

    tau: float = 0.9
    name = "threshold"

    def __post_init__(self):
        tau = self.tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
            raise ValueError(f"tau: expected a number in (0, 1], got {tau!r}")

    def count(self, prob, need):
        confident = (need & (prob.to(torch.float64) >= self.tau)).sum(-1)
        masked = need.sum(-1)
        return torch.where(masked > 0, confident.clamp_min(1), 0)


@dataclass(frozen=True)
class Factor(DecodingRule):
    """Fast-dLLM's factor rule: the n-th most confident token passes when
    ``p_n >= 1 - f / (n + 1)``; the longest passing prefix is revealed (at least one token).

    Matches the official ``get_transfer_index_dynamic`` including its edge case: when every
    token but the last passes, the last is revealed too.

    Args:
        f: the factor, > 0 (larger reveals more per step).
    """

    f: float = 1.0
    name = "factor"

    def __post_init__(self):
        f = self.f
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0:
            raise ValueError(f"f: expected a positive number, got {f!r}")

    def count(self, prob, need):
        sorted_p, masked = _sorted_probs(prob, need)
        R = sorted_p.shape[-1]
        n = torch.arange(1, R + 1, device=prob.device, dtype=torch.float64)
        thresh = 1 - self.f / (n + 1)
        thresh[0] = -1.0  # the most confident token always passes
        idx = torch.arange(R, device=prob.device)
        fails = (sorted_p < thresh) & (idx < masked[:, None])
        # first failing rank, or masked - 1 when none fails (the official loop runs out there)
        first_fail = torch.where(fails, idx, R).amin(-1)
        last = (masked - 1).clamp_min(0)
        stop = torch.minimum(first_fail, last)
        count = torch.where(stop == last, masked, stop.clamp_min(1))
        return torch.where(masked > 0, count, 0)


def select_top(confidence: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """bool [B, R]: the ``count[b]`` positions of row b with the highest confidence.

    confidence: [B, R], -inf outside the candidates (so they are only picked when a row asks for
    more positions than it has candidates, which the rules never do); count: int64 [B].
    """
    order = confidence.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank < count[:, None]


_BY_NAME = {"fixed": FixedSteps}


def get_rule(decoding: DecodingRule | str | None) -> DecodingRule:
    """A rule object from itself, ``"fixed"`` or None (FixedSteps)."""
    if decoding is None:
        return FixedSteps()
    if isinstance(decoding, DecodingRule):
        return decoding
    if isinstance(decoding, str) and decoding.lower() in _BY_NAME:
        return _BY_NAME[decoding.lower()]()
    raise ValueError(
        f"decoding: expected a DecodingRule (FixedSteps(), Threshold(tau), Factor(f)) or "
        f"'fixed', got {decoding!r}"
    )
