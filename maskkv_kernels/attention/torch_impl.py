"""Vectorised PyTorch ragged attention (the CPU path of the generation loop).

Segments are grouped into a few length buckets; each bucket is one batched attention over
[its segments' kept keys, padded to the bucket's longest ‖ the tail], with the G query heads of a
KV head packed as G * Lq rows (GQA without repeating K/V). On CPU the lengths are read for free
and the buckets are chosen by a small cost model (padding waste vs. per-call overhead); on other
devices reading them would be a sync, so there is one bucket padded to ``max_seqlen``.

Without LSE the attention is ``F.scaled_dot_product_attention`` (a fused flash kernel on CPU,
no score matrix); with LSE it is an fp32 matmul-softmax. Both are chunked over segments and query
rows so that no chunk holds more than ``MAX_CHUNK_ELEMS`` scores.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

MAX_CHUNK_ELEMS = 1 << 25  # fp32 scores (128 MiB) per batched call; tests lower it
# Cost model of one bucket (measured on a CPU core: SDPA ~0.03 ns per multiply-add, gathering and
# concatenating K and V ~2 ns per key element, ~50 us per batched call), in units of one
# multiply-add: overhead + segments * (width + Lt) * D * (rows + _COPY_ROWS).
_BUCKET_OVERHEAD = 1e6
_COPY_ROWS = 32
_MAX_DP_LENGTHS = 48  # distinct lengths fed to the O(U^2) bucketing DP; more are rounded first


def _quantize(n: int, steps_per_octave: int = 4) -> int:
    """Round ``n`` up to one of ``steps_per_octave`` values per power of two (<= 25% padding)."""
    if n <= steps_per_octave:
        return n
    step = 1 << max(0, n.bit_length() - 1 - int(math.log2(steps_per_octave)))
    return -(-n // step) * step


def plan_buckets(lengths: list[int], rows: int, Lt: int, D: int) -> list[tuple[list[int], int]]:
    """Group segments into buckets ``(segment ids, padded width)`` minimising the cost model.

    Exact DP over the sorted distinct lengths (a bucket is a contiguous run of them); with many
    distinct lengths they are first rounded by :func:`_quantize` to keep the DP small.
    """
    by_len: dict[int, list[int]] = {}
    for s, n in enumerate(lengths):
        by_len.setdefault(n, []).append(s)
    keys = sorted(by_len)
    if len(keys) > _MAX_DP_LENGTHS:
        merged: dict[int, list[int]] = {}
        for n in keys:
            merged.setdefault(_quantize(n), []).extend(by_len[n])
        by_len, keys = merged, sorted(merged)
    counts = [len(by_len[n]) for n in keys]
    U = len(keys)
    overhead = _BUCKET_OVERHEAD / (D * (rows + _COPY_ROWS))  # in keys of one segment
    best = [0.0] + [math.inf] * U
    cut = [0] * (U + 1)
    for i in range(1, U + 1):
        width = keys[i - 1] + Lt
        n_seg = 0
        for j in range(i - 1, -1, -1):
            n_seg += counts[j]
            cost = best[j] + overhead + n_seg * width
            if cost < best[i]:
                best[i], cut[i] = cost, j
    buckets = []
    i = U
    while i > 0:
        j = cut[i]
        segs = [s for n in keys[j:i] for s in by_len[n]]
        buckets.append((sorted(segs), max(lengths[s] for s in segs)))
        i = j
    return buckets[::-1]


def _take(x: torch.Tensor, sel: slice | torch.Tensor) -> torch.Tensor:
    """Rows ``sel`` of ``x`` along dim 0: a view for a slice, else index_select (row copies, far
    faster on CPU than advanced indexing)."""
    return x[sel] if isinstance(sel, slice) else x.index_select(0, sel)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [n, r, D], k/v [n, w, D], valid bool [n, w] or None -> out [n, r, D], lse [n, r] fp32."""
    if k.shape[1] == 0:
        lse = q.new_full(q.shape[:2], -math.inf, dtype=torch.float32) if return_lse else None
        return torch.zeros_like(q), lse
    if not return_lse:
        mask = None if valid is None else valid[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q[:, None], k[:, None], v[:, None], attn_mask=mask, scale=scale
        )[:, 0]
        if valid is not None:  # a segment with no key at all: 0, not SDPA's NaN
            out = out.masked_fill(~valid.any(1)[:, None, None], 0.0)
        return out, None
    logits = torch.baddbmm(
        q.new_empty((), dtype=torch.float32),
        q.float(),
        k.float().transpose(1, 2),
        beta=0.0,
        alpha=scale,
    )
    if valid is not None:
        logits.masked_fill_(~valid[:, None, :], -math.inf)
    lse = torch.logsumexp(logits, -1)
    p = logits.sub_(torch.where(torch.isinf(lse), 0.0, lse)[..., None]).exp_()  # -inf -> 0
    return torch.bmm(p, v.float()).to(q.dtype), lse


def ragged_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    num_kv_heads: int,
    k_tail: torch.Tensor | None,
    v_tail: torch.Tensor | None,
    scale: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as the Triton launcher: out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq]."""
    B, Hq, Lq, D = q.shape
    Hkv = num_kv_heads
    G = Hq // Hkv
    S, rows = B * Hkv, G * Lq
    N = k.shape[0]
    Lt = 0 if k_tail is None else k_tail.shape[2]
    out = q.new_empty((S, rows, D))
    lse = q.new_empty((S, rows), dtype=torch.float32) if return_lse else None
    if S * rows == 0:
        return out.view(B, Hq, Lq, D), None if lse is None else lse.view(B, Hq, Lq)

    qs = q.reshape(S, rows, D)  # GQA packing: the G heads of a KV head are adjacent in q
    kt = k_tail.reshape(S, Lt, D) if Lt else None
    vt = v_tail.reshape(S, Lt, D) if Lt else None
    starts = cu_seqlens[:-1].long()
    lens = cu_seqlens[1:].long() - starts
    if cu_seqlens.device.type == "cpu":
        lengths = lens.tolist()
        plan = plan_buckets(lengths, rows, Lt, D)
        plan = [(segs, width, any(lengths[s] < width for s in segs)) for segs, width in plan]
    else:  # no host sync: one bucket padded to the host-known bound
        plan = [(list(range(S)), min(max_seqlen, N), True)]

    arange = torch.arange(max(w for _, w, _ in plan) + Lt, device=q.device)  # sliced below
    for segs, width, padded in plan:
        # Segments in natural order (one bucket) use slices, others index_select/index_copy_.
        whole = len(segs) == S
        ids = None if whole else torch.tensor(segs, device=q.device)
        n_keys = width + Lt
        seg_step = max(1, MAX_CHUNK_ELEMS // max(1, rows * n_keys))
        row_step = max(1, MAX_CHUNK_ELEMS // max(1, n_keys)) if seg_step == 1 else rows
        for c in range(0, len(segs), seg_step):
            sel = slice(c, c + seg_step) if whole else ids[c : c + seg_step]
            take = functools.partial(_take, sel=sel)
            n = len(segs[c : c + seg_step])
            ks, vs, valid = [], [], None
            if width and whole and not padded:  # every segment has `width` keys: a view
                ks.append(k.view(S, width, D)[sel])
                vs.append(v.view(S, width, D)[sel])
            elif width:
                idx = (take(starts)[:, None] + arange[:width]).clamp_(max=N - 1).view(-1)
                k_seg = k.index_select(0, idx).view(n, width, D)
                v_seg = v.index_select(0, idx).view(n, width, D)
                if padded:  # key j is valid if inside the segment or in the tail
                    seg_lens = take(lens)[:, None]
                    # The padding rows are rows of the neighbouring segments (other requests):
                    # zero them, or an inf / NaN there turns this segment's masked softmax into
                    # NaN through 0 * inf.
                    outside = (arange[:width] >= seg_lens)[..., None]
                    k_seg.masked_fill_(outside, 0.0)
                    v_seg.masked_fill_(outside, 0.0)
                    ar = arange[:n_keys]
                    valid = (ar < seg_lens) | (ar >= width)
                ks.append(k_seg)
                vs.append(v_seg)
            if Lt:
                ks.append(take(kt))
                vs.append(take(vt))
            kk = torch.cat(ks, 1) if len(ks) > 1 else ks[0] if ks else q.new_empty(n, 0, D)
            vv = torch.cat(vs, 1) if len(vs) > 1 else vs[0] if vs else q.new_empty(n, 0, D)
            qc = take(qs)
            for r in range(0, rows, row_step):
                rs = slice(r, r + row_step)
                o, lse_c = _attend(qc[:, rs], kk, vv, valid, scale, return_lse)
                if whole:
                    out[sel, rs] = o
                    if lse is not None:
                        lse[sel, rs] = lse_c
                else:
                    out[:, rs].index_copy_(0, sel, o)
                    if lse is not None:
                        lse[:, rs].index_copy_(0, sel, lse_c)
    return out.view(B, Hq, Lq, D), None if lse is None else lse.view(B, Hq, Lq)
