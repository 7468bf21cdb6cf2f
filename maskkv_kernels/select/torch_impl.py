"""Vectorised PyTorch backend: the CPU path, and the GPU path where Triton is missing.

Same contract as the Triton launchers (``triton_scores.score_keys`` / ``pool_window`` and
``triton_topk.topk_gather``): no Python loop over batch rows or heads, no device-to-host sync,
memory bounded by chunking the key and query dimensions (the logits of one chunk hold at most
``max_elems`` fp32 values; the rest is O(B * Hkv * (L + G*M))).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..budgets import rank_within

MAX_ELEMS = 1 << 24  # 64 MiB of fp32 logits per chunk
SKINNY_ROWS = 8  # fewer scoring rows per KV head: no BLAS product (``_rowwise_logits``)


def _chunks(bh: int, rows: int, keys: int, max_elems: int) -> tuple[int, int]:
    """(row chunk, key chunk) with bh * row_chunk * key_chunk <= max_elems where possible;
    all keys in one chunk when a row of them fits (one pass instead of two)."""
    kc = max(1, keys if bh * keys <= max_elems else min(keys, 4096))
    rc = max(1, min(rows, max_elems // max(1, bh * kc)))
    if rc == 1:
        kc = max(1, min(keys, max_elems // max(1, bh)))
    return rc, kc


def _rowwise_logits(k: torch.Tensor, q: torch.Tensor, max_elems: int) -> torch.Tensor:
    """k @ q^T, [..., keys, rows], as one inner-dim sum per (key, row) for a few rows.

    A BLAS product with a few query rows takes kernels that round keys by their position (a
    GEMV for one row, others for 2-3 rows); a sum over the contiguous head dim runs the same
    operations for every key, at about the memory passes of those kernels. Temporaries hold at
    most ``max_elems`` fp32 values."""
    keys, D, rows = k.shape[-2], k.shape[-1], q.shape[-2]
    step = max(1, max_elems // max(1, math.prod(k.shape[:-2]) * D))
    out = k.new_empty(*k.shape[:-1], rows)
    for j in range(0, keys, step):
        for r in range(rows):
            out[..., j : j + step, r] = (k[..., j : j + step, :] * q[..., r : r + 1, :]).sum(-1)
    return out


def score_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    first: torch.Tensor,
    *,
    prompt_len: int,
    window: bool,
    lse: torch.Tensor | None,
    scale: float,
    need_mass: bool,
    max_elems: int = MAX_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw column-sum scores fp32 [B, Hkv, P] and mask mass fp32 [B, Hkv] (None unless
    ``need_mass``), as ``triton_scores.score_keys``.

    Two passes over the keys (LSE, then probabilities) in [keys, rows] chunks; one pass when a
    chunk of rows can see every key at once and no ``lse`` is given.

    The logits are laid out key-major ([keys, rows]) so that a key's score is a reduction over
    the contiguous last dim: every key goes through the same sequence of floating-point
    operations, whatever its position, and bitwise-identical keys get bitwise-identical scores
    (a column sum over a [rows, keys] layout rounds the keys in vector lanes and the tail keys
    differently, which breaks "ties go to the lower position")."""
    B, Hq, M, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G, P = Hq // Hkv, prompt_len
    GM = G * M
    dev = q.device
    key_end = P if window else L
    n_keys = P + (L - P if need_mass and not window else 0)  # keys whose column sums we need
    rows = q.reshape(B, Hkv, GM, D)  # row r = h_local * M + m, as in the kernels
    first = first.to(device=dev, dtype=torch.long)
    key_ok = torch.arange(key_end, device=dev)[None, :] >= first[:, None]  # [B, key_end]
    qpos = P - M + torch.arange(GM, device=dev) % M  # window mode: prompt position of each row
    rc, kc = _chunks(B * Hkv, GM, key_end, max_elems)

    def logits(r0: int, k0: int, k1: int) -> torch.Tensor:  # fp32 [B, Hkv, k1 - k0, rc]
        # Row-major operands whatever the input strides: BLAS picks its kernel from the layout,
        # and a different kernel rounds differently (non-contiguous inputs must equal
        # contiguous ones bit for bit).
        kc_ = k[:, :, k0:k1].float()
        if kc_.stride(-1) != 1 or kc_.stride(-2) != kc_.shape[-1]:
            kc_ = kc_.contiguous()
        qc = rows[:, :, r0 : r0 + rc].float().contiguous()
        if GM < SKINNY_ROWS:
            s = _rowwise_logits(kc_, qc, max_elems) * scale
        else:
            s = torch.matmul(kc_, qc.transpose(-1, -2)) * scale
        return s.masked_fill(~key_ok[:, None, k0:k1, None], -math.inf)  # padding keys

    def undefined_to_nan(lse_c: torch.Tensor) -> torch.Tensor:
        # A row with a +inf logit has no softmax (inf / inf): NaN, so that it carries no mass,
        # like a row with a NaN logit (as in the reference and the other backends).
        return lse_c.masked_fill(lse_c == math.inf, math.nan)

    def probs(s: torch.Tensor, lse_c: torch.Tensor, r0: int) -> torch.Tensor:
        ok = lse_c > -math.inf  # rows without a single valid key (or a NaN LSE) carry no mass
        if window:  # padding window queries vote for nothing
            ok = ok & (qpos[None, r0 : r0 + rc] >= first[:, None])[:, None, :]
        p = torch.exp(s - torch.where(ok, lse_c, torch.zeros_like(lse_c))[..., None, :])
        return p.masked_fill(~ok[..., None, :], 0.0)  # [B, Hkv, keys, rc], contiguous

    cols = torch.zeros(B, Hkv, n_keys, dtype=torch.float32, device=dev)
    if lse is None and kc >= key_end:  # one pass: each row chunk sees all keys
        for r0 in range(0, GM, rc):
            s = logits(r0, 0, key_end)
            cols += probs(s[..., :n_keys, :], undefined_to_nan(torch.logsumexp(s, -2)), r0).sum(-1)
        return cols[..., :P].contiguous(), cols[..., P:].sum(-1) if need_mass else None

    if lse is None:
        lse_rows = torch.full((B, Hkv, GM), -math.inf, dtype=torch.float32, device=dev)
        for r0 in range(0, GM, rc):
            acc = lse_rows[:, :, r0 : r0 + rc]
            for k0 in range(0, key_end, kc):
                chunk = logits(r0, k0, min(k0 + kc, key_end))
                acc = torch.logaddexp(acc, torch.logsumexp(chunk, -2))
            lse_rows[:, :, r0 : r0 + rc] = undefined_to_nan(acc)
    else:
        lse_rows = lse.reshape(B, Hkv, GM).float()
    for k0 in range(0, n_keys, kc):
        k1 = min(k0 + kc, n_keys)
        for r0 in range(0, GM, rc):
            p = probs(logits(r0, k0, k1), lse_rows[:, :, r0 : r0 + rc], r0)
            cols[:, :, k0:k1] += p.sum(-1)
    return cols[..., :P].contiguous(), cols[..., P:].sum(-1) if need_mass else None


def pool_window(
    raw: torch.Tensor, first: torch.Tensor, window: int, pool: str, pool_kernel: int
) -> torch.Tensor:
    """SnapKV pooling over [0, P - W), +inf on the window, 0 on padding: fp32 [B, Hkv, P]."""
    B, Hkv, P = raw.shape
    pw = P - window
    out = torch.empty_like(raw)
    body = raw[..., :pw]
    if pool != "none" and pool_kernel > 1 and pw > 0:
        flat = body.reshape(B * Hkv, 1, pw)
        pad = pool_kernel // 2
        if pool == "max":
            body = F.max_pool1d(flat, pool_kernel, stride=1, padding=pad)
        else:
            body = F.avg_pool1d(flat, pool_kernel, stride=1, padding=pad, count_include_pad=True)
        body = body.reshape(B, Hkv, pw)
    out[..., :pw] = body
    out[..., pw:] = math.inf
    valid = torch.arange(P, device=raw.device)[None, :] >= first.to(raw.device).long()[:, None]
    return out.masked_fill(~valid[:, None, :], 0.0)


def topk_gather(
    scores: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budgets: torch.Tensor,
    first: torch.Tensor,
    cu_seqlens: torch.Tensor,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``triton_topk.topk_gather``, with sorts (O(B*Hkv*P) int64 memory)."""
    B, Hkv, P = scores.shape
    dev = k.device
    budgets = budgets.to(torch.long)
    eligible = torch.arange(P, device=dev)[None, :] >= first.to(dev).long()[:, None]  # [B, P]
    order = rank_within(scores, eligible[:, None, :].expand(B, Hkv, P))  # best first
    in_budget = torch.arange(P, device=dev)[None, None, :] < budgets[..., None]
    # Kept positions ascending, then P (sorts last) for everything dropped.
    kept = torch.where(in_budget, order, P).sort(-1).values.view(B * Hkv, P)
    # Ragged unpacking without a host read: n is host-known, output_size avoids the sync.
    seg = torch.repeat_interleave(
        torch.arange(B * Hkv, device=dev), budgets.view(-1), output_size=n
    )
    offs = torch.arange(n, device=dev) - cu_seqlens[:-1].long()[seg]
    pos = kept[seg, offs]
    b, g = seg // Hkv, seg % Hkv
    return k[b, g, pos], v[b, g, pos], pos.to(torch.int32)
