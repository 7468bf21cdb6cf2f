"""Triton ragged attention: [kept prompt segment ‖ dense tail] per KV head, one online softmax.

Layout (see DESIGN.md): segment ``s = b * Hkv + g`` holds rows ``cu_seqlens[s]:cu_seqlens[s+1]``
of the ragged ``k``/``v`` [N, D]; the tail is ``k_tail[b, g]`` [Lt, D]. Key index ``j`` of a
segment runs over the concatenation ``[0, n_seg) ‖ [n_seg, n_seg + Lt)``, which the kernel walks
in two loops (segment rows, then tail rows) that share one running (max, sum, acc) state: no
concatenation, padding or per-step copy of the cache.

GQA packing: the G query heads of KV head g are G * Lq independent rows (row r = head-in-group *
Lq + query) that attend to the same keys, so a program owns BLOCK_M of those rows and every K/V
tile it loads serves all of them: each K/V byte is read once per (KV head, row tile), not once per
query head.

Grid: (cdiv(G * Lq, BLOCK_M) * B * Hkv, num_splits), row tiles fastest, so the programs that
read the same segment run together and share it through L2.

Split-K (flash-decoding): with few row tiles per KV head and long segments the grid cannot fill
the GPU and the longest segment is the critical path. Keys are then cut into fixed chunks of CHUNK
keys. The default planner ("worklist") builds, on the device and from the real lengths, one work
item per (segment, chunk): segment s owns items ITEM_START[s]:ITEM_START[s+1], at least one, so a
short head costs one program and a long one many, whatever ``max_seqlen`` says. The grid is sized
from the host bound sum_s n_s // CHUNK + S (no sync); programs past the real item count load
nothing and store nothing. A one-item segment writes its output directly; the items of a longer
one write normalised partial outputs and their log2-sum-exp, which a small combine kernel merges.
The first planner ("grid", kept selectable through ``PLANNER`` for benchmarks) put the splits on
a second grid axis sized from ``max_seqlen``: with a loose bound most of its programs were empty.

Batch invariance (what lets a serving engine run one varlen call for all its requests): a query
row's bits depend only on its own request. Every launch of a dtype and head dim uses the same
row tile (``_block_m``, never the number of rows), the same autotuned config (the tuning key
leaves out the form, split-K and LSE flags) and the same CHUNK (``SPLIT_CHUNK``, a constant):
a segment's keys are walked in the same tiles and cut into the same work items whatever the
other requests, and a row's arithmetic does not depend on its place in the row tile. So a
request gets the same output in the dense form alone as in any varlen batch. (The "grid" planner
and the tests' ``num_splits`` derive the chunk from the batch's longest segment: not invariant.)

Non-finite inputs follow the reference (a softmax of IEEE logits): nothing is subtracted while
the running maximum is not finite, a NaN logit's probability keeps the running sum NaN, and the
split-K merge keeps a NaN LSE, so a NaN or +inf logit makes the row NaN (LSE NaN / +inf), logits
all -inf give NaN (LSE -inf), and an inf value reaches the output through 0 * inf = NaN; a row
without any key is 0 (LSE -inf).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._dispatch import interpreting

_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2
_MAX_HEAD_DIM = 256
# Keys per split-K work item on a GPU: a segment (kept keys + tail) longer than this is cut into
# work items of this many keys, whatever the batch (batch invariance: see above). A multiple of
# every autotuned BLOCK_N, so items start on a tile boundary. Each item of a split segment costs
# a partial output (block_m fp32 rows, written once, read once by the combine): about 128 / C of
# the item's bf16 K/V traffic, 6% at 2048, against up to C / n more programs for the short grids
# of a few long requests. Not yet swept on a GPU (benchmarks/bench_ragged_attention.py).
SPLIT_CHUNK = 2048


# Kernels are laid out by hand, tutorial style (arguments grouped by meaning).
# fmt: off
@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, key_mask, d_mask, qk_scale,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One online-softmax update of ``BLOCK_M`` rows with one tile of ``BLOCK_N`` keys.

    While the maximum is not finite (no logit above -inf yet, or a +inf one; NaN under the
    interpreter, whose ``tl.max`` keeps it: an undefined row, replaced at the end) 0 is
    subtracted instead, so that ``exp2`` never sees ``-inf - -inf``; the probabilities of -inf
    logits are then 0 and still multiply their values (0 * inf = NaN, as in the reference). A
    NaN logit (which the GPU's ``tl.max`` drops) makes its probability and so ``l_i`` NaN for
    good: ``l_i`` carries it to the end (no NaN-keeping maximum needed).
    """
    kv_mask = key_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if UPCAST:  # only under the interpreter, whose bf16 dot and fp32->bf16 cast are wrong
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 domain, fp32
    qk = tl.where(key_mask[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_sub = tl.where(tl.abs(m_new) < float("inf"), m_new, 0.0)  # NaN compares false: 0
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(qk - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _finish_rows(acc, m_i, l_i, no_key, kept_max):
    """Normalised output and log2-sum-exp of rows whose online state is (acc, m_i, l_i).

    A finite maximum: acc / l (l >= 1, the maximum's own term, or NaN after a NaN logit) and
    m + log2(l). Otherwise the LSE is NaN after a NaN logit (l NaN), else the maximum (+inf, or
    -inf: every logit -inf), and the output NaN, except where the maximum equals ``kept_max``:
    -inf for a partial output of split-K, which then stays acc (0, or NaN from 0 * inf) and gets
    weight 0 in the combine (unless its LSE is NaN); NaN (equal to nothing) for a final output.
    ``no_key`` rows (no key at all: m -inf, l and acc 0): 0 and -inf.
    """
    finite = tl.abs(m_i) < float("inf")
    o = acc / tl.where(finite, l_i, 1.0)[:, None]
    keep = finite | (m_i == kept_max) | no_key
    o = tl.where(keep[:, None], o, float("nan"))
    lse2 = tl.where(finite, m_i + tl.log2(tl.where(finite, l_i, 1.0)),
                    tl.where(l_i == l_i, m_i, l_i))
    return o, lse2


@triton.jit
def _ragged_attn_fwd(
    Q, K, V, KT, VT, CU,  # q [B, Hq, Lq, D]; k, v [N, D]; k/v_tail [B, Hkv, Lt, D]; cu int32
    STARTS,  # first row of every segment in k / v: seg_starts (int64), or CU itself
    CU_Q, CU_T, T_STARTS,  # varlen: int32 [B + 1] query / tail offsets, first tail rows
    Out, Lse, OPart, LsePart,  # out / lse rows (see o_sb); partials (see the launcher)
    ITEM_START, NSEG, SEARCH_ITERS,  # work list: int32 [NSEG + 1] first item of each segment
    qk_scale, Lq, Lt, HKV, G, ROWS, ROW_TILES, R_TOTAL, D, CHUNK, NUM_SPLITS,
    s_qb, s_qh, s_qm, s_qd,
    s_kn, s_kd, s_vn, s_vd,
    s_ktb, s_kth, s_ktm, s_ktd,
    s_vtb, s_vth, s_vtm, s_vtd,
    o_sb, o_sh, o_sm,  # output row of (b, head, query row) = b * o_sb + head * o_sh + row * o_sm
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, WORKLIST: tl.constexpr, STORE_LSE: tl.constexpr,
    VARLEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Axis 0 folds (segment or work item, row tile) with row tiles fastest (no 65535 limit).
    pid = tl.program_id(0)
    pid_m = pid % ROW_TILES
    split = tl.program_id(1)
    live_rows = ROWS
    if WORKLIST:
        # Work item -> segment by binary search over ITEM_START (strictly increasing: every
        # segment owns >= 1 item). Items past the real total (the grid is sized from a host bound)
        # get an empty key range and no live row: no load, no store.
        item = pid // ROW_TILES
        seg_lo = pid * 0
        seg_hi = seg_lo + NSEG
        for _ in range(SEARCH_ITERS):
            mid = (seg_lo + seg_hi) // 2
            right = tl.load(ITEM_START + mid) <= item
            seg_lo = tl.where(right, mid, seg_lo)
            seg_hi = tl.where(right, seg_hi, mid)
        seg = seg_lo
        first_item = tl.load(ITEM_START + seg)
        n_items = tl.load(ITEM_START + seg + 1) - first_item
        live_rows = tl.where(item < tl.load(ITEM_START + NSEG), ROWS, 0)
    else:
        seg = pid // ROW_TILES
    b = (seg // HKV).to(tl.int64)
    g = (seg % HKV).to(tl.int64)
    if VARLEN:
        # Request b: queries q_first .. q_first + n_q of q [Nq, Hq, D], tail rows t_first ..
        # t_first + lt of k_tail [Nt, Hkv, D]; G * n_q live rows (row tiles past them are idle).
        q_first = tl.load(CU_Q + b).to(tl.int64)
        n_q = tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)
        live_rows = tl.minimum(live_rows, G * n_q)
        t_first = tl.load(T_STARTS + b).to(tl.int64)
        lt = tl.load(CU_T + b + 1) - tl.load(CU_T + b)
    else:
        q_first = b * 0
        t_first = b * 0
        lt = Lt

    seg_start = tl.load(STARTS + seg).to(tl.int64)
    n_seg = tl.load(CU + seg + 1) - tl.load(CU + seg)  # int32: one segment is < 2^31 rows
    n_tot = n_seg + lt
    has_rows = pid_m * BLOCK_M < live_rows  # else: no key to read, nothing to store
    if WORKLIST:
        lo = tl.where(has_rows, (item - first_item) * CHUNK, n_tot)
        hi = tl.minimum(lo + CHUNK, n_tot)
    elif SPLIT:
        lo = split * CHUNK
        hi = tl.where(split == NUM_SPLITS - 1, n_tot, tl.minimum(lo + CHUNK, n_tot))
    else:
        lo = 0
        hi = tl.where(has_rows, n_tot, 0)

    # GQA-packed rows of KV head g. Dense: row r is query r % Lq of head g * G + r // Lq.
    # Varlen: row r is query r // G of head g * G + r % G (a query's G heads are adjacent in q).
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < live_rows
    if VARLEN:
        head = g * G + (rows % G).to(tl.int64)
        q_row = q_first + (rows // G).to(tl.int64)
    else:
        head = g * G + (rows // Lq).to(tl.int64)
        q_row = (rows % Lq).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_ptrs = (Q + b * s_qb + head[:, None] * s_qh + q_row[:, None] * s_qm
              + offs_d[None, :] * s_qd)
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys [lo, min(hi, n_seg)) come from the ragged segment ...
    seg_hi = tl.minimum(hi, n_seg)
    for start in range(lo, seg_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_rows = seg_start + offs_n.to(tl.int64)
        k_ptrs = K + key_rows[:, None] * s_kn + offs_d[None, :] * s_kd
        v_ptrs = V + key_rows[:, None] * s_vn + offs_d[None, :] * s_vd
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_n < seg_hi, d_mask,
                                     qk_scale, UPCAST, PRECISION)
    # ... and keys [max(lo, n_seg), hi) from the dense tail, in the same online softmax.
    t_lo = tl.maximum(lo, n_seg) - n_seg
    t_hi = hi - n_seg
    kt_base = KT + b * s_ktb + g * s_kth + t_first * s_ktm
    vt_base = VT + b * s_vtb + g * s_vth + t_first * s_vtm
    for start in range(t_lo, t_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_ptrs = kt_base + offs_n.to(tl.int64)[:, None] * s_ktm + offs_d[None, :] * s_ktd
        v_ptrs = vt_base + offs_n.to(tl.int64)[:, None] * s_vtm + offs_d[None, :] * s_vtd
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_n < t_hi, d_mask,
                                     qk_scale, UPCAST, PRECISION)

    # The row's keys: [lo, hi) (its work item's, under split-K). Comparisons against a scalar
    # threshold, not `mask & scalar_bool` (the interpreter turns that into int32).
    no_key = rows >= tl.where(lo < hi, BLOCK_M * ROW_TILES, 0)
    out_rows = b * o_sb + head * o_sh + q_row * o_sm
    io_mask = row_mask[:, None] & d_mask[None, :]
    if WORKLIST:
        # A segment with one item writes its output directly; others write partials (row
        # r of item w at w * ROWS + r) for the combine kernel.
        direct = rows < tl.where(n_items == 1, live_rows, 0)
        partial = rows < tl.where(n_items == 1, 0, live_rows)
        o, lse2 = _finish_rows(
            acc, m_i, l_i, no_key, tl.where(n_items > 1, float("-inf"), float("nan"))
        )
        tl.store(Out + out_rows[:, None] * D + offs_d[None, :], o.to(Out.dtype.element_ty),
                 mask=direct[:, None] & d_mask[None, :])
        if STORE_LSE:
            tl.store(Lse + out_rows, lse2 * 0.6931471805599453, mask=direct)
        part = item.to(tl.int64) * ROWS + rows
        tl.store(OPart + part[:, None] * D + offs_d[None, :], o,
                 mask=partial[:, None] & d_mask[None, :])
        tl.store(LsePart + part, lse2, mask=partial)
    elif SPLIT:
        o, lse2 = _finish_rows(acc, m_i, l_i, no_key, float("-inf"))
        part = split.to(tl.int64) * R_TOTAL + out_rows
        # An empty chunk stores nothing (the combine kernel never reads it).
        live = rows < tl.where(lo < n_tot, ROWS, 0)
        tl.store(OPart + part[:, None] * D + offs_d[None, :], o, mask=live[:, None] & d_mask[None, :])
        tl.store(LsePart + part, lse2, mask=live)
    else:
        o, lse2 = _finish_rows(acc, m_i, l_i, no_key, float("nan"))
        tl.store(Out + out_rows[:, None] * D + offs_d[None, :], o.to(Out.dtype.element_ty),
                 mask=io_mask)
        if STORE_LSE:
            tl.store(Lse + out_rows, lse2 * 0.6931471805599453, mask=row_mask)


@triton.jit
def _merge_partials(OPart, LsePart, base, stride, count, offs_d, d_mask, D,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Log-sum-exp merge of ``count`` partial outputs per row: partial j of a row sits at
    ``base + j * stride``. Returns (out [BLOCK_R, BLOCK_D] fp32, natural-log lse): 0 and -inf
    where the row has no partial (no key); where the partials' largest LSE is not finite (a NaN
    or +inf logit, or every logit -inf) NaN and that LSE, as the unsplit kernel gives."""
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for j in range(0, tl.max(count, 0)):
        lse_j = tl.load(LsePart + base + j * stride, mask=j < count, other=float("-inf"))
        m = _max_keep_nan(m, lse_j)
    finite = tl.abs(m) < float("inf")
    m_safe = tl.where(finite, m, 0.0)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    for j in range(0, tl.max(count, 0)):
        live = j < count
        part = base + j * stride
        w = tl.exp2(tl.load(LsePart + part, mask=live, other=float("-inf")) - m_safe)
        o_j = tl.load(OPart + part[:, None] * D + offs_d[None, :],
                      mask=live[:, None] & d_mask[None, :], other=0.0)
        acc += w[:, None] * o_j  # a partial of LSE -inf: weight 0 (its NaN from 0 * inf stays)
        l += w
    has_key = count > 0
    l_safe = tl.where(finite, l, 1.0)
    out = tl.where(finite[:, None], acc / l_safe[:, None], float("nan"))
    out = tl.where(has_key[:, None], out, 0.0)
    lse = tl.where(finite, m_safe + tl.log2(l_safe), m) * 0.6931471805599453
    return out, lse


@triton.jit
def _ragged_attn_combine(
    OPart, LsePart, CU, Out, Lse,
    R_TOTAL, ROWS, Lt, D, CHUNK, NUM_SPLITS,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """Grid planner: merge the non-empty split-K chunks of BLOCK_R output rows (partial j of
    row r at j * R_TOTAL + r)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R_TOTAL
    seg = rows // ROWS
    n_tot = tl.load(CU + seg + 1, mask=row_mask, other=0) - tl.load(CU + seg, mask=row_mask, other=0)
    n_valid = tl.minimum((n_tot + Lt + CHUNK - 1) // CHUNK, NUM_SPLITS)
    n_valid = tl.where(row_mask, n_valid, 0)
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    o, lse = _merge_partials(OPart, LsePart, rows64, R_TOTAL, n_valid, offs_d, d_mask, D,
                             BLOCK_R, BLOCK_D)
    tl.store(Out + rows64[:, None] * D + offs_d[None, :], o.to(Out.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])
    if STORE_LSE:
        tl.store(Lse + rows64, lse, mask=row_mask)


@triton.jit
def _ragged_attn_combine_items(
    OPart, LsePart, ITEM_START, CU_Q, Out, Lse,
    R_TOTAL, ROWS, HKV, G, D, o_sh, o_sm,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, STORE_LSE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Work-list combine over the packed rows (row r of segment s at s * ROWS + r): rows of
    segments with more than one item merge their items' partials (item w, row r at w * ROWS +
    r); rows of one-item segments were written directly. Dense: packed row == output row.
    Varlen: row r of segment (b, g) is query cu_q[b] + r // G of head g * G + r % G, live while
    r < G * n_q (ROWS is G * max_seqlen_q)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R_TOTAL
    seg = rows // ROWS
    r = rows % ROWS
    if VARLEN:
        b = seg // HKV
        q_first = tl.load(CU_Q + b, mask=row_mask, other=0)
        n_q = tl.load(CU_Q + b + 1, mask=row_mask, other=0) - q_first
        row_mask = row_mask & (r < G * n_q)
        head = (seg % HKV) * G + r % G
        out_rows = head.to(tl.int64) * o_sh + (q_first + r // G).to(tl.int64) * o_sm
    else:
        out_rows = rows.to(tl.int64)
    first = tl.load(ITEM_START + seg, mask=row_mask, other=0)
    count = tl.load(ITEM_START + seg + 1, mask=row_mask, other=0) - first
    count = tl.where(row_mask & (count > 1), count, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    base = first.to(tl.int64) * ROWS + r.to(tl.int64)
    o, lse = _merge_partials(OPart, LsePart, base, ROWS, count, offs_d, d_mask, D,
                             BLOCK_R, BLOCK_D)
    merged = count > 1
    tl.store(Out + out_rows[:, None] * D + offs_d[None, :], o.to(Out.dtype.element_ty),
             mask=merged[:, None] & d_mask[None, :])
    if STORE_LSE:
        tl.store(Lse + out_rows, lse, mask=merged)


# fmt: on


# Autotuned on GPU over BLOCK_N, warps and stages (BLOCK_M is ``_block_m``'s, a host choice);
# the interpreter runs one fixed config. Every config compiles without register spills at the
# row tiles `_block_m` picks (benchmarks/ptx_report.py; (128 keys, 4 warps) spilled up to 244 B
# at BLOCK_M 64 and D 128, so it is gone).
_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 2), (64, 4, 4)]
]
# Batch invariance needs one config per (row tile, head dim, dtype) for every variant (dense or
# varlen, split-K or not, LSE or not): BLOCK_N sets the key tiles of the online softmax and
# num_warps the reduction trees. The autotuner's cache key adds the dtype of every tensor
# argument, which differs between variants (an LSE buffer or its stand-in, int32 or int64 first
# rows), so it would tune each variant on its own: ``_launch_fwd`` keeps the config tuned first.
_TUNE_KEY = ["BLOCK_M", "BLOCK_D", "UPCAST", "PRECISION"]


def _capability() -> tuple[int, int]:
    """The current GPU's compute capability (``benchmarks/ptx_report.py`` sets it per target)."""
    return torch.cuda.get_device_capability()


def _spill_free_configs(configs, named_args, **kwargs):
    """Before sm_90 (A100 sm_80, RTX 4090 sm_89: mma.sync instead of wgmma) most configs of the
    64 x 128 and 128 x 128 row tiles spill (``benchmarks/ptx_report.py --archs 80 89``: 4 to 104
    bytes); there the one config that compiled spill-free in every variant is kept: 128 keys,
    8 warps, 2 stages for 64 rows; 64 keys, 8 warps, 3 stages for 128 rows (128 x 64 tiles:
    156 / 180 registers on sm_80 / sm_89, the others spill; the 128 x 128 tile is not taken
    before sm_90)."""
    if _capability()[0] >= 9 or kwargs.get("BLOCK_M", 0) * kwargs.get("BLOCK_D", 0) < 64 * 128:
        return configs
    wanted = (128, 8, 2) if kwargs["BLOCK_M"] < 128 else (64, 8, 3)
    keep = [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == wanted]
    return keep or configs[:1]


_PRUNE = {"early_config_prune": _spill_free_configs}
_fwd_tuned = triton.autotune(_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)(_ragged_attn_fwd)
# 128-row tiles at D = 128 (``ROW_TILE``): two warpgroups share each K/V tile, as flash
# attention's forward does on Hopper; only 8-warp configs over 64 keys (a 4-warp 128 x 128 fp32
# accumulator alone is 128 registers per thread; 128 keys spill).
_WIDE_CONFIGS = [
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=s) for s in (2, 3)
]  # 128 keys spill on sm_90a too
_fwd_tuned_wide = triton.autotune(_WIDE_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)(
    _ragged_attn_fwd
)
# Row tile of the forward: None = ``_block_m``'s choice (64 rows at D = 128); 128 forces the wide
# tile for fp16 / bf16 at D <= 128, whatever the number of packed rows (batch invariance), on
# sm_90 and later with the work-list planner (otherwise ``_block_m``'s tile: see
# ``_Launch.run``). Not measured on a GPU yet: benchmarks/bench_ragged_attention.py times both
# ("ragged_m128"), aimed at full-length GQA (G = 7, 32k keys), whose 64-row tiles reach 49% of
# dense flash on an H200.
ROW_TILE: int | None = None
# How split-K is planned: "worklist" (default) cuts every segment into CHUNK-key work items from
# the real lengths on the device; "grid" is the first version (a [num_splits] grid axis sized
# from max_seqlen). Kept selectable so that benchmarks can compare both.
PLANNER = "worklist"
_INTERPRET_BLOCK_N = 16

# (device, wide, BLOCK_M, BLOCK_D, UPCAST, PRECISION) -> the config every variant launches with.
_CHOSEN: dict[tuple, triton.Config] = {}


def _launch_fwd(tuned, grid, args, meta, device: torch.device) -> None:
    """Launch the forward with the config ``tuned`` chose for the first launch of this row tile,
    head dim and dtype on ``device``, whatever the variant (batch invariance, see ``_TUNE_KEY``).
    """
    key = (device.index, tuned is _fwd_tuned_wide) + tuple(
        meta[name] for name in ("BLOCK_M", "BLOCK_D", "UPCAST", "PRECISION")
    )
    config = _CHOSEN.get(key)
    if config is None:
        tuned[grid](*args, **meta)
        chosen = getattr(tuned, "best_config", None)  # (none when a launch recorder stands in)
        if chosen is not None:
            _CHOSEN[key] = chosen
        return
    _ragged_attn_fwd[grid](*args, **meta, **config.all_kwargs())  # as the autotuner launches


def _plans_splits(q: torch.Tensor) -> bool:
    """Split-K is planned for a real GPU launch only (the interpreter runs one program at a
    time; ``benchmarks/ptx_report.py`` overrides this to see the GPU's variants)."""
    return q.device.type == "cuda" and not interpreting()


def _block_m(block_d: int, dtype: torch.dtype) -> int:
    """Row tile: the largest that compiles without register spills on sm_90
    (``benchmarks/ptx_report.py``): 128 rows only for head dims <= 64, 64 for D = 128
    (fp16/bf16), and 32 in fp32, whose ieee dots keep the whole tile in registers. Never from the
    number of rows: in the varlen form that is the batch's longest request, and a row must round
    the same in every batch (a few packed rows, e.g. one query of one head, waste most of the
    tile; the kernel reads K/V, not FLOPs, at such sizes)."""
    if dtype == torch.float32:
        return 32
    return 128 if block_d <= 64 else 64


def _split_chunk(num_splits: int | None, split_chunk: int | None, q: torch.Tensor, max_keys: int):
    """Keys per split-K work item, or None without split-K. Host ints only (no sync).

    ``num_splits`` (tests, ptx_report): chunks of ceil(max_keys / num_splits) keys, 1 = off;
    ``split_chunk`` (tests under the interpreter): that many keys; default: ``SPLIT_CHUNK`` on
    a GPU, nothing under the interpreter (one program at a time). Only the first depends on the
    batch. Split-K is off when no segment can exceed a chunk (``max_keys``, a host bound).
    """
    if num_splits is not None:
        chunk = None if num_splits <= 1 else max(1, math.ceil(max_keys / num_splits))
    elif split_chunk is not None:
        chunk = split_chunk
    else:
        chunk = SPLIT_CHUNK if _plans_splits(q) else None
    return chunk if chunk is not None and max_keys > chunk else None


def ragged_attention_triton(
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
    *,
    num_splits: int | None = None,
    planner: str | None = None,
    split_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the ragged attention kernel, dense form (inputs already validated by the public op).

    Args:
        q: [B, Hq, Lq, D] (any strides); k, v: [N, D]; cu_seqlens: int32 [B * Hkv + 1];
        max_seqlen: host upper bound on a segment's length (sizes the split-K grid only);
        k_tail, v_tail: [B, Hkv, Lt, D] or None; scale: softmax scale;
        seg_starts: int64 [B * Hkv] first row of every segment (a pool view) or None.
        num_splits: force split-K with chunks of ceil((max_seqlen + Lt) / num_splits) keys
            (tests); None = ``split_chunk``, 1 = off.
        planner: "worklist" or "grid" (see ``PLANNER``, the default).
        split_chunk: keys per split-K work item (default ``SPLIT_CHUNK`` on a GPU, none under
            the interpreter).
    Returns:
        out [B, Hq, Lq, D] contiguous in q's dtype, lse fp32 [B, Hq, Lq] or None.
    """
    B, Hq, Lq, D = q.shape
    Hkv = num_kv_heads
    out = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device) if return_lse else None
    Lt = 0 if k_tail is None else k_tail.shape[2]
    tail = None
    if Lt:
        tail = (k_tail, v_tail, k_tail.stride(), v_tail.stride())
    S = B * Hkv
    keys = k.shape[0] if seg_starts is None else min(k.shape[0], S * max_seqlen)
    launch = _Launch(
        q, q.stride(), out, lse, (Hq * Lq, Lq, 1), B, Hkv, Hq // Hkv, Lq,
        keys=keys + S * Lt, max_keys=max_seqlen + Lt, tail=tail, Lt=Lt,
    )  # fmt: skip
    chunk = _split_chunk(num_splits, split_chunk, q, max_seqlen + Lt)
    launch.run(k, v, cu_seqlens, seg_starts, scale, chunk, planner or PLANNER)
    return out, lse


def ragged_attention_varlen_triton(
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
    *,
    num_splits: int | None = None,
    split_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the ragged attention kernel, varlen form (inputs validated by the public op).

    Args: q [Nq, Hq, D] packed by ``cu_seqlens_q`` (int32 [B + 1]); k, v [N, D] with
    ``cu_seqlens`` / ``seg_starts`` as in :func:`ragged_attention_triton`; k_tail, v_tail
    [Nt, Hkv, D] packed by ``cu_seqlens_tail`` (placed by ``tail_starts`` int64 [B]) or None;
    ``max_seqlen``, ``max_seqlen_q``, ``max_seqlen_tail``: host bounds (grid and split-K sizes,
    never a sync). Split-K (``num_splits``, ``split_chunk``: as in
    :func:`ragged_attention_triton`) always uses the work-list planner here.

    Returns out [Nq, Hq, D] in q's dtype (rows past ``cu_seqlens_q[B]`` 0), lse fp32 [Nq, Hq]
    (-inf there) or None.
    """
    Nq, Hq, D = q.shape
    Hkv = num_kv_heads
    B = cu_seqlens_q.numel() - 1
    S = B * Hkv
    # Rows of no request are never visited by a program: zero-filled here (bucketed Nq).
    out = torch.zeros((Nq, Hq, D), dtype=q.dtype, device=q.device)
    lse = None
    if return_lse:
        lse = torch.full((Nq, Hq), -math.inf, dtype=torch.float32, device=q.device)
    tail, tail_keys, max_tail = None, 0, 0
    if k_tail is not None and k_tail.shape[0]:
        Nt = k_tail.shape[0]
        max_tail = min(max_seqlen_tail, Nt)
        # The packed tails (no tail_starts) hold cu_seqlens_tail[B] <= Nt rows in all.
        tail_keys = Hkv * (B * max_tail if tail_starts is not None else min(Nt, B * max_tail))
        # [Nt, Hkv, D] as the kernel's (b, head, row, d) strides: b unused, row = dim 0.
        strides = [(0, t.stride(1), t.stride(0), t.stride(2)) for t in (k_tail, v_tail)]
        t_starts = cu_seqlens_tail if tail_starts is None else tail_starts
        tail = (k_tail, v_tail, *strides, cu_seqlens_tail, t_starts)
    keys = k.shape[0] if seg_starts is None else min(k.shape[0], S * max_seqlen)
    launch = _Launch(
        q, (0, q.stride(1), q.stride(0), q.stride(2)), out, lse, (0, 1, Hq), B, Hkv, Hq // Hkv,
        max_seqlen_q, keys=keys + tail_keys, max_keys=max_seqlen + max_tail, tail=tail,
        cu_q=cu_seqlens_q,
    )  # fmt: skip
    chunk = _split_chunk(num_splits, split_chunk, q, max_seqlen + max_tail)
    launch.run(k, v, cu_seqlens, seg_starts, scale, chunk, "worklist")
    return out, lse


class _Launch:
    """One launch of ``_ragged_attn_fwd`` (plus its combine kernel under split-K), shared by the
    dense and varlen forms.

    Args: q and its (b, head, row, d) strides; out / lse and the (b, head, row) strides of their
    output rows; B, Hkv, G; ``max_q``: query rows per head (Lq, or the host bound max_seqlen_q);
    ``keys``: host bound on the keys summed over all segments (sizes the split-K work list);
    ``max_keys``: host bound on one segment's keys (kept + tail; the grid planner's splits);
    ``tail``: dense (k_tail, v_tail, k strides, v strides) or varlen (..., cu_seqlens_tail,
    first tail rows), or None; ``Lt``: the dense tail length; ``cu_q``: the varlen query offsets
    (None: dense).
    """

    def __init__(
        self, q, q_strides, out, lse, o_strides, B, Hkv, G, max_q, *, keys, max_keys, tail,
        Lt=0, cu_q=None,
    ):  # fmt: skip
        self.q, self.q_strides, self.out, self.lse, self.o_strides = (
            q,
            q_strides,
            out,
            lse,
            o_strides,
        )
        self.B, self.Hkv, self.G, self.max_q = B, Hkv, G, max_q
        self.keys, self.max_keys, self.tail, self.Lt, self.cu_q = keys, max_keys, tail, Lt, cu_q

    def run(self, k, v, cu_seqlens, seg_starts, scale, chunk, planner) -> None:
        """One launch; ``chunk``: keys per split-K work item, or None (no split-K)."""
        q, out, lse = self.q, self.out, self.lse
        D = q.shape[-1]
        Hkv, G = self.Hkv, self.G
        S, rows = self.B * Hkv, G * self.max_q
        R = S * rows
        if R == 0 or out.numel() == 0:
            return
        if D > _MAX_HEAD_DIM:
            raise ValueError(
                f"q: expected head dim D <= {_MAX_HEAD_DIM} for the Triton backend, got {D}"
            )
        varlen = self.cu_q is not None
        if self.tail is None:  # any valid pointer will do: the tail loop runs zero times
            kt = vt = q
            kt_strides = vt_strides = (0, 0, 0, 0)
            # Varlen without a tail: every request's tail is empty (offsets all 0).
            cu_t = t_starts = torch.zeros(self.B + 1, dtype=torch.int32, device=q.device)
        else:
            kt, vt, kt_strides, vt_strides = self.tail[:4]
            cu_t, t_starts = self.tail[4:] if varlen else (cu_seqlens, cu_seqlens)
        if k.shape[0] == 0:
            k = v = q.new_empty((1, D))

        interp = interpreting()
        block_d = max(16, triton.next_power_of_2(D))
        block_m = _block_m(block_d, q.dtype)
        # (Not from the number of rows either: batch invariance.)
        wide = ROW_TILE == 128 and q.dtype != torch.float32 and block_d <= 128
        # The 128-row tile is a Hopper design (two wgmma warpgroups share each K/V tile). Before
        # sm_90 (mma.sync) its 64-key configs spill at D = 128 (benchmarks/ptx_report.py: up to
        # 84 bytes on sm_80); 32-key ones do not but are unmeasured: there _block_m's tile stays.
        # The "grid" planner (benchmarks only) keeps it too: its split variant spills 4 bytes on
        # sm_90a with the wide tile at the Dream-7B shape.
        wide = wide and (interp or _capability()[0] >= 9) and planner != "grid"
        if wide:
            block_m = 128
        row_tiles = triton.cdiv(rows, block_m)
        splits = 1 if chunk is None else max(1, math.ceil(self.max_keys / chunk))
        split = splits > 1
        worklist = split and (planner == "worklist" or varlen)

        item_start = cu_seqlens  # unused unless worklist
        search_iters = 0
        if worklist:
            # Items per segment from the real lengths (device ops, no sync); the grid and the
            # partial buffers from the host bound sum_s max(1, ceil(n_s / C)) <= keys // C + S.
            n_tot = cu_seqlens[1:] - cu_seqlens[:-1]
            if varlen:
                t_lens = (cu_t[1:] - cu_t[:-1])[:, None].expand(self.B, Hkv)
                n_tot = n_tot + t_lens.reshape(-1)
            else:
                n_tot = n_tot + self.Lt
            items = torch.clamp_min((n_tot + (chunk - 1)) // chunk, 1)
            item_start = torch.nn.functional.pad(items.cumsum(0, dtype=torch.int32), (1, 0))
            n_items = self.keys // chunk + S
            search_iters = max(1, math.ceil(math.log2(S + 1)))
            o_part = torch.empty((n_items, rows, D), dtype=torch.float32, device=q.device)
            lse_part = torch.empty((n_items, rows), dtype=torch.float32, device=q.device)
            grid = (row_tiles * n_items, 1)
        elif split:
            o_part = torch.empty((splits, R, D), dtype=torch.float32, device=q.device)
            lse_part = torch.empty((splits, R), dtype=torch.float32, device=q.device)
            grid = (row_tiles * S, splits)
        else:
            o_part = lse_part = out  # unused
            grid = (row_tiles * S, 1)
        upcast = interp and q.dtype == torch.bfloat16
        # fp32 inputs get true fp32 products (tf32 would miss the 1e-4 LSE contract).
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        lse_arg = lse if lse is not None else out
        cu_q = self.cu_q if varlen else cu_seqlens
        args = (
            q, k, v, kt, vt, cu_seqlens,
            cu_seqlens if seg_starts is None else seg_starts,
            cu_q, cu_t, t_starts,
            out, lse_arg, o_part, lse_part,
            item_start, S, search_iters,
            scale * _LOG2E, self.max_q, self.Lt, Hkv, G, rows, row_tiles, R, D, chunk or 1, splits,
            *self.q_strides, *k.stride(), *v.stride(), *kt_strides, *vt_strides, *self.o_strides,
        )  # fmt: skip
        meta = dict(
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            SPLIT=split,
            WORKLIST=worklist,
            STORE_LSE=lse is not None,
            VARLEN=varlen,
            UPCAST=upcast,
            PRECISION=precision,
        )
        if interp:
            _ragged_attn_fwd[grid](*args, **meta, BLOCK_N=_INTERPRET_BLOCK_N)
        else:
            tuned = _fwd_tuned_wide if wide and block_d > 64 else _fwd_tuned
            _launch_fwd(tuned, grid, args, meta, q.device)

        block_r = 16
        if worklist:
            _ragged_attn_combine_items[(triton.cdiv(R, block_r),)](
                o_part, lse_part, item_start, cu_q, out, lse_arg, R, rows, Hkv, G, D,
                *self.o_strides[1:], BLOCK_R=block_r, BLOCK_D=block_d,
                STORE_LSE=lse is not None, VARLEN=varlen,
            )  # fmt: skip
        elif split:
            _ragged_attn_combine[(triton.cdiv(R, block_r),)](
                o_part, lse_part, cu_seqlens, out, lse_arg, R, rows, self.Lt, D, chunk, splits,
                BLOCK_R=block_r, BLOCK_D=block_d, STORE_LSE=lse is not None,
            )  # fmt: skip
