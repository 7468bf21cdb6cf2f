"""Triton kernels for the elementwise work of a transformer layer: RMSNorm (optionally fused with
the residual add before it), rotary embedding of q and k in one launch, and the SiLU-gated product.

Every kernel reproduces the rounding of the eager PyTorch code it replaces (``torch_impl``), so a
fused layer differs from the unfused one only where a reduction sums in another order (the RMSNorm
mean) or ``exp`` / ``rsqrt`` differ in the last fp32 bit: at most one bf16 rounding step.

- Values are loaded, cast to fp32 at once and computed in fp32, as PyTorch's ``opmath`` does.
- Wherever the eager code rounds to the model dtype (each bf16 op's output), the kernel rounds
  too, with ``_round_to``; bf16 rounding is done on the integer bits (round to nearest even),
  because the interpreter's fp32 -> bf16 cast truncates. The rounded fp32 value is exact in
  the model dtype, so the final ``.to(dtype)`` of the store is exact under any cast.
- The rotary kernel is launched with ``enable_fp_fusion=False``: ``x1 * c - x2 * s`` contracted
  into an FMA would round once where PyTorch rounds twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ROUND codes: which dtype a kernel rounds its intermediate results to.
_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_COLS = 32768  # RMSNorm holds one row in registers


@triton.jit
def _round_to(x, ROUND: tl.constexpr):
    """fp32 ``x`` rounded to the model dtype (0: fp32, 1: fp16, 2: bf16), returned as fp32."""
    if ROUND == 2:
        # Round to nearest even on the bits: add 0x7FFF plus the lowest kept bit, drop 16 bits.
        # NaN bits are zeroed first (no carry into the exponent) and NaN is put back after.
        bits = tl.where(x == x, x.to(tl.int32, bitcast=True), 0)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
    elif ROUND == 1:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


# Kernels are laid out by hand, tutorial style (arguments grouped by meaning).
# fmt: off
@triton.jit
def _rms_norm_kernel(
    X, RES, W, OUT, SUM,           # x, residual [rows, n] (row strides below); w [n]; outputs
    n_cols, stride_x, stride_r,    # OUT and SUM are contiguous [rows, n]
    inv_n, eps,
    HAS_RES: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row per program: SUM = x + residual (rounded, as ``h + o`` is), then
    OUT = w * round(s * rsqrt(mean(s^2) + eps)) with s = SUM (or x), as LLaDA / Qwen2 do."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(RES + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        x = _round_to(x + r, ROUND)
        tl.store(SUM + row * n_cols + cols, x.to(SUM.dtype.element_ty), mask=ok)
    var = tl.sum(x * x, 0) * inv_n
    h = _round_to(x * (1.0 / tl.sqrt(var + eps)), ROUND)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    y = _round_to(w * h, ROUND)
    tl.store(OUT + row * n_cols + cols, y.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _rotate_heads(
    X, OUT, row, stride_x, h0, H, c1, c2, s1, s2,
    HALF, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    FULL_PRECISION: tl.constexpr, ROUND: tl.constexpr,
):
    """Rotate heads [h0, h0 + BLOCK_H) of one token: rotate-half layout, x = [x1 ‖ x2] per head,
    out = [x1 c1 - x2 s1 ‖ x2 c2 + x1 s2]."""
    heads = h0 + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    ok = (heads < H)[:, None] & (offs < HALF)[None, :]
    col = heads[:, None] * (2 * HALF) + offs[None, :]
    x_row = X + row * stride_x
    x1 = tl.load(x_row + col, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + col + HALF, mask=ok, other=0.0).to(tl.float32)
    if FULL_PRECISION:  # LLaDA: rotate in fp32, round once
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
    else:  # Qwen2 / Dream: every product and the sum round to the model dtype
        o1 = _round_to(x1 * c1[None, :], ROUND) - _round_to(x2 * s1[None, :], ROUND)
        o2 = _round_to(x2 * c2[None, :], ROUND) + _round_to(x1 * s2[None, :], ROUND)
    o_row = OUT + row * (H * 2 * HALF)
    tl.store(o_row + col, _round_to(o1, ROUND).to(OUT.dtype.element_ty), mask=ok)
    tl.store(o_row + col + HALF, _round_to(o2, ROUND).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_kernel(
    Q, K, Q_OUT, K_OUT, COS, SIN,  # q [B*T, Hq*D], k [B*T, Hkv*D] (row strides); cos/sin fp32
    T, HQ, HKV, HALF,
    stride_q, stride_k, stride_cb, stride_ct,
    BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    FULL_PRECISION: tl.constexpr, ROUND: tl.constexpr,
):
    """Grid (B * T tokens, head blocks of q then of k): q and k in one launch."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    b = row // T
    t = row % T
    offs = tl.arange(0, BLOCK_HALF)
    ok = offs < HALF
    cs = b * stride_cb + t * stride_ct + offs
    c1 = tl.load(COS + cs, mask=ok, other=0.0)
    c2 = tl.load(COS + cs + HALF, mask=ok, other=0.0)
    s1 = tl.load(SIN + cs, mask=ok, other=0.0)
    s2 = tl.load(SIN + cs + HALF, mask=ok, other=0.0)
    if not FULL_PRECISION:  # the tables are cast to the model dtype first
        c1 = _round_to(c1, ROUND)
        c2 = _round_to(c2, ROUND)
        s1 = _round_to(s1, ROUND)
        s2 = _round_to(s2, ROUND)
    q_blocks = tl.cdiv(HQ, BLOCK_H)
    if blk < q_blocks:
        _rotate_heads(Q, Q_OUT, row, stride_q, blk * BLOCK_H, HQ, c1, c2, s1, s2,
                      HALF, BLOCK_HALF, BLOCK_H, FULL_PRECISION, ROUND)
    else:
        _rotate_heads(K, K_OUT, row, stride_k, (blk - q_blocks) * BLOCK_H, HKV, c1, c2, s1, s2,
                      HALF, BLOCK_HALF, BLOCK_H, FULL_PRECISION, ROUND)


@triton.jit
def _silu_mul_kernel(GATE, UP, OUT, n, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    """OUT = round(round(silu(gate)) * up) over n contiguous elements (F.silu(g) * u)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(GATE + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=ok, other=0.0).to(tl.float32)
    s = _round_to(g / (1.0 + tl.exp(-g)), ROUND)
    tl.store(OUT + offs, _round_to(s * u, ROUND).to(OUT.dtype.element_ty), mask=ok)
# fmt: on


# ----------------------------------------------------------------------------- launchers


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., n] as a 2-D [rows, n] view (last dim contiguous; copies only if it must)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x, residual: [..., n] in the model dtype; weight: [n] (same dtype).
    Returns (normed [..., n] contiguous, x + residual [..., n] or None)."""
    n = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if residual is not None else None
    if x2.shape[0] == 0:
        return out, summed
    r2 = _rows(residual) if residual is not None else x2
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out, summed if summed is not None else out,
        n, x2.stride(0), r2.stride(0), 1.0 / n, eps,
        HAS_RES=residual is not None, ROUND=_ROUND[x.dtype], BLOCK=block,
        num_warps=8 if block >= 4096 else 4,
    )  # fmt: skip
    return out, summed


def rotary_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head_dim: int,
    full_precision: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, T, Hq * D], k: [B, T, Hkv * D] (last dim contiguous); cos, sin: fp32 [B or 1, T, D]
    (last dim contiguous). Returns rotated q, k, contiguous, same shapes."""
    B, T, _ = q.shape
    hq, hkv = q.shape[-1] // head_dim, k.shape[-1] // head_dim
    q2, k2 = _rows(q), _rows(k)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if B * T == 0:
        return q_out, k_out
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(hq, hkv)), 4096 // (2 * block_half)))
    grid = (B * T, triton.cdiv(hq, block_h) + triton.cdiv(hkv, block_h))
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
    _rotary_kernel[grid](
        q2, k2, q_out, k_out, cos, sin,
        T, hq, hkv, half,
        q2.stride(0), k2.stride(0), cos_b, cos.stride(1),
        BLOCK_HALF=block_half, BLOCK_H=block_h,
        FULL_PRECISION=full_precision, ROUND=_ROUND[q.dtype],
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return q_out, k_out


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: same shape, contiguous. Returns F.silu(gate) * up, contiguous."""
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n == 0:
        return out
    block = 4096
    _silu_mul_kernel[(triton.cdiv(n, block),)](
        gate, up, out, n, ROUND=_ROUND[gate.dtype], BLOCK=block, num_warps=8
    )
    return out
