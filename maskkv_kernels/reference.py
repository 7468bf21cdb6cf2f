"""Eager PyTorch references: the oracle every kernel and backend is tested against.

Written to be obviously right rather than fast: fp32 (float64 for budgets) math, every
intermediate materialised (including the [B, Hq, M, L] attention matrix), Python loops over batch
rows and heads where that makes the definition plainer. Never use these on long prompts.

Conventions shared with the fast paths (see DESIGN.md, "The algorithm"):
- prompt = the first ``prompt_len`` = P positions; with left padding, row ``b`` has its
  ``prompt_lens[b]`` real tokens at positions ``[P - prompt_lens[b], P)``; the response follows.
- padding positions get score 0, are excluded from every softmax and are never kept;
- window mode: window positions ``[P - W, P)`` get score ``+inf`` (always kept, inside the budget);
- ranking: higher score first, NaN ranks lowest, ties go to the lower position;
- a scoring row whose softmax is undefined (no valid key, or a NaN / +inf logit, e.g. from a
  non-finite key) carries no mass, so without a given ``lse`` every score is finite (window
  positions aside).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _checks as C
from ._ragged import RaggedKV

__all__ = [
    "mask_scores",
    "window_scores",
    "allocate_head_budgets",
    "topk_gather",
    "select_and_gather",
    "ragged_attention",
]


def _valid_keys(B: int, P: int, L: int, prompt_lens: torch.Tensor | None, device) -> torch.Tensor:
    """bool [B, L]: True for real tokens (left padding sits at the start of the prompt)."""
    pos = torch.arange(L, device=device)
    if prompt_lens is None:
        return torch.ones(B, L, dtype=torch.bool, device=device)
    first_real = P - prompt_lens.to(device).long()
    return pos[None, :] >= first_real[:, None]


def _sum_over_group(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, Hkv, ...]: query head h belongs to KV head h // G."""
    B, Hq = x.shape[:2]
    return x.reshape(B, Hkv, Hq // Hkv, *x.shape[2:]).sum(2)


def mask_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    prompt_len: int,
    prompt_lens: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-query voting scores.

    Args:
        q: [B, Hq, M, D] queries of the M mask tokens.
        k: [B, Hkv, L, D] keys (prompt = first ``prompt_len`` positions).
        lse: optional fp32 [B, Hq, M], natural-log log-sum-exp of each query row over all valid
            keys (as an attention forward returns it); used instead of recomputing it.
    Returns:
        scores: fp32 [B, Hkv, P], attention mass each prompt key receives, summed over the G query
            heads of its KV head and the M queries (0 at padding positions).
        mask_mass: fp32 [B, Hkv], the same mass on the response keys (S_m).
    """
    dims = C.check_qkv(q, k, None, prompt_len)
    C.check_prompt_lens(prompt_lens, dims, q.device)
    C.check_lse(lse, dims, q, "mask")
    scale = C.check_scale(scale, dims.D)
    B, Hkv, L, P = dims.B, dims.Hkv, dims.L, dims.P

    logits = (
        torch.einsum("bhmd,bhld->bhml", q.float(), k.float().repeat_interleave(dims.G, 1)) * scale
    )
    valid = _valid_keys(B, P, L, prompt_lens, q.device)[:, None, None, :]
    logits = logits.masked_fill(~valid, -math.inf)
    if lse is None:
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no valid key is all-NaN
    else:  # a row whose LSE is -inf (no valid key) carries no mass, as in the fast paths
        no_key = ~(lse > -math.inf)[..., None]
        probs = torch.exp(logits - lse.masked_fill(no_key[..., 0], 0.0)[..., None])
        probs = probs.masked_fill(no_key, 0.0)
    mass = _sum_over_group(probs.sum(2), Hkv)  # [B, Hkv, L]
    return mass[..., :P].contiguous(), mass[..., P:].sum(-1)


def _pool(x: torch.Tensor, pool: str, kernel: int) -> torch.Tensor:
    """Same-padded 1-D pooling along the last dim of [B, H, N] (SnapKV's choice)."""
    if pool == "none" or kernel == 1 or x.shape[-1] == 0:
        return x
    B, H, N = x.shape
    flat = x.reshape(B * H, 1, N)
    if pool == "max":
        out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return out.reshape(B, H, N)


def window_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    prompt_len: int,
    prompt_lens: torch.Tensor | None = None,
    pool: str = "max",
    pool_kernel: int = 7,
    scale: float | None = None,
) -> torch.Tensor:
    """SnapKV-style window scores, adapted to bidirectional dLLMs.

    Args:
        q: [B, Hq, W, D] queries of the last W prompt positions.
        k: [B, Hkv, L, D] keys; only the first ``prompt_len`` (the prompt) are scored.
    Returns:
        fp32 [B, Hkv, P]: softmax over valid prompt keys (no causal mask), summed over window
        queries and group, pooled over the non-window positions ``[0, P - W)``; window positions
        are ``+inf``; padding positions 0. Padding window queries contribute nothing.
    """
    dims = C.check_qkv(q, k, None, prompt_len)
    C.check_prompt_lens(prompt_lens, dims, q.device)
    C.check_pool(pool, pool_kernel)
    scale = C.check_scale(scale, dims.D)
    B, Hkv, W, P = dims.B, dims.Hkv, dims.M, dims.P
    if W > P:
        raise C.fail("q", f"[B, Hq, W, D] with W <= prompt_len={P} (window queries)", C.describe(q))

    kp = k[:, :, :P].float().repeat_interleave(dims.G, 1)
    logits = torch.einsum("bhwd,bhpd->bhwp", q.float(), kp) * scale
    valid = _valid_keys(B, P, P, prompt_lens, q.device)  # [B, P]
    logits = logits.masked_fill(~valid[:, None, None, :], -math.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    query_valid = valid[:, P - W :]  # [B, W]: a padding query votes for nothing
    probs = probs * query_valid[:, None, :, None]
    scores = _sum_over_group(probs.sum(2), Hkv)  # [B, Hkv, P]

    out = torch.empty_like(scores)
    out[..., : P - W] = _pool(scores[..., : P - W], pool, pool_kernel)
    out[..., P - W :] = math.inf
    return out.masked_fill(~valid[:, None, :], 0.0)


# ----------------------------------------------------------------------------- head budgets


def _rank_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices of a 1-D score vector, best first: higher score, NaN below -inf, ties lower index."""
    values = scores.double().tolist()

    def key(i: int) -> tuple[bool, float]:  # NaN after every number, then descending value
        return (True, 0.0) if math.isnan(values[i]) else (False, -values[i])

    # Python's sort is stable: equal keys (and all NaNs) keep index order.
    return torch.tensor(sorted(range(len(values)), key=key), dtype=torch.long)


def _integerize(targets: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """Integers in [0, cap] summing to ``total`` (<= len * cap), close to real ``targets``.

    First water-fill: heads whose share exceeds ``cap`` are clamped and the excess is shared by
    the others in proportion to their targets (evenly if those are all 0), until nobody
    overflows. Then largest remainder: floors, and +1 to the largest fractional parts (ties go to
    the lower head index).
    """
    t = targets.double().clamp_min(0.0)
    H = t.numel()
    share = torch.zeros(H, dtype=torch.float64)
    free = torch.ones(H, dtype=torch.bool)
    remaining = float(total)
    for _ in range(H + 1):
        weights = t[free]
        if weights.sum() <= 0:
            weights = torch.ones_like(weights)
        s = weights * (remaining / weights.sum())
        over = s > cap
        if not over.any():
            share[free] = s
            break
        idx = free.nonzero().flatten()[over]
        share[idx] = float(cap)
        free[idx] = False
        remaining -= cap * len(idx)
    base = share.floor().clamp(0, cap)
    left = total - int(base.sum().item())
    frac = share - base
    order = torch.sort(frac, descending=True, stable=True).indices
    out = base.long()
    out[order[:left]] += 1
    return out


def allocate_head_budgets(
    scores: torch.Tensor,
    layer_budget: int,
    mode: str = "uniform",
    *,
    mask_mass: torch.Tensor | None = None,
    alpha: float | None = None,
    prompt_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Split a layer budget k_l between the KV heads of every batch row.

    Args:
        scores: fp32 [B, Hkv, P] scores from ``mask_scores`` / ``window_scores``.
        layer_budget: k_l, average prompt KV pairs per KV head.
        mode: ``"uniform"`` (k_l each), ``"prompt_preference"`` (MaskKV; needs ``mask_mass``
            [B, Hkv]; ``alpha`` defaults to 0.1) or ``"adakv"`` (``alpha`` is the safeguard
            fraction, default 0.2).
        prompt_lens: int [B] real prompt tokens per row (left padding); default all P.
    Returns:
        int32 [B, Hkv]; each row sums to exactly Hkv * min(k_l, prompt_lens[b]); each entry is in
        [0, prompt_lens[b]].
    """
    B, Hkv, P = C.check_scores(scores)
    C.check_layer_budget(layer_budget, "layer_budget")
    C.check_choice(mode, "mode", C.HEAD_BUDGETS)
    alpha = C.check_alpha(alpha, mode)
    if mode == "prompt_preference":
        C.check_mask_mass(mask_mass, B, Hkv, scores)
    if prompt_lens is not None:
        C.check_prompt_lens_tensor(prompt_lens, B, P, scores.device, what="P")
    lens = [P] * B if prompt_lens is None else [int(x) for x in prompt_lens.tolist()]

    out = torch.zeros(B, Hkv, dtype=torch.int32)
    for b in range(B):
        k_eff = min(layer_budget, lens[b])
        total = Hkv * k_eff
        if mode == "uniform":
            out[b] = k_eff
        elif mode == "prompt_preference":
            s_p = scores[b, :, P - lens[b] :].double().sum(-1)
            s_m = mask_mass[b].double().cpu()
            s_p = s_p.cpu()
            pref = torch.where(s_p + s_m > 0, s_p / (s_p + s_m), torch.zeros_like(s_p))
            pref = pref / pref.sum() if pref.sum() > 0 else torch.full_like(pref, 1.0 / Hkv)
            targets = alpha * k_eff + (1 - alpha) * Hkv * k_eff * pref
            out[b] = _integerize(targets, total, lens[b]).int()
        else:  # adakv
            guard = min(k_eff, max(1, math.floor(alpha * k_eff))) if k_eff > 0 else 0
            real = scores[b, :, P - lens[b] :].cpu()  # [Hkv, lens[b]]
            rest = []  # (score, flat index, head) of everything past each head's safeguard
            for g in range(Hkv):
                order = _rank_order(real[g])
                for j in order[guard:].tolist():
                    rest.append((real[g, j].item(), g * lens[b] + j, g))
            key = torch.tensor([r[0] for r in rest], dtype=torch.float64)
            chosen = _rank_order(key)[: total - Hkv * guard].tolist() if rest else []
            counts = torch.zeros(Hkv, dtype=torch.int32)
            for i in chosen:
                counts[rest[i][2]] += 1
            out[b] = guard + counts
    return out.to(scores.device)


# ----------------------------------------------------------------------------- top-k and gather


def topk_gather(
    scores: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budgets: torch.Tensor,
    *,
    prompt_lens: torch.Tensor | None = None,
) -> RaggedKV:
    """Keep, per (b, g), the ``budgets[b, g]`` best-scored real prompt positions.

    Args:
        scores: fp32 [B, Hkv, P]; k, v: [B, Hkv, L, D] with L >= P (only the prompt is read).
        budgets: int [B, Hkv], each in [0, prompt_lens[b]].
    Returns:
        RaggedKV with positions ascending inside every segment and rows copied bit for bit.
    """
    B, Hkv, P = C.check_scores(scores)
    if k.dim() != 4 or k.shape[:2] != (B, Hkv) or k.shape[2] < P or v.shape != k.shape:
        raise C.fail("k", f"[B={B}, Hkv={Hkv}, L>={P}, D] (and v alike)", C.describe(k))
    if prompt_lens is not None:
        C.check_prompt_lens_tensor(prompt_lens, B, P, scores.device, what="P")
    lens = [P] * B if prompt_lens is None else [int(x) for x in prompt_lens.tolist()]
    budgets = budgets.cpu().long()
    ks, vs, ps, counts = [], [], [], []
    for b in range(B):
        first = P - lens[b]
        for g in range(Hkv):
            n = int(budgets[b, g])
            if not 0 <= n <= lens[b]:
                raise C.fail("budgets", f"values in [0, prompt_lens[{b}]={lens[b]}]", n)
            order = _rank_order(scores[b, g, first:].cpu())[:n]
            pos = torch.sort(order).values + first
            ks.append(k[b, g, pos.to(k.device)])
            vs.append(v[b, g, pos.to(k.device)])
            ps.append(pos)
            counts.append(n)
    cu = torch.zeros(B * Hkv + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0).int()
    D = k.shape[-1]
    return RaggedKV(
        k=torch.cat(ks) if ks else k.new_empty(0, D),
        v=torch.cat(vs) if vs else v.new_empty(0, D),
        cu_seqlens=cu.to(k.device),
        positions=torch.cat(ps).int().to(k.device)
        if ps
        else torch.empty(0, dtype=torch.int32, device=k.device),
        max_seqlen=max(counts, default=0),
        num_kv_heads=Hkv,
    )


def select_and_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budget: int | torch.Tensor,
    *,
    prompt_len: int,
    prompt_lens: torch.Tensor | None = None,
    score: str = "mask",
    head_budget: str = "uniform",
    pool: str = "max",
    pool_kernel: int = 7,
    alpha: float | None = None,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
    return_scores: bool = False,
) -> RaggedKV | tuple[RaggedKV, torch.Tensor]:
    """Score, split the budget between heads, keep the top-k and gather (see the fast op)."""
    dims = C.check_qkv(q, k, v, prompt_len)
    C.check_choice(score, "score", C.SCORES)
    C.check_choice(head_budget, "head_budget", C.HEAD_BUDGETS)
    C.check_prompt_lens(prompt_lens, dims, q.device)
    C.check_lse(lse, dims, q, score)
    if score == "mask":
        scores, mask_mass = mask_scores(
            q, k, prompt_len=prompt_len, prompt_lens=prompt_lens, lse=lse, scale=scale
        )
    else:
        scores = window_scores(
            q,
            k,
            prompt_len=prompt_len,
            prompt_lens=prompt_lens,
            pool=pool,
            pool_kernel=pool_kernel,
            scale=scale,
        )
        mask_mass = None
    if isinstance(budget, torch.Tensor):
        C.check_head_budgets(budget, dims, q.device)
        budgets = budget
    else:
        C.check_layer_budget(budget)
        if head_budget == "prompt_preference" and mask_mass is None:
            raise C.fail(
                "head_budget",
                "'uniform' or 'adakv' with score='window' (no mask mass)",
                repr(head_budget),
            )
        budgets = allocate_head_budgets(
            scores, budget, head_budget, mask_mass=mask_mass, alpha=alpha, prompt_lens=prompt_lens
        )
    cache = topk_gather(scores, k, v, budgets, prompt_lens=prompt_lens)
    return (cache, scores) if return_scores else cache


# ----------------------------------------------------------------------------- attention


def ragged_attention(
    q: torch.Tensor,
    cache: RaggedKV,
    k_tail: torch.Tensor | None = None,
    v_tail: torch.Tensor | None = None,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    cu_seqlens_tail: torch.Tensor | None = None,
    max_seqlen_tail: int | None = None,
    tail_starts: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of each KV head's queries over [its kept prompt segment ‖ the tail].

    Two forms (see ``maskkv_kernels.ragged_attention``):

    - dense: q [B, Hq, Lq, D], k_tail / v_tail [B, Hkv, Lt, D]; returns out [B, Hq, Lq, D]
      (and lse [B, Hq, Lq]);
    - varlen (``cu_seqlens_q`` given): q [Nq, Hq, D] packed, request b owning rows
      ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``; k_tail / v_tail [Nt, Hkv, D] packed, request b's
      tail being ``cu_seqlens_tail[b+1] - cu_seqlens_tail[b]`` rows from ``tail_starts[b]``
      (default ``cu_seqlens_tail[b]``); returns out [Nq, Hq, D] (and lse [Nq, Hq]), rows of no
      request 0 (lse -inf).

    Non-causal; the cache may be a pool view (``seg_starts``). Out in q's dtype (0 for a head
    with no key at all), fp32 natural-log LSE (-inf for no key).
    """
    if cu_seqlens_q is None:
        if any(
            x is not None for x in (max_seqlen_q, cu_seqlens_tail, max_seqlen_tail, tail_starts)
        ):
            raise C.fail("cu_seqlens_q", "a tensor when any varlen argument is given", "None")
        B, Hq, Hkv, Lq, D, Lt = C.check_ragged_attention(q, cache, k_tail, v_tail)
        # The dense form is the varlen form with Lq queries and Lt tail rows per request.
        q_rows = q.transpose(1, 2).reshape(B * Lq, Hq, D)
        tails = [None, None]
        if Lt:
            tails = [t.transpose(1, 2).reshape(B * Lt, Hkv, D) for t in (k_tail, v_tail)]
        cu_q = torch.arange(B + 1, dtype=torch.int32) * Lq
        cu_t = torch.arange(B + 1, dtype=torch.int32) * Lt
        out, lse = _ragged_attention_varlen(q_rows, cache, *tails, cu_q, cu_t, None, scale)
        out = out.view(B, Lq, Hq, D).transpose(1, 2).contiguous()
        lse = lse.view(B, Lq, Hq).transpose(1, 2).contiguous()
    else:
        C.check_ragged_attention_varlen(
            q, cache, k_tail, v_tail, cu_seqlens_q, max_seqlen_q, cu_seqlens_tail,
            max_seqlen_tail, tail_starts,
        )  # fmt: skip
        out, lse = _ragged_attention_varlen(
            q, cache, k_tail, v_tail, cu_seqlens_q, cu_seqlens_tail, tail_starts, scale
        )
    return (out, lse) if return_lse else out


def _ragged_attention_varlen(q, cache, k_tail, v_tail, cu_q, cu_t, tail_starts, scale):
    """The varlen definition, one (request, KV head) at a time: (out [Nq, Hq, D], lse [Nq, Hq])."""
    Nq, Hq, D = q.shape
    scale = C.check_scale(scale, D)
    Hkv = cache.num_kv_heads
    G = Hq // Hkv
    cu_q = cu_q.cpu().tolist()
    cu = cache.cu_seqlens.cpu().tolist()
    seg_starts = cache.starts().cpu().tolist()
    if k_tail is not None:
        cu_t = cu_t.cpu().tolist()
        t_starts = cu_t[:-1] if tail_starts is None else tail_starts.cpu().tolist()
    out = torch.zeros(Nq, Hq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((Nq, Hq), -math.inf, dtype=torch.float32, device=q.device)
    for b in range(len(cu_q) - 1):
        queries = slice(cu_q[b], cu_q[b + 1])
        for g in range(Hkv):
            s = b * Hkv + g
            start, n = seg_starts[s], cu[s + 1] - cu[s]
            keys = [cache.k[start : start + n].float()]
            vals = [cache.v[start : start + n].float()]
            if k_tail is not None:
                tail = slice(t_starts[b], t_starts[b] + cu_t[b + 1] - cu_t[b])
                keys.append(k_tail[tail, g].float())
                vals.append(v_tail[tail, g].float())
            kk, vv = torch.cat(keys), torch.cat(vals)
            if kk.shape[0] == 0:
                continue
            heads = slice(g * G, (g + 1) * G)
            logits = q[queries, heads].float().transpose(0, 1) @ kk.T * scale  # [G, nq, n]
            lse[queries, heads] = torch.logsumexp(logits, -1).T
            out[queries, heads] = (torch.softmax(logits, -1) @ vv).transpose(0, 1)
    return out.to(q.dtype), lse
