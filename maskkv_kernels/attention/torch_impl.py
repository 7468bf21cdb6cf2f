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


def plan_buckets_varlen(
    key_lens: list[int], tail_lens: list[int], rows: list[int], D: int
) -> list[tuple[list[int], int, int, int]]:
    """Group segments into buckets ``(segment ids, W, T, R)`` minimising the cost model.

    Segment s has ``key_lens[s]`` kept keys, ``tail_lens[s]`` tail keys and ``rows[s]`` packed
    query rows; a bucket pads them to its longest (W kept keys, T tail keys, R rows) and costs
    ``overhead + segments * (W + T) * D * (R + _COPY_ROWS)`` multiply-adds. Exact DP over the
    runs of segments sorted by total keys (with many distinct totals they are first rounded by
    :func:`_quantize` to keep the DP small). (Sorting by (tail, kept keys) instead, which keeps
    a request's tail unpadded, measured no faster on the CPU.)
    """
    by_key: dict[int, list[int]] = {}  # segments by total keys
    for s, (n, t) in enumerate(zip(key_lens, tail_lens)):
        by_key.setdefault(n + t, []).append(s)
    if len(by_key) > _MAX_DP_LENGTHS:
        merged: dict[int, list[int]] = {}
        for key, members in by_key.items():
            merged.setdefault(_quantize(key), []).extend(members)
        by_key = merged
    groups = [by_key[key] for key in sorted(by_key)]
    maxes = [
        (max(key_lens[s] for s in g), max(tail_lens[s] for s in g), max(rows[s] for s in g))
        for g in groups
    ]
    U = len(groups)
    overhead = _BUCKET_OVERHEAD / D  # in units of D multiply-adds, like the per-bucket term
    best = [0.0] + [math.inf] * U
    cut = [0] * (U + 1)
    for i in range(1, U + 1):
        n_seg = W = T = R = 0
        for j in range(i - 1, -1, -1):  # the run of groups j .. i-1
            n_seg += len(groups[j])
            W, T, R = max(W, maxes[j][0]), max(T, maxes[j][1]), max(R, maxes[j][2])
            cost = best[j] + overhead + n_seg * (W + T) * (R + _COPY_ROWS)
            if cost < best[i]:
                best[i], cut[i] = cost, j
    buckets = []
    i = U
    while i > 0:
        j = cut[i]
        members = sorted(s for g in groups[j:i] for s in g)
        W, T, R = (max(m[c] for m in maxes[j:i]) for c in range(3))
        buckets.append((members, W, T, R))
        i = j
    return buckets[::-1]


def plan_buckets(lengths: list[int], rows: int, Lt: int, D: int) -> list[tuple[list[int], int]]:
    """:func:`plan_buckets_varlen` with ``rows`` query rows and ``Lt`` tail keys per segment:
    buckets ``(segment ids, padded kept width)``."""
    S = len(lengths)
    plan = plan_buckets_varlen(lengths, [Lt] * S, [rows] * S, D)
    return [(segs, W) for segs, W, _, _ in plan]


def _zero_outside(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [..., w, D] where ``keep`` [..., w] is False set to +0.0, in place.

    Multiplies the bit patterns, viewed as integers, by 0 or 1: exact (NaN and inf included)
    and ~30x faster on CPU than ``masked_fill_`` (which broadcasts the mask element by element).
    """
    bits = x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
    bits.mul_(keep.unsqueeze(-1))
    return x


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``x`` [M, H, D] flattened to [M * H, D] (index_select, far faster on
    CPU than advanced indexing; a copy first when the rows do not flatten into a view)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, index)


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
    """q [n, r, D], k/v [n, w, D], valid bool [n, w] or None -> out [n, r, D], lse [n, r] fp32.

    Non-finite inputs as in the reference: the softmax of IEEE logits (a NaN or +inf logit, or
    logits all -inf, make the row's output NaN) and ``softmax @ v`` (an inf or NaN value reaches
    the output through 0 * inf = NaN). SDPA's fused kernel does the same except for a row whose
    logits are all -inf, which it sets to 0: on the CPU a chunk with an all-zero output row
    (that, or a true zero, e.g. from zero values) is computed again by the matmul-softmax path
    (on other devices SDPA keeps that one difference: checking would synchronise with the host).
    """
    if k.shape[1] == 0:
        lse = q.new_full(q.shape[:2], -math.inf, dtype=torch.float32) if return_lse else None
        return torch.zeros_like(q), lse
    no_key = None if valid is None else ~valid.any(1)[:, None, None]  # [n, 1, 1]
    if not return_lse:
        mask = None if valid is None else valid[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q[:, None], k[:, None], v[:, None], attn_mask=mask, scale=scale
        )[:, 0]
        if no_key is not None:  # a segment with no key at all: 0, not SDPA's NaN
            out = out.masked_fill(no_key, 0.0)
        if q.device.type != "cpu":
            return out, None
        zero_rows = (out == 0).all(-1)  # [n, r]
        if no_key is not None:
            zero_rows &= ~no_key[:, :, 0]
        if not bool(zero_rows.any()):
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
    # exp(logit - lse): the softmax wherever lse is finite; NaN wherever it is not (NaN, +inf,
    # or -inf: every logit -inf), as torch.softmax gives. Masked keys: exp(-inf) = 0.
    out = torch.bmm(logits.sub_(lse[..., None]).exp_(), v.float()).to(q.dtype)
    if no_key is not None:  # a segment with no key at all: 0 (its lse is -inf)
        out = out.masked_fill(no_key, 0.0)
    return out, (lse if return_lse else None)


class _DenseForm:
    """The 4-D form: q [B, Hq, Lq, D] as [S, G * Lq, D] packed rows (row h * Lq + i of segment
    b * Hkv + g is query i of head g * G + h); tails [B, Hkv, Lt, D] as [S, Lt, D]."""

    def __init__(self, q, k_tail, v_tail, G, Hkv, return_lse):
        B, Hq, Lq, D = q.shape
        S, rows = B * Hkv, G * Lq
        self.Lt = 0 if k_tail is None else k_tail.shape[2]
        self.qs = q.reshape(S, rows, D)  # GQA packing: the G heads of a KV head are adjacent
        self.kt = k_tail.reshape(S, self.Lt, D) if self.Lt else None
        self.vt = v_tail.reshape(S, self.Lt, D) if self.Lt else None
        self.out = q.new_empty((S, rows, D))
        self.lse = q.new_empty((S, rows), dtype=torch.float32) if return_lse else None
        self.shape = (B, Hq, Lq, D)
        self.rows = rows

    def host_sizes(self, S: int) -> tuple[list[int], list[int]]:
        return [self.Lt] * S, [self.rows] * S

    def bounds(self) -> tuple[int, int]:
        return self.Lt, self.rows

    def queries(self, sel, ids, R):
        return _take(self.qs, sel)

    def tails(self, sel, ids, T):
        if not T:
            return None
        return _take(self.kt, sel), _take(self.vt, sel), None

    def store(self, sel, ids, rs, o, lse_c, whole):
        if whole:
            self.out[sel, rs] = o
            if self.lse is not None:
                self.lse[sel, rs] = lse_c
        else:
            self.out[:, rs].index_copy_(0, sel, o)
            if self.lse is not None:
                self.lse[:, rs].index_copy_(0, sel, lse_c)

    def result(self):
        B, Hq, Lq, D = self.shape
        out = self.out.view(B, Hq, Lq, D)
        return out, None if self.lse is None else self.lse.view(B, Hq, Lq)


class _VarlenForm:
    """The varlen form off the CPU (no host lengths, so no per-request plan): q [Nq, Hq, D]
    packed by request (``cu_q``), tails [Nt, Hkv, D] packed by request (``cu_t``, from
    ``tail_starts``), every segment in one bucket padded to the host bounds. Packed row
    r = i * G + h of segment b * Hkv + g is query row cu_q[b] + i of head g * G + h. Outputs go
    to a buffer with one spare row that takes every padding row's result (no data-dependent
    shapes, so no device sync)."""

    def __init__(self, q, k_tail, v_tail, cu_q, max_q, cu_t, tail_starts, max_t, G, Hkv, ret):
        Nq, Hq, D = q.shape
        self.q, self.kt, self.vt = q, k_tail, v_tail
        self.G, self.Hkv, self.Nq, self.Hq = G, Hkv, Nq, Hq
        self.q_first = cu_q[:-1].long()
        self.q_lens = cu_q[1:].long() - self.q_first
        self.max_q = max_q
        if k_tail is not None:
            self.t_lens = cu_t[1:].long() - cu_t[:-1].long()
            self.t_first = cu_t[:-1].long() if tail_starts is None else tail_starts
            self.max_t = min(max_t, k_tail.shape[0])
        else:
            self.max_t = 0
        self.out = q.new_zeros((Nq + 1, Hq, D))  # row Nq: the spare row
        self.lse = q.new_full((Nq + 1, Hq), -math.inf, dtype=torch.float32) if ret else None
        self.arange = torch.arange(max(max_q, self.max_t, G), device=q.device)

    def bounds(self) -> tuple[int, int]:
        return self.max_t, self.G * self.max_q

    def queries(self, sel, ids, R):
        """q rows [n, R, D] of segments ``ids`` (padding rows 0); remembers where each goes."""
        b, g = ids // self.Hkv, ids % self.Hkv
        G, Q = self.G, R // self.G
        i = self.arange[:Q]
        valid = i < self.q_lens[b][:, None]  # [n, Q]
        q_row = torch.where(valid, self.q_first[b][:, None] + i, self.Nq)  # padding: spare row
        heads = g[:, None] * G + self.arange[:G]  # [n, G]
        n = ids.numel()
        self._targets = (q_row[:, :, None] * self.Hq + heads[:, None, :]).view(n, R)
        rows = q_row.clamp(max=self.Nq - 1)[:, :, None] * self.Hq + heads[:, None, :]
        qq = _rows(self.q, rows.view(-1)).view(n, Q, G, -1)  # padding rows: garbage, zeroed
        return _zero_outside(qq, valid[:, :, None]).view(n, R, -1)

    def tails(self, sel, ids, T):
        if not T:
            return None
        b, g = ids // self.Hkv, ids % self.Hkv
        j = self.arange[:T]
        rows = (self.t_first[b][:, None] + j).clamp_(max=self.kt.shape[0] - 1)
        # Padding rows are other requests' tails (or a pool's garbage): zeroed, so that an inf or
        # NaN there cannot become NaN through 0 * inf in this segment's masked softmax.
        flat = (rows * self.Hkv + g[:, None]).view(-1)
        kt = _rows(self.kt, flat).view(ids.numel(), T, -1)
        vt = _rows(self.vt, flat).view(ids.numel(), T, -1)
        valid = j < self.t_lens[b][:, None]
        return _zero_outside(kt, valid), _zero_outside(vt, valid), valid

    def store(self, sel, ids, rs, o, lse_c, whole):
        """Rows ``rs`` of the segments last passed to :meth:`queries`."""
        flat = self._targets[:, rs].reshape(-1)
        self.out.view(-1, self.out.shape[-1]).index_copy_(0, flat, o.reshape(-1, o.shape[-1]))
        if self.lse is not None:
            self.lse.view(-1).index_copy_(0, flat, lse_c.reshape(-1))

    def result(self):
        out = self.out[: self.Nq]
        return out, None if self.lse is None else self.lse[: self.Nq]


def _attend_buckets(form, k, v, cu_seqlens, seg_starts, max_seqlen, S, D, scale, return_lse):
    """The loop both forms share: per bucket of segments, [kept keys padded to W ‖ tail padded to
    T] against the bucket's R query rows, chunked so that no call holds more than
    ``MAX_CHUNK_ELEMS`` scores."""
    device = k.device
    N = k.shape[0]
    starts = cu_seqlens[:-1].long() if seg_starts is None else seg_starts
    lens = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    if device.type == "cpu":  # the dense form (the varlen form runs per request there)
        key_lens = lens.tolist()
        tail_lens, rows = form.host_sizes(S)
        plan = plan_buckets_varlen(key_lens, tail_lens, rows, D)
        plan = [(segs, W, T, R, any(key_lens[s] < W for s in segs)) for segs, W, T, R in plan if R]
    else:  # no host sync: one bucket padded to the host-known bounds
        T, R = form.bounds()
        plan = [(list(range(S)), min(max_seqlen, N), T, R, True)]

    arange = torch.arange(max([W for _, W, *_ in plan], default=0), device=device)
    for segs, W, T, R, padded in plan:
        # Segments in natural order (one bucket) use slices, others index_select/index_copy_.
        whole = len(segs) == S
        ids_all = torch.arange(S, device=device) if whole else torch.tensor(segs, device=device)
        n_keys = W + T
        seg_step = max(1, MAX_CHUNK_ELEMS // max(1, R * n_keys))
        row_step = max(1, MAX_CHUNK_ELEMS // max(1, n_keys)) if seg_step == 1 else R
        for c in range(0, len(segs), seg_step):
            ids = ids_all[c : c + seg_step]
            sel = slice(c, c + seg_step) if whole else ids
            take = functools.partial(_take, sel=sel)
            n = ids.numel()
            ks, vs, seg_valid = [], [], None
            if W and whole and not padded and seg_starts is None:  # equal packed segments: a view
                ks.append(k.view(S, W, D)[sel])
                vs.append(v.view(S, W, D)[sel])
            elif W:
                idx = (take(starts)[:, None] + arange[:W]).clamp_(max=N - 1).view(-1)
                k_seg = k.index_select(0, idx).view(n, W, D)
                v_seg = v.index_select(0, idx).view(n, W, D)
                if padded:  # key j of the segment part is valid if inside the segment
                    seg_valid = arange[:W] < take(lens)[:, None]
                    # The padding rows are rows of the neighbouring segments (other requests, or
                    # a pool's garbage): zero them, or an inf / NaN there turns this segment's
                    # masked softmax into NaN through 0 * inf.
                    _zero_outside(k_seg, seg_valid)
                    _zero_outside(v_seg, seg_valid)
                ks.append(k_seg)
                vs.append(v_seg)
            tail = form.tails(sel, ids, T)
            tail_valid = None
            if tail is not None:
                ks.append(tail[0])
                vs.append(tail[1])
                tail_valid = tail[2]
            valid = None
            if seg_valid is not None or tail_valid is not None:  # key mask over [W ‖ T]
                ones = functools.partial(torch.ones, dtype=torch.bool, device=device)
                parts = [seg_valid if seg_valid is not None else ones(n, W)] if W else []
                if T:
                    parts.append(tail_valid if tail_valid is not None else ones(n, T))
                valid = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
            kk = torch.cat(ks, 1) if len(ks) > 1 else ks[0] if ks else k.new_empty(n, 0, D)
            vv = torch.cat(vs, 1) if len(vs) > 1 else vs[0] if vs else v.new_empty(n, 0, D)
            qc = form.queries(sel, ids, R)
            for r in range(0, R, row_step):
                rs = slice(r, min(r + row_step, R))
                o, lse_c = _attend(qc[:, rs], kk, vv, valid, scale, return_lse)
                form.store(sel, ids, rs, o, lse_c, whole)
    return form.result()


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
    seg_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as the Triton launcher: out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq]."""
    B, Hq, Lq, D = q.shape
    Hkv = num_kv_heads
    form = _DenseForm(q, k_tail, v_tail, Hq // Hkv, Hkv, return_lse)
    if B * Hq * Lq == 0:
        return form.result()
    return _attend_buckets(
        form, k, v, cu_seqlens, seg_starts, max_seqlen, B * Hkv, D, scale, return_lse
    )


def ragged_attention_varlen_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_starts: torch.Tensor | None,
    max_seqlen: int,
    num_kv_heads: int,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    k_tail: torch.Tensor | None,
    v_tail: torch.Tensor | None,
    cu_seqlens_tail: torch.Tensor | None,
    tail_starts: torch.Tensor | None,
    max_seqlen_tail: int,
    scale: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Varlen form: q [Nq, Hq, D], tails [Nt, Hkv, D] -> out [Nq, Hq, D] in q's dtype (rows of
    no request 0), lse [Nq, Hq] fp32 or None.

    On the CPU, one dense call (:func:`ragged_attention_torch`) per request on views of its rows:
    every request gets exactly the bits of the dense call on it alone (batch invariance; BLAS and
    SDPA round a row by the shape of its batched product, so one product over several requests
    could not). Elsewhere the lengths are not read (that would sync): one bucket padded to the
    host bounds, as the dense form does there.
    """
    Nq, Hq, D = q.shape
    Hkv = num_kv_heads
    if q.device.type == "cpu":
        return _varlen_per_request(
            q, k, v, cu_seqlens, seg_starts, max_seqlen, Hkv, cu_seqlens_q, k_tail, v_tail,
            cu_seqlens_tail, tail_starts, scale, return_lse,
        )  # fmt: skip
    S = (cu_seqlens_q.numel() - 1) * Hkv
    form = _VarlenForm(
        q, k_tail, v_tail, cu_seqlens_q, max_seqlen_q, cu_seqlens_tail, tail_starts,
        max_seqlen_tail, Hq // Hkv, Hkv, return_lse,
    )  # fmt: skip
    if Nq == 0 or max_seqlen_q == 0:
        return form.result()
    return _attend_buckets(form, k, v, cu_seqlens, seg_starts, max_seqlen, S, D, scale, return_lse)


def _varlen_per_request(
    q, k, v, cu_seqlens, seg_starts, max_seqlen, Hkv, cu_q, k_tail, v_tail, cu_t, tail_starts,
    scale, return_lse,
):  # fmt: skip
    """The varlen form on the CPU as dense calls, one per request with queries: request b's
    queries [1, Hq, n_q, D], its Hkv segments as a pool view of k / v, its tail rows."""
    Nq, Hq, D = q.shape
    out = q.new_zeros((Nq, Hq, D))
    lse = q.new_full((Nq, Hq), -math.inf, dtype=torch.float32) if return_lse else None
    q_offsets = cu_q.tolist()
    starts = cu_seqlens[:-1].long() if seg_starts is None else seg_starts
    if k_tail is not None:
        t_offsets = cu_t.tolist()
        t_first = t_offsets[:-1] if tail_starts is None else tail_starts.tolist()
    for b in range(len(q_offsets) - 1):
        q0, q1 = q_offsets[b], q_offsets[b + 1]
        if q1 == q0:
            continue
        segs = slice(b * Hkv, (b + 1) * Hkv)
        cu_b = cu_seqlens[b * Hkv : (b + 1) * Hkv + 1]
        kt_b = vt_b = None
        n_tail = 0 if k_tail is None else t_offsets[b + 1] - t_offsets[b]
        if n_tail:  # an empty tail is no tail, as the dense op's dispatch passes it
            rows = slice(t_first[b], t_first[b] + n_tail)
            kt_b, vt_b = (t[rows].transpose(0, 1)[None] for t in (k_tail, v_tail))
        out_b, lse_b = ragged_attention_torch(
            q[q0:q1].transpose(0, 1)[None], k, v, cu_b - cu_b[0], max_seqlen, Hkv, kt_b, vt_b,
            scale, return_lse, seg_starts=starts[segs],
        )  # fmt: skip
        out[q0:q1] = out_b[0].transpose(0, 1)
        if lse is not None:
            lse[q0:q1] = lse_b[0].T
    return out, lse
