"""TailVote: MaskKV's vote counted over every query that reads the pruned cache later, and the
layer's budget split between KV heads by those votes.

MaskKV's mask queries vote at step 1 for the prompt keys the answer will need. Two parts of its
rule lose evidence on the shipped Dream model (``benchmarks/diagnose_eviction.py``):

- **Who votes.** The queries that read the pruned cache at the later steps are those of the
  *tail*, the positions the engine recomputes at every step. For LLaDA the tail is the response,
  exactly the mask queries. Dream predicts token i from position i - 1, so its tail starts one
  position earlier: the last prompt position, recomputed at every step, predicts the first
  response token, and it is not a [MASK]. MaskKV never hears from it; when the first answer token
  needs a key no mask query asks for (the first of several values in ``multi_needle``), that key
  is evicted and the first answer token comes out wrong while every other one is right. TailVote
  lets every tail position vote (one more query row for Dream).
- **Where the slots go.** MaskKV's prompt-preference split gives each KV head a share by how much
  its heads look at the prompt rather than at the masks. In the Dream model's last layer both KV
  heads look at the prompt about equally, but only one of them reads the values; at budget 8 it
  gets about 8 slots for up to 9 value tokens. TailVote splits by the votes themselves, as AdaKV
  splits window scores: every head keeps its top ``safeguard`` share of k_l, the rest of the
  layer's Hkv * k_l slots go to the highest votes across its heads (``head_split="adaptive"``).
  ``head_split="preference"`` keeps MaskKV's split.

Layer budgets are MaskKV's (calibrated profile, ``beta`` floor, boundary groups). Same kernels
(``select_and_gather`` with ``score="mask"``; the step-1 attention's LSE covers the extra row),
same total budget, so the same pruned-cache size and the same later step. With
``head_split="preference"`` on a model whose tail is the response (LLaDA) it is MaskKV exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import check_unit, register
from .maskkv import MaskKV

HEAD_SPLITS = ("adaptive", "preference")


@register("tail_vote", "maskkv_tail")
@dataclass(frozen=True)
class TailVote(MaskKV):
    """Mask-query voting over the whole tail (Dream: the last prompt position too), MaskKV's layer
    budgets, head budgets by the votes.

    Attributes:
        budget, beta, boundary_first, boundary_last, uniform_layers: as ``MaskKV``.
        head_split: ``"adaptive"`` (each KV head keeps its top ``safeguard * k_l``, the other
            slots of the layer go to the highest votes across heads: AdaKV's allocator on the
            votes) or ``"preference"`` (MaskKV's prompt-preference split with ``alpha``).
        safeguard: the adaptive split's per-head floor, a fraction of k_l (AdaKV's 0.2).
        alpha: the preference split's uniform part (``head_split="preference"`` only).
    """

    name = "tailvote"
    tail_votes = True

    head_split: str = "adaptive"
    safeguard: float = 0.2

    def _validate(self) -> None:
        super()._validate()
        if self.head_split not in HEAD_SPLITS:
            raise ValueError(f"head_split: expected one of {HEAD_SPLITS}, got {self.head_split!r}")
        self._set("safeguard", check_unit(self.safeguard, "safeguard"))

    @property
    def head_budget(self) -> str:  # type: ignore[override]
        return "adakv" if self.head_split == "adaptive" else "prompt_preference"

    @property
    def head_alpha(self) -> float:
        return self.safeguard if self.head_split == "adaptive" else self.alpha
