"""Kernel A: score reduction (mask-query voting and SnapKV window scores) in Triton.

What it computes (see ``reference.mask_scores`` / ``reference.window_scores``): for every KV head
g, the column sums over its G query heads and M scoring queries of the softmax probabilities,
``scores[b, g, j] = sum_{h in g, i} exp(q_i . k_j * scale - lse[b, h, i])``. The attention
matrix [Hq, M, L] is never materialised: each program owns one block of keys and streams the
G*M query rows of its KV head through it, keeping only a [BLOCK_N] column accumulator.

Launch plan (all on the device, no host sync):

1. ``_lse_kernel`` (only when no ``lse`` is given): grid (row tiles, B*Hkv, splits). A flash
   forward without the PV product: online max / sum in the log2 domain (exp2 with the scale
   pre-multiplied by log2(e)). The key range is split across programs (flash-decoding style) when
   there are too few row tiles to fill the GPU; ``_lse_combine_kernel`` merges the partials.
2. ``_score_kernel``: grid (key blocks, B*Hkv). Key block resident, query tiles streamed, the
   column sum is a row reduction of the transposed logits [BLOCK_N, BLOCK_M] (warp-local).
   Response-key blocks (mask mode) write one partial mass each: S_m per head, summed in torch.
   ``_score_kstream_kernel`` is the alternative: grid (row tiles, key
   splits, B*Hkv), the row tile's Q^T resident and the keys of its split streamed through a
   pipelined loop, so Q is read once per program instead of once per key block; each tile writes
   its column sums to a [row tiles, B*Hkv, L] buffer that ``_score_rows_combine_kernel`` sums in
   order (deterministic). ``SCORE_KERNEL = "auto"`` (default) picks it where an H200 measured
   it faster: G*M <= 256 query rows per KV head.
3. ``_pool_kernel`` (window mode): same-padded max / avg pooling over [0, P - W), +inf on the
   window, 0 on padding. A light pass over [B, Hkv, P].

Rows of a KV head are flattened as ``r = h_local * M + m`` (G heads x M queries): one tile can
hold queries of several heads, so small M (even M=1) still fills a tensor-core tile, and the LSE
buffer [B*Hkv, G*M] is exactly the contiguous [B, Hq, M] layout.

Interpreter (CPU, ``TRITON_INTERPRET=1``): bf16 arithmetic and bf16 ``tl.dot`` are wrong there, so
``UPCAST`` casts every tile to fp32 right after its load and the dot runs in IEEE fp32. On the GPU,
fp16/bf16 tiles go to the tensor cores as they are (products exact in fp32, fp32 accumulation);
fp32 inputs use ``input_precision="ieee"`` (no TF32), so scores match the fp32 reference.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._dispatch import interpreting

LOG2E = 1.4426950408889634


def _configs(interp: dict, gpu: list[tuple]) -> list[triton.Config]:
    """One small config under the interpreter (no autotuning there), the GPU list otherwise.
    GPU tuples are (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if interpreting():
        return [triton.Config(interp, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in gpu
    ]


# Pass 1 is a flash forward without PV: BLOCK_M query rows resident, BLOCK_N keys streamed.
_LSE_CONFIGS = _configs(
    {"BLOCK_M": 16, "BLOCK_N": 32},
    [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4), (64, 128, 4, 3)],
)
# Pass 2 swaps the roles: BLOCK_N keys resident, BLOCK_M query rows streamed.
_SCORE_CONFIGS = _configs(
    {"BLOCK_M": 16, "BLOCK_N": 32},
    [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3), (32, 128, 4, 4)],
)
# Pass 2, K-streaming variant: BLOCK_M query rows resident, keys streamed (pipelined loads).
# One BLOCK_M for every config: the partial buffer has one row per row tile, and a config tried
# by the autotuner must not leave tiles that the chosen one does not overwrite.
_KSTREAM_CONFIGS = _configs(
    {"BLOCK_M": 16, "BLOCK_N": 32},
    [(64, 64, 4, 3), (64, 128, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 32, 4, 4)],
)
_KSTREAM_BLOCK_M = _KSTREAM_CONFIGS[0].kwargs["BLOCK_M"]
assert all(c.kwargs["BLOCK_M"] == _KSTREAM_BLOCK_M for c in _KSTREAM_CONFIGS)
# Which pass-2 kernel the launcher uses: "key_resident" (``_score_kernel``), "k_streaming"
# (``_score_kstream_kernel``: reads Q once per program instead of once per key block) or "auto".
# Measured on an H200 at P=32k (benchmarks/results/NVIDIA-H200): K-streaming wins while a KV
# head's G*M query rows are one resident tile (LLaDA-8B M=256: 0.506 vs 0.558 ms with LSE) and
# loses beyond (LLaDA M=1024: 1.28 vs 1.21; Dream-7B G*M=1792: 0.451 vs 0.426), so "auto" picks
# it for G*M <= _KSTREAM_MAX_ROWS. Benchmarks and tests force either.
SCORE_KERNEL = "auto"
_KSTREAM_MAX_ROWS = 256
# Partial mask mass: one slot per _MASS_SLOT response keys, whatever BLOCK_N the autotuner picks.
_MASS_SLOT = min(c.kwargs["BLOCK_N"] for c in _SCORE_CONFIGS)
_MAX_BLOCK_N = max(c.kwargs["BLOCK_N"] for c in _SCORE_CONFIGS)


@triton.autotune(configs=_LSE_CONFIGS, key=["BLOCK_D", "WINDOW"])
@triton.jit
def _lse_kernel(
    Q, K, FIRST, LSE, M_PART, L_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    H_KV, G, M, KEY_END, SPLIT_LEN, HEAD_DIM, qk_scale,
    BLOCK_D: tl.constexpr, WINDOW: tl.constexpr, SINGLE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """log2-domain LSE of BLOCK_M query rows over keys [first, KEY_END) of one split."""
    pid_m = tl.program_id(0)
    bg = tl.program_id(1)
    split = tl.program_id(2)
    b = bg // H_KV
    g = bg % H_KV
    GM = G * M
    first = tl.load(FIRST + b)  # first real (non-padding) position of this batch row

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GM
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_rows = (g * G + rows // M).to(tl.int64) * stride_qh + (rows % M).to(tl.int64) * stride_qm
    q_ptrs = Q + b.to(tl.int64) * stride_qb + q_rows[:, None] + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    k_base = K + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
    # Skip the left padding: start at the block holding the first real key.
    lo = tl.maximum(split * SPLIT_LEN, (first // BLOCK_N) * BLOCK_N)
    hi = tl.minimum((split + 1) * SPLIT_LEN, KEY_END)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = (offs_n >= first) & (offs_n < hi)
        kt_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_kl + offs_d[:, None] * stride_kd
        kt = tl.load(kt_ptrs, mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        if IEEE:  # fp32 operands: no TF32 (~1e-3 relative error); fp16/bf16: tensor cores
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, kt) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead (no inf - inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new

    if SINGLE:
        tl.store(LSE + bg.to(tl.int64) * GM + rows, m_i + tl.log2(l_i), mask=row_ok)
    else:
        part = (bg * tl.num_programs(2) + split).to(tl.int64) * GM + rows
        tl.store(M_PART + part, m_i, mask=row_ok)
        tl.store(L_PART + part, l_i, mask=row_ok)


@triton.jit
def _lse_combine_kernel(M_PART, L_PART, LSE, GM, NUM_SPLITS, BLOCK: tl.constexpr):
    """Merge the per-split (max, sum) pairs of pass 1 into one log2-domain LSE per row."""
    pid = tl.program_id(0)
    bg = tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < GM
    base = bg.to(tl.int64) * NUM_SPLITS * GM + rows
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for s in range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(M_PART + base + s * GM, mask=ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK], tl.float32)
    for s in range(NUM_SPLITS):
        m_s = tl.load(M_PART + base + s * GM, mask=ok, other=float("-inf"))
        l += tl.load(L_PART + base + s * GM, mask=ok, other=0.0) * tl.exp2(m_s - m_safe)
    tl.store(LSE + bg.to(tl.int64) * GM + rows, m_safe + tl.log2(l), mask=ok)


@triton.jit
def _load_score_rows(
    Q_B, LSE_BG, rows, first, g, G, M, P, GM, stride_qh, stride_qm, stride_qd, offs_d, d_ok,
    WINDOW: tl.constexpr, LSE_NATURAL: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Scoring rows ``rows`` (r = h_local * M + m) of one (b, g): Q^T [BLOCK_D, rows], their
    log2-domain LSE (0 where masked) and which rows vote. Padding window queries and rows with no
    valid key (lse -inf) vote nothing. Q_B / LSE_BG point at batch row b / segment b*Hkv + g."""
    row_ok = rows < GM
    mm = rows % M
    if WINDOW:  # window query i sits at prompt position P - M + i; padding queries vote nothing
        row_ok = row_ok & (P - M + mm >= first)
    q_rows = (g * G + rows // M).to(tl.int64) * stride_qh + mm.to(tl.int64) * stride_qm
    qt = tl.load(Q_B + q_rows[None, :] + offs_d[:, None] * stride_qd,
                 mask=row_ok[None, :] & d_ok[:, None], other=0.0)  # fmt: skip
    if UPCAST:
        qt = qt.to(tl.float32)
    lse = tl.load(LSE_BG + rows, mask=row_ok, other=0.0)
    if LSE_NATURAL:  # a given lse is natural-log (attention forward); kernels work in log2
        lse = lse * 1.4426950408889634
    row_ok = row_ok & (lse > float("-inf"))  # a row without any valid key has no mass
    return qt, tl.where(row_ok, lse, 0.0), row_ok


@triton.jit
def _column_sums(k, qt, lse, key_ok, row_ok, qk_scale, IEEE: tl.constexpr):
    """[BLOCK_N] sums over the rows of exp2(k . q * scale*log2e - lse2), masked keys / rows 0."""
    if IEEE:  # [BLOCK_N, BLOCK_M]; fp32 operands: no TF32
        s = tl.dot(k, qt, input_precision="ieee") * qk_scale
    else:
        s = tl.dot(k, qt) * qk_scale
    p = tl.exp2(s - lse[None, :])
    return tl.sum(tl.where(key_ok[:, None] & row_ok[None, :], p, 0.0), 1)


@triton.autotune(configs=_SCORE_CONFIGS, key=["BLOCK_D", "WINDOW"])
@triton.jit
def _score_kernel(
    Q, K, FIRST, LSE, SCORES, MASS_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    H_KV, G, M, P, L, NUM_MASS, HEAD_DIM, qk_scale,
    BLOCK_D: tl.constexpr, WINDOW: tl.constexpr, LSE_NATURAL: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, MASS_SLOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Column sums of exp2(q.k * scale*log2e - lse2) for one block of keys of one KV head.

    Programs [0, cdiv(P, BLOCK_N)) cover the prompt and write scores; the rest cover response
    keys [P, L) and write one partial mask mass each."""
    pid_n = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // H_KV
    g = bg % H_KV
    GM = G * M
    first = tl.load(FIRST + b)
    n_prompt_blocks = tl.cdiv(P, BLOCK_N)
    in_prompt = pid_n < n_prompt_blocks
    # tl.where instead of if/else: both branches stay plain tensors (ints == 1 may be constexpr).
    start = tl.where(in_prompt, pid_n * BLOCK_N, P + (pid_n - n_prompt_blocks) * BLOCK_N)
    end = tl.where(in_prompt, P, L)

    offs_n = start + tl.arange(0, BLOCK_N)
    key_ok = (offs_n >= first) & (offs_n < end)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_ptrs = (
        K + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
        + offs_n[:, None].to(tl.int64) * stride_kl + offs_d[None, :] * stride_kd
    )  # fmt: skip
    k = tl.load(k_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)

    q_base = Q + b.to(tl.int64) * stride_qb
    lse_base = LSE + bg.to(tl.int64) * GM
    acc = tl.zeros([BLOCK_N], tl.float32)
    # A block made only of left padding receives nothing: skip the query loop.
    row_end = tl.where(start + BLOCK_N > first, GM, 0)
    for r0 in range(0, row_end, BLOCK_M):
        qt, lse, row_ok = _load_score_rows(
            q_base, lse_base, r0 + tl.arange(0, BLOCK_M), first, g, G, M, P, GM,
            stride_qh, stride_qm, stride_qd, offs_d, d_ok, WINDOW, LSE_NATURAL, UPCAST,
        )  # fmt: skip
        acc += _column_sums(k, qt, lse, key_ok, row_ok, qk_scale, IEEE)

    if in_prompt:
        tl.store(SCORES + bg.to(tl.int64) * P + offs_n, acc, mask=offs_n < P)
    else:
        # A response block owns BLOCK_N // MASS_SLOT slots: its mass goes to the first, zeros to
        # the others, so the buffer holds no stale partials from configs tried by the autotuner.
        SLOTS: tl.constexpr = BLOCK_N // MASS_SLOT
        slot = tl.arange(0, SLOTS)
        mass = tl.where(slot == 0, tl.sum(acc, 0), 0.0)
        dst = MASS_PART + bg.to(tl.int64) * NUM_MASS + (pid_n - n_prompt_blocks) * SLOTS
        tl.store(dst + slot, mass)


@triton.autotune(configs=_KSTREAM_CONFIGS, key=["BLOCK_D", "WINDOW"])
@triton.jit
def _score_kstream_kernel(
    Q, K, FIRST, LSE, PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    H_KV, G, M, P, KEY_END, SPLIT_LEN, HEAD_DIM, qk_scale,
    BLOCK_D: tl.constexpr, WINDOW: tl.constexpr, LSE_NATURAL: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Column sums of exp2(q.k * scale*log2e - lse2) of one row tile over one key range.

    Grid (row tiles, key splits, B*Hkv), row tiles fastest so that the tiles of one key range
    share its K through L2. The row tile's Q^T [D, BLOCK_M] and LSE stay in registers; each key
    block's column sums over the tile go to PART[row tile, b*Hkv + g, key] (keys [0, KEY_END),
    prompt and response alike); ``_score_rows_combine_kernel`` sums the row tiles in order."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    bg = tl.program_id(2)
    b = bg // H_KV
    g = bg % H_KV
    GM = G * M
    first = tl.load(FIRST + b)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    qt, lse, row_ok = _load_score_rows(
        Q + b.to(tl.int64) * stride_qb, LSE + bg.to(tl.int64) * GM,
        pid_m * BLOCK_M + tl.arange(0, BLOCK_M), first, g, G, M, P, GM,
        stride_qh, stride_qm, stride_qd, offs_d, d_ok, WINDOW, LSE_NATURAL, UPCAST,
    )  # fmt: skip

    k_base = K + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
    part_base = PART + (pid_m * tl.num_programs(2) + bg).to(tl.int64) * KEY_END
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, KEY_END)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = (offs_n >= first) & (offs_n < hi)
        k_ptrs = k_base + offs_n[:, None].to(tl.int64) * stride_kl + offs_d[None, :] * stride_kd
        k = tl.load(k_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        cols = _column_sums(k, qt, lse, key_ok, row_ok, qk_scale, IEEE)
        tl.store(part_base + offs_n, cols, mask=offs_n < hi)


@triton.jit
def _score_rows_combine_kernel(
    PART, FIRST, SCORES, MASS_PART, H_KV, P, KEY_END, ROW_TILES, NUM_MASS,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Sum the row tiles' column sums in a fixed order (deterministic): prompt keys -> scores
    (0 on left padding), response keys -> one partial mask mass per program."""
    pid = tl.program_id(0)
    bg = tl.program_id(1)
    first = tl.load(FIRST + bg // H_KV)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < KEY_END
    acc = tl.zeros([BLOCK], tl.float32)
    n_bg = tl.num_programs(1)
    for t in range(0, ROW_TILES):
        acc += tl.load(PART + (t * n_bg + bg).to(tl.int64) * KEY_END + offs, mask=ok, other=0.0)
    acc = tl.where(offs >= first, acc, 0.0)
    tl.store(SCORES + bg.to(tl.int64) * P + offs, acc, mask=offs < P)
    if NUM_MASS > 0:
        mass = tl.sum(tl.where(ok & (offs >= P), acc, 0.0), 0)
        tl.store(MASS_PART + bg.to(tl.int64) * NUM_MASS + pid, mass)


@triton.jit
def _pool_kernel(
    RAW, FIRST, OUT, H_KV, P, W,
    POOL: tl.constexpr, KSIZE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """SnapKV pooling over the non-window prompt [0, P - W) (stride 1, same padding; max pads
    with -inf, avg counts the padding), +inf on the window, 0 on left padding."""
    pid = tl.program_id(0)
    bg = tl.program_id(1)
    first = tl.load(FIRST + bg // H_KV)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    base = RAW + bg.to(tl.int64) * P
    pw = P - W
    if POOL == 0:
        acc = tl.load(base + offs, mask=offs < pw, other=0.0)
    elif POOL == 1:
        acc = tl.full([BLOCK], float("-inf"), tl.float32)
        for t in tl.static_range(KSIZE):
            j = offs + (t - KSIZE // 2)
            acc = tl.maximum(acc, tl.load(base + j, mask=(j >= 0) & (j < pw), other=float("-inf")))
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for t in tl.static_range(KSIZE):
            j = offs + (t - KSIZE // 2)
            acc += tl.load(base + j, mask=(j >= 0) & (j < pw), other=0.0)
        acc = acc / KSIZE
    out = tl.where(offs >= pw, float("inf"), acc)
    out = tl.where(offs < first, 0.0, out)
    tl.store(OUT + bg.to(tl.int64) * P + offs, out, mask=offs < P)


# ----------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(bh: int, gm: int, key_end: int, device: torch.device) -> int:
    """Key splits for pass 1: enough programs for ~2 waves, but >= 1024 keys per split."""
    if device.type != "cuda":
        return 1
    tiles = bh * triton.cdiv(gm, 128)
    want = triton.cdiv(2 * _sm_count(device.index or 0), max(tiles, 1))
    return int(max(1, min(want, key_end // 1024, 64)))


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
    num_splits: int | None = None,
    kernel: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw column-sum scores (before window pooling) and the mask mass.

    Args:
        q: [B, Hq, M, D]; k: [B, Hkv, L, D] (any strides); first: int32 [B] first real position.
        window: softmax over prompt keys only and padding window queries masked (W = M).
        lse: natural-log fp32 [B, Hq, M] over all valid keys (mask mode only) or None.
        need_mass: also score the response keys [P, L) (mask mode) for S_m.
        num_splits: key splits of the LSE pass (default: a heuristic; tests force it).
        kernel: pass-2 kernel, "auto", "key_resident" or "k_streaming" (default
            ``SCORE_KERNEL``); K-streaming also splits its keys ``num_splits`` ways when given.
    Returns:
        scores fp32 [B, Hkv, P] (0 at padding), mask_mass fp32 [B, Hkv] (None unless need_mass).
    """
    B, Hq, M, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G, P, BH = Hq // Hkv, prompt_len, B * Hkv
    GM = G * M
    key_end = P if window else L
    R = L - P if (need_mass and not window) else 0
    dev = q.device
    scores = torch.empty(B, Hkv, P, dtype=torch.float32, device=dev)  # every entry is written
    slots = triton.cdiv(R, _MAX_BLOCK_N) * (_MAX_BLOCK_N // _MASS_SLOT)
    # Zeroed: slots past the last response key are written by no config.
    mass_part = (
        torch.zeros(BH, max(slots, 1), dtype=torch.float32, device=dev) if need_mass else None
    )
    mass = None if mass_part is None else lambda: mass_part.sum(-1).view(B, Hkv)
    if GM == 0 or BH == 0 or P + R == 0:
        return scores.zero_(), mass and mass()

    interp = interpreting()
    common = dict(
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        WINDOW=window,
        UPCAST=interp,
        IEEE=interp or q.dtype == torch.float32,
    )
    qk_scale = scale * LOG2E
    if lse is None:
        splits = num_splits or _num_splits(BH, GM, key_end, dev)
        splits = max(1, min(splits, triton.cdiv(max(key_end, 1), 16)))
        lse_arg = torch.empty(BH, GM, dtype=torch.float32, device=dev)
        part_shape = (BH, splits, GM) if splits > 1 else (1,)
        m_part = torch.empty(part_shape, dtype=torch.float32, device=dev)
        l_part = torch.empty(part_shape, dtype=torch.float32, device=dev)
        # Splits are multiples of 256 keys so every BLOCK_N tiles them exactly.
        split_len = triton.cdiv(triton.cdiv(max(key_end, 1), splits), 256) * 256
        grid = lambda meta: (triton.cdiv(GM, meta["BLOCK_M"]), BH, splits)
        _lse_kernel[grid](
            q, k, first, lse_arg, m_part, l_part,
            *q.stride(), *k.stride(),
            Hkv, G, M, key_end, split_len, D, qk_scale,
            SINGLE=splits == 1, **common,
        )  # fmt: skip
        if splits > 1:
            _lse_combine_kernel[(triton.cdiv(GM, 256), BH)](
                m_part, l_part, lse_arg, GM, splits, BLOCK=256
            )
        natural = False
    else:
        lse_arg, natural = lse.contiguous(), True

    kernel = kernel or SCORE_KERNEL
    if kernel == "auto":
        kernel = "k_streaming" if GM <= _KSTREAM_MAX_ROWS else "key_resident"
    if kernel not in ("k_streaming", "key_resident"):
        raise ValueError(f"kernel must be 'auto', 'key_resident' or 'k_streaming', got {kernel!r}")
    if kernel == "k_streaming":
        return _score_k_streaming(
            q, k, first, lse_arg, scores, P, R, qk_scale, natural, common, need_mass, num_splits
        )
    grid = lambda meta: (triton.cdiv(P, meta["BLOCK_N"]) + triton.cdiv(R, meta["BLOCK_N"]), BH)
    _score_kernel[grid](
        q, k, first, lse_arg, scores, scores if mass_part is None else mass_part,
        *q.stride(), *k.stride(),
        Hkv, G, M, P, P + R, 0 if mass_part is None else mass_part.shape[1], D, qk_scale,
        LSE_NATURAL=natural, MASS_SLOT=_MASS_SLOT, **common,
    )  # fmt: skip
    return scores, mass and mass()


def _score_k_streaming(
    q, k, first, lse_arg, scores, P, R, qk_scale, natural, common, need_mass, num_splits
):
    """Pass 2 as ``_score_kstream_kernel`` + the row-tile combine (see SCORE_KERNEL)."""
    B, Hq, M, D = q.shape
    Hkv = k.shape[1]
    G, BH = Hq // Hkv, B * Hkv
    GM, key_end = G * M, P + R
    row_tiles = triton.cdiv(GM, _KSTREAM_BLOCK_M)  # every config has this BLOCK_M
    part = torch.empty(row_tiles, BH, key_end, dtype=torch.float32, device=q.device)
    # Key splits: ~2 waves of programs, >= 1024 keys each, multiples of 256 keys.
    splits = num_splits or _num_splits(BH * row_tiles, _KSTREAM_BLOCK_M, key_end, q.device)
    quantum = 256 if num_splits is None else 32  # tests force small splits on small prompts
    split_len = triton.cdiv(triton.cdiv(key_end, splits), quantum) * quantum
    splits = triton.cdiv(key_end, split_len)
    _score_kstream_kernel[(row_tiles, splits, BH)](
        q, k, first, lse_arg, part, *q.stride(), *k.stride(),
        Hkv, G, M, P, key_end, split_len, D, qk_scale, LSE_NATURAL=natural, **common,
    )  # fmt: skip
    block = 1024
    n_blocks = triton.cdiv(key_end, block)
    mass_part = torch.empty(BH, n_blocks, dtype=torch.float32, device=q.device)
    _score_rows_combine_kernel[(n_blocks, BH)](
        part, first, scores, mass_part, Hkv, P, key_end, row_tiles,
        n_blocks if need_mass else 0, BLOCK=block,
    )  # fmt: skip
    return scores, (mass_part.sum(-1).view(B, Hkv) if need_mass else None)


def pool_window(
    raw: torch.Tensor, first: torch.Tensor, window: int, pool: str, pool_kernel: int
) -> torch.Tensor:
    """raw fp32 [B, Hkv, P] -> pooled window scores fp32 [B, Hkv, P] (see ``_pool_kernel``)."""
    B, Hkv, P = raw.shape
    out = torch.empty_like(raw)
    if B * Hkv == 0 or P == 0:
        return out
    mode = 0 if (pool == "none" or pool_kernel == 1) else (1 if pool == "max" else 2)
    BLOCK = 64 if interpreting() else 1024
    _pool_kernel[(triton.cdiv(P, BLOCK), B * Hkv)](
        raw, first, out, Hkv, P, window, POOL=mode, KSIZE=pool_kernel, BLOCK=BLOCK
    )
    return out
