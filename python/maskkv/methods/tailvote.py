"""TailVote: MaskKV whose vote also counts every query that reads the pruned cache later.

MaskKV's mask queries vote at step 1 for the prompt keys the answer will need. The queries that
read the pruned cache at the later steps are those of the *tail*: the positions the engine
recomputes at every step. For LLaDA the tail is the response, exactly the mask queries. Dream
predicts token i from position i - 1, so its tail starts one position earlier: the last prompt
position, recomputed at every step, is the one that predicts the first response token, and it is
not a [MASK]. MaskKV never hears from it; when the first answer token needs a prompt key that no
mask query asks for (the first of several values in ``multi_needle``), that key is evicted and the
first answer token comes out wrong while every other token is right.

TailVote = (mask-query voting over the tail, maskkv profile, prompt_preference): the same score
(attention mass summed over the voting queries and the query heads of a KV head), the same layer
and head budgets, the same kernels; the voting rows start at the first tail position instead of
the first response position (one more row for Dream). With the step-1 attention's LSE the rows
come for free there too. Where the tail is the response (LLaDA) it is MaskKV exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .maskkv import MaskKV


@register("tail_vote", "maskkv_tail")
@dataclass(frozen=True)
class TailVote(MaskKV):
    """MaskKV with every later-step reader voting: the response masks plus the prompt positions
    the engine recomputes at every step (Dream: the last one). Parameters as ``MaskKV``.

    Costs what MaskKV costs: the same budgets, so the same pruned cache and the same later step;
    step 1 scores one more query row on Dream.
    """

    name = "tailvote"
    tail_votes = True
