"""Kernel B: per-(batch, KV head) top-k by radix select, fused with the K/V gather, in Triton.

Ranking (same as ``reference.topk_gather``): higher score first, NaN below -inf, ties go to the
lower position; left-padding positions are never kept. Scores are mapped to an int32 key whose
signed order is the float order (flip the magnitude bits of negatives; -0.0 -> +0.0, NaN -> the
smallest int32, below -inf's key).

Each row [P] is cut into chunks of ``BLOCK`` positions, one program per (chunk, row), so long
prompts (P >= 64k) spread over the whole GPU instead of one program per head:

1. ``_radix_hist_kernel``, LEVEL = 0..3: the k-th largest key is found 8 bits at a time, most
   significant first (FlashInfer / PyTorch radix select). At level l every program re-derives the
   prefix of the first l digits from the per-chunk histograms already written (a 256-bin scan per
   level, cheap), and writes the histogram of digit l over its keys that match that prefix.
   Per-chunk histograms (plain stores, no atomics) keep the result deterministic and let step 2
   count, for any chunk, how many kept keys lie before it.
2. ``_gather_kernel``: resolves the threshold T and the number of ties at T still to keep
   (k_left); ``keys > T`` are all kept, ties are kept by position until k_left is used. The
   number of kept rows before the chunk comes from the histograms (a key > T diverges from T at
   some level with a larger digit), so every program knows where its first output row goes.
   Inside the chunk a prefix sum compacts the kept positions in ascending order and the K/V rows
   are copied straight into the ragged buffers (bit copies: the tensors are viewed as ints).

Rows whose budget is 0 keep nothing, rows whose budget covers every real position keep them
all, in both cases without any histogram work.

The "fused" compaction (``_topk_rows_kernel``) trades that parallelism for launches: one program
per row walks its whole row for each radix level with the histogram in registers (no histogram
buffer, no per-level fold, no scan), stops after a level whose threshold bin holds exactly the
keys still to keep, and writes the kept positions in a last pass; ``_gather_rows_kernel`` then
copies K and V. Two launches instead of about fifteen.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._dispatch import interpreting
from .triton_scores import _sm_count

# Which compaction ``topk_gather`` runs: "parallel" (``_topk_parallel``: per-row level folding,
# a flag/scan pass and a row-parallel K/V gather), "serial" (``_gather_kernel``: each program
# walks its chunk in sub-blocks) or "fused" (``_topk_rows_kernel``: one program per row, two
# launches in all). On an H200 at P=32k, budget 256, the parallel one was as fast or faster than
# the serial one at every LLaDA-8B / Dream-7B shape measured (0.513 vs 0.558 ms at LLaDA M=256
# with LSE; benchmarks/results/NVIDIA-H200), so it is the default; "fused" is not measured on a
# GPU yet (benchmarks/bench_select_and_gather.py times all three side by side).
COMPACTION = "parallel"


@triton.jit
def _ordered_key(s):
    """fp32 -> int32 whose signed order is the float order (NaN below -inf, -0.0 as +0.0)."""
    is_nan = s != s
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(is_nan, -2147483648, bits ^ ((bits >> 31) & 0x7FFFFFFF))


@triton.jit
def _radix_resolve(HIST, row, n_chunks, my_chunk, kb, LEVELS: tl.constexpr):
    """Walk the first LEVELS digits of the kb-th largest key of ``row``.

    HIST: int32 [rows, 4, n_chunks, 256], histogram of digit l of the keys of each chunk that
    match the first l digits. Returns (prefix, k_left, gt_before, eq_before): the key's top
    8*LEVELS bits (sign-extended, comparable with ``key >> (32 - 8*LEVELS)``), how many keys
    equal to that prefix are still to keep, and, for chunks before ``my_chunk``, how many keys
    beat the prefix (and, after 4 levels, equal it)."""
    bins = tl.arange(0, 256)
    prefix = kb * 0
    k_left = kb
    gt_before = kb * 0
    eq_before = kb * 0
    for level in tl.static_range(LEVELS):
        base = HIST + (row.to(tl.int64) * 4 + level) * n_chunks * 256
        tot = tl.zeros([256], tl.int32)
        before = tl.zeros([256], tl.int32)
        for c in range(n_chunks):
            h = tl.load(base + c * 256 + bins)
            tot += h
            before += tl.where(c < my_chunk, h, 0)
        # suffix[d] = keys (matching the prefix) whose digit is >= d; pick the largest digit
        # whose suffix still holds k_left keys.
        suffix = tl.sum(tot, 0) - tl.cumsum(tot, 0) + tot
        d = tl.max(tl.where(suffix >= k_left, bins, 0), 0)
        k_left -= tl.sum(tl.where(bins > d, tot, 0), 0)
        gt_before += tl.sum(tl.where(bins > d, before, 0), 0)
        if level == 0:  # the top digit was stored with its sign bit flipped: undo, sign-extend
            top = d ^ 0x80
            prefix = tl.where(top >= 128, top - 256, top)
        else:
            prefix = (prefix << 8) | d
        if level == 3:
            eq_before = tl.sum(tl.where(bins == d, before, 0), 0)
    return prefix, k_left, gt_before, eq_before


@triton.jit
def _radix_hist_kernel(
    SCORES, BUDGETS, FIRST, HIST, STATE, P, H_KV, n_chunks,
    LEVEL: tl.constexpr, BLOCK: tl.constexpr, RESOLVED: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    row = tl.program_id(1)
    kb = tl.load(BUDGETS + row)
    first = tl.load(FIRST + row // H_KV)
    if (kb > 0) & (kb < P - first):  # otherwise nothing to select: keep none / keep all
        pos = c * BLOCK + tl.arange(0, BLOCK)
        ok = (pos >= first) & (pos < P)
        key = _ordered_key(tl.load(SCORES + row.to(tl.int64) * P + pos, mask=ok, other=0.0))
        if LEVEL > 0:
            if RESOLVED:  # the prefix was folded once per row by _radix_level_kernel
                prefix = tl.load(STATE + row * 2)
            else:
                prefix, _k, _gt, _eq = _radix_resolve(HIST, row, n_chunks, 0, kb, LEVEL)
            ok = ok & ((key >> (32 - 8 * LEVEL)) == prefix)
        digit = (key >> (24 - 8 * LEVEL)) & 0xFF
        if LEVEL == 0:
            digit = digit ^ 0x80  # signed top byte -> unsigned bin order
        hist = tl.histogram(digit, 256, mask=ok)
    else:
        # Zeros, not nothing: the compaction kernels fold every row's histograms (and override
        # these rows' result), and a read of never-written memory is what initcheck reports.
        hist = tl.zeros([256], tl.int32)
    dst = HIST + ((row.to(tl.int64) * 4 + LEVEL) * n_chunks + c) * 256
    tl.store(dst + tl.arange(0, 256), hist)


@triton.jit
def _gather_kernel(
    SCORES, BUDGETS, FIRST, HIST, CU, K, V, K_OUT, V_OUT, POS_OUT,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    P, H_KV, n_chunks, HEAD_DIM,
    BLOCK: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    row = tl.program_id(1)
    b = row // H_KV
    g = row % H_KV
    kb = tl.load(BUDGETS + row)
    first = tl.load(FIRST + b)
    keep_all = (kb > 0) & (kb >= P - first)
    thresh, k_left, gt_before, eq_before = _radix_resolve(HIST, row, n_chunks, c, kb, 4)
    # Output row of this chunk's first kept position: kept rows of the chunks before it.
    before = tl.where(
        keep_all, tl.maximum(c * BLOCK - first, 0), gt_before + tl.minimum(eq_before, k_left)
    )
    dst = tl.load(CU + row).to(tl.int64) + before
    eq_seen = eq_before

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_base = K + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + g.to(tl.int64) * stride_vh
    for s0 in range(0, BLOCK, SUB):
        pos = c * BLOCK + s0 + tl.arange(0, SUB)
        ok = (pos >= first) & (pos < P)
        key = _ordered_key(tl.load(SCORES + row.to(tl.int64) * P + pos, mask=ok, other=0.0))
        is_eq = (ok & (key == thresh)).to(tl.int32)
        eq_rank = eq_seen + tl.cumsum(is_eq, 0) - is_eq  # ties before, in position order
        keep = ok & ((key > thresh) | ((is_eq > 0) & (eq_rank < k_left)))
        # Rows with budget 0 or keep-all rows have all-zero histograms (meaningless thresholds).
        keep = tl.where(keep_all, ok, tl.where(kb > 0, keep, pos < 0))
        keep_i = keep.to(tl.int32)
        out = dst + (tl.cumsum(keep_i, 0) - keep_i).to(tl.int64)  # ascending compaction
        tl.store(POS_OUT + out, pos, mask=keep)
        n_keep = tl.sum(keep_i, 0)
        if n_keep > 0:  # most sub-blocks keep nothing: skip the row copy entirely
            src = pos.to(tl.int64)
            m2 = keep[:, None] & d_ok[None, :]
            rows_k = tl.load(
                k_base + src[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=m2
            )
            tl.store(K_OUT + out[:, None] * HEAD_DIM + offs_d[None, :], rows_k, mask=m2)
            rows_v = tl.load(
                v_base + src[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=m2
            )
            tl.store(V_OUT + out[:, None] * HEAD_DIM + offs_d[None, :], rows_v, mask=m2)
        dst += n_keep
        eq_seen += tl.sum(is_eq, 0)


@triton.jit
def _radix_level_kernel(HIST, STATE, n_chunks, LEVEL: tl.constexpr):
    """Parallel compaction, once per row and level: fold level LEVEL's per-chunk histograms into
    STATE[row] = (prefix of the kb-th largest key, k_left), instead of every program re-deriving
    it from all the histograms."""
    row = tl.program_id(0)
    bins = tl.arange(0, 256)
    prefix = tl.load(STATE + row * 2)
    k_left = tl.load(STATE + row * 2 + 1)
    base = HIST + (row.to(tl.int64) * 4 + LEVEL) * n_chunks * 256
    tot = tl.zeros([256], tl.int32)
    for c in range(n_chunks):
        tot += tl.load(base + c * 256 + bins)
    suffix = tl.sum(tot, 0) - tl.cumsum(tot, 0) + tot
    d = tl.max(tl.where(suffix >= k_left, bins, 0), 0)
    k_left -= tl.sum(tl.where(bins > d, tot, 0), 0)
    if LEVEL == 0:  # the top digit was stored with its sign bit flipped: undo, sign-extend
        top = d ^ 0x80
        prefix = tl.where(top >= 128, top - 256, top)
    else:
        prefix = (prefix << 8) | d
    tl.store(STATE + row * 2, prefix)
    tl.store(STATE + row * 2 + 1, k_left)


@triton.jit
def _chunk_counts_kernel(SCORES, FIRST, STATE, COUNTS, P, H_KV, BLOCK: tl.constexpr):
    """Per (chunk, row): how many keys beat the threshold and how many equal it."""
    c = tl.program_id(0)
    row = tl.program_id(1)
    first = tl.load(FIRST + row // H_KV)
    thresh = tl.load(STATE + row * 2)
    pos = c * BLOCK + tl.arange(0, BLOCK)
    ok = (pos >= first) & (pos < P)
    key = _ordered_key(tl.load(SCORES + row.to(tl.int64) * P + pos, mask=ok, other=0.0))
    dst = COUNTS + (row.to(tl.int64) * tl.num_programs(0) + c) * 2
    tl.store(dst, tl.sum((ok & (key > thresh)).to(tl.int32), 0))
    tl.store(dst + 1, tl.sum((ok & (key == thresh)).to(tl.int32), 0))


@triton.jit
def _compact_kernel(
    SCORES, BUDGETS, FIRST, STATE, BASE, EQ_BEFORE, CU, POS_OUT, P, H_KV,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Per (chunk, row), the whole chunk at once: keep flags, tie ranks and output slots by two
    prefix sums; writes the kept positions (ascending) to POS_OUT. No K/V traffic here."""
    c = tl.program_id(0)
    row = tl.program_id(1)
    kb = tl.load(BUDGETS + row)
    first = tl.load(FIRST + row // H_KV)
    keep_all = (kb > 0) & (kb >= P - first)
    thresh = tl.load(STATE + row * 2)
    k_left = tl.load(STATE + row * 2 + 1)
    slot = row.to(tl.int64) * tl.num_programs(0) + c
    pos = c * BLOCK + tl.arange(0, BLOCK)
    ok = (pos >= first) & (pos < P)
    key = _ordered_key(tl.load(SCORES + row.to(tl.int64) * P + pos, mask=ok, other=0.0))
    is_eq = (ok & (key == thresh)).to(tl.int32)
    eq_rank = tl.load(EQ_BEFORE + slot) + tl.cumsum(is_eq, 0) - is_eq  # ties before, in order
    keep = ok & ((key > thresh) | ((is_eq > 0) & (eq_rank < k_left)))
    # Rows with budget 0 or keep-all rows have all-zero histograms (meaningless thresholds).
    keep = tl.where(keep_all, ok, tl.where(kb > 0, keep, pos < 0))
    keep_i = keep.to(tl.int32)
    before = tl.where(keep_all, tl.maximum(c * BLOCK - first, 0), tl.load(BASE + slot))
    out = tl.load(CU + row).to(tl.int64) + before + (tl.cumsum(keep_i, 0) - keep_i).to(tl.int64)
    tl.store(POS_OUT + out, pos, mask=keep)


@triton.jit
def _gather_rows_kernel(
    POS, CU, K, V, K_OUT, V_OUT,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    N, NSEG, SEARCH_ITERS, H_KV, HEAD_DIM,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Row-parallel gather over the N kept rows: output row i copies K/V row POS[i] of its
    segment (found by binary search in CU: the largest s with CU[s] <= i)."""
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = i < N
    lo = tl.zeros([ROWS], tl.int32)
    hi = lo + NSEG
    for _ in range(SEARCH_ITERS):
        mid = (lo + hi) // 2
        right = tl.load(CU + mid, mask=ok, other=0) <= i
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    b = (lo // H_KV).to(tl.int64)
    g = (lo % H_KV).to(tl.int64)
    pos = tl.load(POS + i, mask=ok, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m2 = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    src_k = K + b * stride_kb + g * stride_kh + pos * stride_kl
    rows_k = tl.load(src_k[:, None] + offs_d[None, :] * stride_kd, mask=m2)
    tl.store(K_OUT + i.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], rows_k, mask=m2)
    src_v = V + b * stride_vb + g * stride_vh + pos * stride_vl
    rows_v = tl.load(src_v[:, None] + offs_d[None, :] * stride_vd, mask=m2)
    tl.store(V_OUT + i.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], rows_v, mask=m2)


@triton.jit
def _topk_rows_kernel(SCORES, BUDGETS, FIRST, CU, POS_OUT, P, H_KV, BLOCK: tl.constexpr):
    """One program per row: radix select of the kb-th largest key with the per-level histogram
    in registers, then the kept positions (ascending) at CU[row]. No K/V traffic here."""
    row = tl.program_id(0)
    kb = tl.load(BUDGETS + row)
    first = tl.load(FIRST + row // H_KV)
    base = SCORES + row.to(tl.int64) * P
    dst = tl.load(CU + row).to(tl.int64)
    start0 = (first // BLOCK) * BLOCK  # left padding: skip the tiles before the first token
    bins = tl.arange(0, 256)
    prefix = kb * 0
    k_left = kb
    shift = kb * 0  # the threshold compares key >> shift with prefix
    done = ((kb <= 0) | (kb >= P - first)).to(tl.int32)  # keep none / all: no histogram work
    for level in tl.static_range(4):
        if done == 0:
            hist = tl.zeros([256], tl.int32)
            for start in range(start0, P, BLOCK):
                pos = start + tl.arange(0, BLOCK)
                ok = (pos >= first) & (pos < P)
                key = _ordered_key(tl.load(base + pos, mask=ok, other=0.0))
                if level > 0:
                    ok = ok & ((key >> (32 - 8 * level)) == prefix)
                digit = (key >> (24 - 8 * level)) & 0xFF
                if level == 0:
                    digit = digit ^ 0x80  # signed top byte -> unsigned bin order
                hist += tl.histogram(digit, 256, mask=ok)
            # Largest digit whose suffix (keys >= it) still holds k_left keys.
            suffix = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
            d = tl.max(tl.where(suffix >= k_left, bins, 0), 0)
            k_left -= tl.sum(tl.where(bins > d, hist, 0), 0)
            if level == 0:  # the top digit was stored with its sign bit flipped: sign-extend
                top = d ^ 0x80
                prefix = tl.where(top >= 128, top - 256, top)
            else:
                prefix = (prefix << 8) | d
            shift = kb * 0 + (24 - 8 * level)
            # Every key of the threshold bin is kept: the lower digits cannot change the set.
            done = (tl.sum(tl.where(bins == d, hist, 0), 0) == k_left).to(tl.int32)
    keep_all = (kb > 0) & (kb >= P - first)
    eq_seen = kb * 0
    for start in range(start0, P, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        ok = (pos >= first) & (pos < P)
        key = _ordered_key(tl.load(base + pos, mask=ok, other=0.0)) >> shift
        is_eq = (ok & (key == prefix)).to(tl.int32)
        eq_rank = eq_seen + tl.cumsum(is_eq, 0) - is_eq  # ties before, in position order
        keep = ok & ((key > prefix) | ((is_eq > 0) & (eq_rank < k_left)))
        keep = tl.where(keep_all, ok, tl.where(kb > 0, keep, pos < 0))
        keep_i = keep.to(tl.int32)
        out = dst + (tl.cumsum(keep_i, 0) - keep_i).to(tl.int64)
        tl.store(POS_OUT + out, pos, mask=keep)
        dst += tl.sum(keep_i, 0)
        eq_seen += tl.sum(is_eq, 0)


# ----------------------------------------------------------------------------- launcher


def _as_bits(x: torch.Tensor) -> torch.Tensor:
    """Same-size integer view: the gather is a bit copy (the interpreter mangles bf16 values)."""
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _chunk_size(P: int, rows: int, device: torch.device) -> int:
    """Positions per program: ~2 waves of programs over the GPU, 1k..8k positions each."""
    if device.type != "cuda":
        return 64
    per_row = triton.cdiv(2 * _sm_count(device.index or 0), max(rows, 1))
    return int(min(8192, max(1024, triton.next_power_of_2(triton.cdiv(P, per_row)))))


def _row_block(P: int, device: torch.device) -> int:
    """Positions per tile of the one-program-per-row compaction: large tiles keep many loads in
    flight (a few programs walk whole rows), bounded by 8k keys of registers."""
    if device.type != "cuda":
        return 64
    return int(min(8192, max(128, triton.next_power_of_2(P))))


def topk_gather(
    scores: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budgets: torch.Tensor,
    first: torch.Tensor,
    cu_seqlens: torch.Tensor,
    n: int,
    *,
    chunk: int | None = None,
    compaction: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``budgets[b, g]`` best real prompt positions of every row and gather them.

    Args:
        scores: fp32 [B, Hkv, P]; k, v: [B, Hkv, L >= P, D] (any strides); budgets: int32
            [B, Hkv] in [0, P - first[b]]; first: int32 [B]; cu_seqlens: int32 [B*Hkv + 1]
            (device cumsum of budgets); n: host-known total, cu_seqlens[-1].
        chunk: positions per program, or per tile of the "fused" compaction (power of 2;
            default a heuristic; tests force it).
        compaction: "serial", "parallel" or "fused" (default ``COMPACTION``).
    Returns:
        k_out, v_out [n, D] (k's dtype), positions int32 [n], ascending inside every segment.
    """
    B, Hkv, P = scores.shape
    D = k.shape[-1]
    rows = B * Hkv
    k_out = k.new_empty(n, D)
    v_out = v.new_empty(n, D)
    positions = torch.empty(n, dtype=torch.int32, device=k.device)
    if n == 0:
        return k_out, v_out, positions
    scores = scores.contiguous()
    budgets = budgets.reshape(-1).to(torch.int32).contiguous()
    kb, vb = _as_bits(k), _as_bits(v)
    if (compaction or COMPACTION) == "fused":
        block = chunk or _row_block(P, k.device)
        _topk_rows_kernel[(rows,)](
            scores, budgets, first, cu_seqlens, positions, P, Hkv, BLOCK=block,
            num_warps=8 if block >= 4096 else 4,
        )  # fmt: skip
        _gather_rows(positions, cu_seqlens, kb, vb, k_out, v_out, rows, Hkv, n)
        return k_out, v_out, positions
    chunk = chunk or _chunk_size(P, rows, k.device)
    n_chunks = triton.cdiv(P, chunk)
    # Every (row, level, chunk) histogram is written by _radix_hist_kernel: no memset.
    hist = torch.empty(rows, 4, n_chunks, 256, dtype=torch.int32, device=k.device)
    grid = (n_chunks, rows)
    warps = 4 if chunk <= 2048 else 8
    if (compaction or COMPACTION) == "parallel":
        _topk_parallel(scores, budgets, first, hist, cu_seqlens, kb, vb, k_out, v_out,
                       positions, P, Hkv, n_chunks, chunk, warps, n)  # fmt: skip
        return k_out, v_out, positions
    for level in range(4):
        _radix_hist_kernel[grid](
            scores, budgets, first, hist, hist, P, Hkv, n_chunks,
            LEVEL=level, BLOCK=chunk, RESOLVED=False, num_warps=warps,
        )  # fmt: skip
    _gather_kernel[grid](
        scores, budgets, first, hist, cu_seqlens, kb, vb, _as_bits(k_out), _as_bits(v_out),
        positions, *kb.stride(), *vb.stride(), P, Hkv, n_chunks, D,
        BLOCK=chunk, SUB=min(chunk, 32 if interpreting() else 128),
        BLOCK_D=triton.next_power_of_2(D), num_warps=4,
    )  # fmt: skip
    return k_out, v_out, positions


def _topk_parallel(scores, budgets, first, hist, cu, kb, vb, k_out, v_out, positions, P, Hkv,
                   n_chunks, chunk, warps, n) -> None:  # fmt: skip
    """The parallel compaction (see ``COMPACTION``): radix levels folded once per row, per-chunk
    counts and one scan for every chunk's first output slot, a flag/prefix-sum pass writing the
    kept positions, then one program per ROWS output rows copying K and V."""
    rows = budgets.numel()
    grid = (n_chunks, rows)
    state = torch.zeros(rows, 2, dtype=torch.int32, device=scores.device)
    state[:, 1] = budgets
    for level in range(4):
        _radix_hist_kernel[grid](
            scores, budgets, first, hist, state, P, Hkv, n_chunks,
            LEVEL=level, BLOCK=chunk, RESOLVED=True, num_warps=warps,
        )  # fmt: skip
        _radix_level_kernel[(rows,)](hist, state, n_chunks, LEVEL=level)
    counts = torch.empty(rows, n_chunks, 2, dtype=torch.int32, device=scores.device)
    _chunk_counts_kernel[grid](scores, first, state, counts, P, Hkv, BLOCK=chunk, num_warps=warps)
    # Exclusive scans over chunks: kept rows before each chunk = keys above the threshold plus
    # the ties still within k_left (ties go to the lower position).
    excl = counts.cumsum(1, dtype=torch.int32) - counts
    eq_before = excl[..., 1].contiguous()
    base = (excl[..., 0] + torch.minimum(eq_before, state[:, 1:2])).contiguous()
    _compact_kernel[grid](
        scores, budgets, first, state, base, eq_before, cu, positions, P, Hkv,
        BLOCK=chunk, num_warps=warps,
    )  # fmt: skip
    _gather_rows(positions, cu, kb, vb, k_out, v_out, rows, Hkv, n)


def _gather_rows(positions, cu, kb, vb, k_out, v_out, rows, Hkv, n) -> None:
    """Copy the K/V rows of the n kept positions (bit views of k, v) into the ragged buffers."""
    block_rows = 16 if interpreting() else 64
    D = kb.shape[-1]
    _gather_rows_kernel[(triton.cdiv(n, block_rows),)](
        positions, cu, kb, vb, _as_bits(k_out), _as_bits(v_out), *kb.stride(), *vb.stride(),
        n, rows, max(1, math.ceil(math.log2(rows + 1))), Hkv, D,
        ROWS=block_rows, BLOCK_D=triton.next_power_of_2(D), num_warps=4,
    )  # fmt: skip
