"""Head-budget allocators on the device: vectorised over batch rows and heads, no host sync.

Same definitions as ``reference.allocate_head_budgets`` (float64 math, water-filling, largest
remainder, ties to the lower head / position). The row totals are Hkv * min(k_l, prompt_lens[b]),
known on the host from the arguments, which is what lets ``select_and_gather`` size its output
without reading anything back from the GPU.

Only two steps look across heads: the prompt-preference normalisation and AdaKV's global
top-k. Both go through :func:`cross_head_sum`, the single place where a tensor-parallel process
group would all-reduce (heads split over ranks).
"""

from __future__ import annotations

import math

import torch

from . import _checks as C

__all__ = ["allocate_head_budgets", "cross_head_sum", "rank_within"]


def cross_head_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the KV-head dim (dim 1), kept. With tensor parallelism this becomes an all-reduce."""
    return x.sum(1, keepdim=True)


def valid_prompt_mask(B: int, P: int, prompt_lens: torch.Tensor | None, device) -> torch.Tensor:
    """bool [B, P]: real prompt tokens (left padding)."""
    if prompt_lens is None:
        return torch.ones(B, P, dtype=torch.bool, device=device)
    first = P - prompt_lens.to(device).long()
    return torch.arange(P, device=device)[None] >= first[:, None]


def rank_within(scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Order of the last dim, best first: eligible before not, then higher score (NaN below
    -inf), then lower index. Two stable sorts give the lexicographic order without a composite
    key: by score (NaN as -inf, +-inf untouched), then by class (eligible number, eligible NaN,
    not eligible)."""
    nan = torch.isnan(scores)
    key = torch.where(nan, -math.inf, scores.float())
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank_class = eligible.to(torch.int8) * 2 - (eligible & nan).to(torch.int8)  # 2, 1 or 0
    second = torch.sort(
        torch.gather(rank_class, -1, order), dim=-1, descending=True, stable=True
    ).indices
    return torch.gather(order, -1, second)


def _integerize(targets: torch.Tensor, total: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Row-wise water-filling + largest remainder, vectorised ([B, H] float64 -> int64).

    ``total`` and ``cap`` are int64 [B]; ``total <= H * cap`` per row.
    """
    B, H = targets.shape
    t = targets.clamp_min(0.0)
    capf = cap.double()[:, None]
    # Which heads end up pinned at the cap, in closed form (a sort and a cumsum instead of H
    # rounds of small kernels): capping a head that overflows only raises the others' shares,
    # and shares grow with the target, so the pinned set is the c largest targets for the
    # smallest c whose next head fits once those c are pinned.
    ts, order = torch.sort(t, dim=1, descending=True, stable=True)
    rest = ts.flip(1).cumsum(1).flip(1)  # rest[:, c]: targets of the heads left free by c pins
    c = torch.arange(H, device=t.device, dtype=torch.float64)[None]
    left_c = total.double()[:, None] - c * capf  # budget left for heads c.. when c are pinned
    share_c = torch.where(rest > 0, ts * left_c / rest.clamp_min(1e-300), left_c / (H - c))
    fits = share_c <= capf
    n_pinned = torch.where(fits.any(1), fits.int().argmax(1), H)  # first c that fits
    pinned_sorted = c < n_pinned[:, None]
    pinned = torch.zeros_like(pinned_sorted).scatter_(1, order, pinned_sorted)
    free = ~pinned
    # Shares of the free heads: the same expression as the last round of the iterative
    # definition (reference.py), so both agree to the bit.
    remaining = total.double()[:, None] - (pinned.double() * capf).sum(1, keepdim=True)
    w = torch.where(free, t, torch.zeros_like(t))
    wsum = w.sum(1, keepdim=True)
    w = torch.where(wsum > 0, w, free.double())  # all-zero targets: share evenly
    wsum = w.sum(1, keepdim=True).clamp_min(1e-300)
    share = torch.where(free, w * (remaining / wsum), capf.expand_as(t))
    base = torch.minimum(share.floor().clamp_min(0), capf)
    left = total - base.sum(1).long()
    frac = share - base
    order = torch.sort(frac, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(H, device=t.device).expand(B, H).contiguous())
    return base.long() + (rank < left[:, None]).long()


def allocate_head_budgets(
    scores: torch.Tensor,
    layer_budget: int,
    mode: str = "uniform",
    *,
    mask_mass: torch.Tensor | None = None,
    alpha: float | None = None,
    prompt_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Split layer budget k_l between KV heads: scores fp32 [B, Hkv, P] -> int32 [B, Hkv].

    Modes: ``"uniform"`` (k_l per head), ``"prompt_preference"`` (MaskKV:
    k_g = a*k + (1-a)*Hkv*k*P^(g) with P(g) = S_p / (S_p + S_m), needs ``mask_mass`` [B, Hkv] =
    S_m; ``alpha`` a defaults to 0.1), ``"adakv"`` (every head keeps its top
    max(1, floor(alpha*k)), alpha defaulting to 0.2; the rest of the layer's Hkv*k go to the best
    remaining scores across heads). Every row sums to exactly Hkv * min(k_l, prompt_lens[b]) and
    every entry is in [0, prompt_lens[b]]. ``prompt_lens``: int [B] (left padding), default P.
    """
    B, Hkv, P = C.check_scores(scores)
    C.check_layer_budget(layer_budget, "layer_budget")
    C.check_choice(mode, "mode", C.HEAD_BUDGETS)
    alpha = C.check_alpha(alpha, mode)
    if mode == "prompt_preference":
        C.check_mask_mass(mask_mass, B, Hkv, scores)
    if prompt_lens is not None:  # values checked when free to read (a CPU tensor)
        C.check_prompt_lens_tensor(prompt_lens, B, P, scores.device, what="P")
    device = scores.device
    lens = (
        torch.full((B,), P, dtype=torch.long, device=device)
        if prompt_lens is None
        else prompt_lens.to(device).long()
    )
    k_eff = lens.clamp_max(layer_budget)  # [B]

    if mode == "uniform":
        return k_eff[:, None].expand(B, Hkv).to(torch.int32).contiguous()

    valid = valid_prompt_mask(B, P, prompt_lens, device)  # [B, P]
    if mode == "prompt_preference":
        s_p = (scores.double() * valid[:, None]).sum(-1)
        s_m = mask_mass.double()
        pref = torch.where(s_p + s_m > 0, s_p / (s_p + s_m), torch.zeros_like(s_p))
        pref_total = cross_head_sum(pref)
        pref = torch.where(
            pref_total > 0, pref / pref_total.clamp_min(1e-300), torch.full_like(pref, 1.0 / Hkv)
        )
        k = k_eff.double()[:, None]
        targets = alpha * k + (1 - alpha) * Hkv * k * pref
        return _integerize(targets, Hkv * k_eff, lens).to(torch.int32)

    # adakv: per-head safeguard, then a global top-k over what is left.
    guard = torch.where(
        k_eff > 0,
        torch.minimum(torch.clamp_min((alpha * k_eff.double()).floor().long(), 1), k_eff),
        0,
    )  # [B]
    eligible = valid[:, None, :].expand(B, Hkv, P)
    order = rank_within(scores, eligible)  # [B, Hkv, P]
    rank = torch.empty_like(order)
    rank.scatter_(2, order, torch.arange(P, device=device).expand(B, Hkv, P).contiguous())
    rest = eligible & (rank >= guard[:, None, None])
    flat_order = rank_within(scores.reshape(B, Hkv * P), rest.reshape(B, Hkv * P))
    want = (Hkv * (k_eff - guard))[:, None]  # [B, 1]
    picked = torch.arange(Hkv * P, device=device)[None] < want
    counts = torch.zeros(B, Hkv, dtype=torch.long, device=device)
    counts.scatter_add_(1, torch.div(flat_order, P, rounding_mode="floor"), picked.long())
    return (guard[:, None] + counts).to(torch.int32)
