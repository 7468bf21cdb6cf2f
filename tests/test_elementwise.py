"""The fused elementwise ops (rms_norm with the residual add, rotary of q and k, silu_mul) against
the eager PyTorch code of the models: the torch path op for op, the Triton kernels within one
rounding step of the dtype (bit-identical where no sum order or ``exp`` is involved).

On CPU the kernels run under TRITON_INTERPRET=1 (tiny shapes); the ``gpu`` tests run real shapes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import maskkv_kernels as mk
from maskkv.models._common import RMSNorm, apply_rotary, rotary_cos_sin

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_triton = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRET), reason="the Triton backend needs CUDA or TRITON_INTERPRET=1"
)
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def assert_within_one_rounding(a: torch.Tensor, b: torch.Tensor) -> None:
    """In fp16 / bf16 every element of ``a`` equals ``b`` or one of its two neighbours in b's
    dtype. In fp32 the kernels' ``exp`` / ``rsqrt`` and sum order may differ in the last bits
    before the one rounding: 4 fp32 ulps."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if b.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=4 * torch.finfo(b.dtype).eps, atol=1e-30)
        return
    up = torch.nextafter(b, torch.full_like(b, float("inf")))
    down = torch.nextafter(b, torch.full_like(b, float("-inf")))
    ok = (a == b) | (a == up) | (a == down)
    assert bool(ok.all()), f"{int((~ok).sum())} elements off by more than one step"


def _tables(B, T, D, dev=DEV, offset=0):
    pos = torch.arange(T, device=dev).expand(B, T) + offset + torch.arange(B, device=dev)[:, None]
    return rotary_cos_sin(pos, D, 10000.0)


def test_torch_path_is_the_models_math():
    """The reference path rounds exactly as the model code it stands for."""
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-6).to(torch.bfloat16)
    norm.weight.data.uniform_(0.5, 1.5)
    x, r = torch.randn(2, 5, 48, dtype=torch.bfloat16), torch.randn(2, 5, 48, dtype=torch.bfloat16)
    out, s = mk.rms_norm(x, norm.weight, 1e-6, residual=r, backend="torch")
    assert torch.equal(s, x + r) and torch.equal(out, norm(x + r))
    B, T, D = 2, 5, 16
    cos, sin = _tables(B, T, D, dev="cpu")
    q, k = (
        torch.randn(B, T, 3 * D, dtype=torch.bfloat16),
        torch.randn(B, T, D, dtype=torch.bfloat16),
    )
    for full in (True, False):
        qr, kr = mk.rotary(q, k, cos, sin, head_dim=D, full_precision=full, backend="torch")
        heads = q.view(B, T, 3, D).transpose(1, 2)
        expected = apply_rotary(heads, cos, sin, full_precision=full).transpose(1, 2)
        assert torch.equal(qr, expected.reshape(B, T, 3 * D))
        assert torch.equal(kr, apply_rotary(k.view(B, T, 1, D).transpose(1, 2), cos, sin, full)
                           .transpose(1, 2).reshape(B, T, D))  # fmt: skip
    g, u = torch.randn(4, 40, dtype=torch.bfloat16), torch.randn(4, 40, dtype=torch.bfloat16)
    assert torch.equal(mk.silu_mul(g, u, backend="torch"), F.silu(g) * u)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_triton(dtype):
    torch.manual_seed(1)
    n = 96  # not a power of two: masked columns
    wide = torch.randn(2, 3, 2 * n, dtype=dtype, device=DEV) * 3
    x = wide[..., :n]  # rows strided by 2n
    r = torch.randn(2, 3, n, dtype=dtype, device=DEV)
    w = (torch.rand(n, device=DEV) + 0.5).to(dtype)
    out, s = mk.rms_norm(x, w, 1e-5, residual=r, backend="triton")
    ref, ref_s = mk.rms_norm(x, w, 1e-5, residual=r, backend="torch")
    assert torch.equal(s, ref_s)  # the residual sum rounds once, as `h + o`
    assert_within_one_rounding(out, ref)
    assert_within_one_rounding(mk.rms_norm(x, w, 1e-5, backend="triton"),
                               mk.rms_norm(x, w, 1e-5, backend="torch"))  # fmt: skip


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("full_precision", [True, False])
def test_rotary_triton_is_bit_exact(dtype, full_precision):
    torch.manual_seed(2)
    B, T, D = 2, 3, 24  # D / 2 = 12, not a power of two
    q = torch.randn(B, T, 7 * D, dtype=dtype, device=DEV) * 4  # GQA: 7 query heads ...
    k = torch.randn(B, T, 2 * D, dtype=dtype, device=DEV)  # ... 2 KV heads
    for cos, sin in (_tables(B, T, D, offset=500), _tables(1, T, D, offset=9)):
        got = mk.rotary(q, k, cos, sin, head_dim=D, full_precision=full_precision, backend="triton")
        ref = mk.rotary(q, k, cos, sin, head_dim=D, full_precision=full_precision, backend="torch")
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's NumPy
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_triton(dtype):
    torch.manual_seed(3)
    g = torch.randn(3, 1500, dtype=dtype, device=DEV) * 4
    u = torch.randn(3, 1500, dtype=dtype, device=DEV)
    g[0, :3] = torch.tensor([0.0, -90.0, 90.0])  # exp overflow / underflow
    assert_within_one_rounding(
        mk.silu_mul(g, u, backend="triton"), mk.silu_mul(g, u, backend="torch")
    )


def test_bad_input_names_the_argument():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight: expected a tensor of shape"):
        mk.rms_norm(x, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="residual: expected x's shape"):
        mk.rms_norm(x, torch.ones(8), 1e-5, residual=torch.randn(2, 7))
    with pytest.raises(ValueError, match="x: expected a float tensor"):
        mk.rms_norm(torch.ones(2, 8, dtype=torch.long), torch.ones(8), 1e-5)
    q, k = torch.randn(1, 3, 32), torch.randn(1, 3, 16)
    cos, sin = _tables(1, 3, 16, dev="cpu")
    with pytest.raises(ValueError, match="head_dim: expected a positive even int"):
        mk.rotary(q, k, cos, sin, head_dim=15)
    with pytest.raises(ValueError, match="cos: expected fp32"):
        mk.rotary(q, k, cos[:, :2], sin, head_dim=16)
    with pytest.raises(ValueError, match="k: expected"):
        mk.rotary(q, k[:, :2], cos, sin, head_dim=16)
    with pytest.raises(ValueError, match="up: expected gate's shape"):
        mk.silu_mul(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="backend: expected one of"):
        mk.silu_mul(torch.randn(2, 4), torch.randn(2, 4), backend="cpp")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_shapes(dtype):
    """LLaDA-8B (32 / 32 heads, d 4096) and Dream-7B (28 / 4, d 3584) later-step shapes."""
    torch.manual_seed(4)
    for heads, kv_heads, d, ffn, full in ((32, 32, 4096, 12288, True), (28, 4, 3584, 18944, False)):
        T, D = 257, 128
        x = torch.randn(1, T, d, dtype=dtype, device=DEV)
        r = torch.randn_like(x)
        w = (torch.rand(d, device=DEV) + 0.5).to(dtype)
        out, s = mk.rms_norm(x, w, 1e-6, residual=r, backend="triton")
        ref, ref_s = mk.rms_norm(x, w, 1e-6, residual=r, backend="torch")
        assert torch.equal(s, ref_s)
        assert_within_one_rounding(out, ref)
        q = torch.randn(1, T, heads * D, dtype=dtype, device=DEV)
        k = torch.randn(1, T, kv_heads * D, dtype=dtype, device=DEV)
        cos, sin = _tables(1, T, D, offset=32768)
        got = mk.rotary(q, k, cos, sin, head_dim=D, full_precision=full, backend="triton")
        exp = mk.rotary(q, k, cos, sin, head_dim=D, full_precision=full, backend="torch")
        assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])
        g = torch.randn(1, T, ffn, dtype=dtype, device=DEV) * 3
        u = torch.randn_like(g)
        assert_within_one_rounding(
            mk.silu_mul(g, u, backend="triton"), mk.silu_mul(g, u, backend="torch")
        )
