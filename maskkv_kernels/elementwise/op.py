"""Public elementwise ops (``rms_norm``, ``rotary``, ``silu_mul``) and their ``torch.library``
custom ops ``maskkv::rms_norm`` / ``maskkv::rotary`` / ``maskkv::silu_mul`` (the Triton path)."""

# No `from __future__ import annotations` here: torch.library infers the custom ops' schemas
# from real annotations (older torch releases cannot parse string annotations).
from typing import Optional

import torch

from .. import _checks as C
from .._dispatch import interpreting, triton_available
from .torch_impl import rms_norm_torch, rotary_torch, silu_mul_torch

__all__ = ["rms_norm", "rotary", "silu_mul"]

_BACKENDS = ("auto", "triton", "torch", "reference")


def _resolve(backend: str, device: torch.device) -> str:
    """The backend to run: "auto" is Triton on CUDA, else the eager torch code ("reference" is
    the same code)."""
    if backend not in _BACKENDS:
        raise C.fail("backend", f"one of {_BACKENDS}", repr(backend))
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise C.fail("backend", "'auto' or 'torch' (Triton is not importable)", "'triton'")
        if device.type != "cuda" and not interpreting():
            raise C.fail(
                "backend",
                "'triton' only for CUDA tensors, or CPU tensors under TRITON_INTERPRET=1",
                f"'triton' with tensors on {device}",
            )
        return "triton"
    return "torch"


def _check_float(x: object, arg: str, shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in C.FLOAT_DTYPES:
        raise C.fail(arg, f"a float tensor {shape_doc} (fp32, fp16 or bf16)", C.describe(x))
    return x


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("maskkv::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor],  # noqa: UP045 (schema inference on torch < 2.5)
) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_elementwise import rms_norm_triton

    out, summed = rms_norm_triton(x, weight, eps, residual)
    return out, (summed if summed is not None else x.new_empty((0,)))


@_rms_norm_op.register_fake
def _(x, weight, eps, residual):
    return x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,))


@torch.library.custom_op("maskkv::rotary", mutates_args=())
def _rotary_op(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head_dim: int,
    full_precision: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_elementwise import rotary_triton

    return rotary_triton(q, k, cos, sin, head_dim, full_precision)


@_rotary_op.register_fake
def _(q, k, cos, sin, head_dim, full_precision):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("maskkv::silu_mul", mutates_args=())
def _silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from .triton_elementwise import silu_mul_triton

    return silu_mul_triton(gate.contiguous(), up.contiguous())


@_silu_mul_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


# ----------------------------------------------------------------------------- public


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm as LLaDA and Qwen2 compute it, optionally fused with the residual add before it.

    Args:
        x: [..., n] in fp32 / fp16 / bf16 (last dim contiguous for the Triton path).
        weight: [n], x's dtype. eps: added to the mean square.
        residual: optional, x's shape and dtype: the norm is then of s = x + residual.
        backend: "auto" (Triton on CUDA, else torch), "triton", "torch" or "reference".
        check_inputs: False skips validation (inputs built by the caller; hot loops).
    Returns:
        ``weight * round(s * rsqrt(mean(s^2) + eps))`` [..., n] in x's dtype; with ``residual``
        the tuple (that, s). Triton and torch agree to one rounding step of the dtype (the mean
        is summed in another order); s is bit-identical.
    """
    if check_inputs:
        _check_float(x, "x", "[..., n]")
        n = x.shape[-1]
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (n,):
            raise C.fail("weight", f"a tensor of shape [n={n}]", C.describe(weight))
        C.check_same("weight", weight, x, "x")
        if residual is not None:
            if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
                raise C.fail("residual", f"x's shape {tuple(x.shape)}", C.describe(residual))
            C.check_same("residual", residual, x, "x")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise C.fail("eps", "a non-negative float", repr(eps))
        backend = _resolve(backend, x.device)
        if backend == "triton":
            from .triton_elementwise import MAX_COLS

            if n > MAX_COLS:
                raise C.fail("x", f"[..., n] with n <= {MAX_COLS} for backend='triton'", n)
            out, summed = torch.ops.maskkv.rms_norm(x, weight, float(eps), residual)
            return out if residual is None else (out, summed)
    if backend == "triton":
        from .triton_elementwise import rms_norm_triton

        out, summed = rms_norm_triton(x, weight, eps, residual)
    else:
        out, summed = rms_norm_torch(x, weight, eps, residual)
    return out if residual is None else (out, summed)


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    head_dim: int,
    full_precision: bool = True,
    backend: str = "auto",
    check_inputs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q and k in one call, on the projections' own layout.

    Args:
        q: [B, T, Hq * D], k: [B, T, Hkv * D] (the q / k projection outputs; last dim
            contiguous), same dtype and device.
        cos, sin: fp32 [B or 1, T, D], last dim contiguous.
        head_dim: D (even).
        full_precision: rotate in fp32 and round once (LLaDA's ``rope_full_precision``);
            False casts the tables to the model dtype and rounds every product (Qwen2, Dream).
        backend, check_inputs: as for :func:`rms_norm`.
    Returns:
        (q, k) rotated, same shapes, contiguous; bit-identical between the backends.
    """
    if check_inputs:
        C.check_tensor(q, "q", "[B, T, Hq * D]", 3)
        C.check_tensor(k, "k", "[B, T, Hkv * D]", 3)
        B, T, _ = q.shape
        if not (isinstance(head_dim, int) and head_dim > 0 and head_dim % 2 == 0):
            raise C.fail("head_dim", "a positive even int", repr(head_dim))
        if q.shape[-1] % head_dim:
            raise C.fail("q", f"[B, T, Hq * D] with D={head_dim}", C.describe(q))
        if k.shape[:2] != (B, T) or k.shape[-1] % head_dim:
            raise C.fail("k", f"[B={B}, T={T}, Hkv * D] with D={head_dim}", C.describe(k))
        C.check_same("k", k, q, "q")
        for name, t in (("cos", cos), ("sin", sin)):
            C.check_tensor(t, name, "[B or 1, T, D]", 3, dtypes=(torch.float32,))
            if t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (T, head_dim):
                raise C.fail(name, f"fp32 [B={B} or 1, T={T}, D={head_dim}]", C.describe(t))
            C.check_same(name, t, q, "q", dtype=False)
            if t.stride(-1) != 1:
                raise C.fail(name, "a tensor whose last dim is contiguous", C.describe(t))
        backend = _resolve(backend, q.device)
        if backend == "triton":
            return torch.ops.maskkv.rotary(q, k, cos, sin, head_dim, bool(full_precision))
    if backend == "triton":
        from .triton_elementwise import rotary_triton

        return rotary_triton(q, k, cos, sin, head_dim, full_precision)
    return rotary_torch(q, k, cos, sin, head_dim, full_precision)


def silu_mul(
    gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto", check_inputs: bool = True
) -> torch.Tensor:
    """``F.silu(gate) * up`` (the SwiGLU product) in one pass.

    gate, up: same shape, dtype and device. Returns gate's shape and dtype, contiguous;
    Triton and torch agree to one rounding step (``exp`` differs in the last fp32 bit)."""
    if check_inputs:
        _check_float(gate, "gate", "[..., F]")
        if not isinstance(up, torch.Tensor) or up.shape != gate.shape:
            raise C.fail("up", f"gate's shape {tuple(gate.shape)}", C.describe(up))
        C.check_same("up", up, gate, "gate")
        backend = _resolve(backend, gate.device)
        if backend == "triton":
            return torch.ops.maskkv.silu_mul(gate, up)
    if backend == "triton":  # unchecked: the caller passes contiguous tensors
        from .triton_elementwise import silu_mul_triton

        return silu_mul_triton(gate, up)
    return silu_mul_torch(gate, up)
