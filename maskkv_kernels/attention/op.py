"""Public ``ragged_attention`` and its ``torch.library`` custom op ``maskkv::ragged_attention``."""

# No `from __future__ import annotations` here: torch.library infers the custom op's schema from
# real annotations (older torch releases cannot parse string annotations).
from typing import Optional

import torch

from .. import _checks as C
from .. import reference as _ref
from .._dispatch import resolve_backend
from .._ragged import RaggedKV
from .torch_impl import ragged_attention_torch

__all__ = ["ragged_attention"]


def _impl(backend: str):
    """The launcher of a resolved backend ("triton", "cpp" or "torch"), imported when used."""
    if backend == "triton":
        from .triton_ragged import ragged_attention_triton

        return ragged_attention_triton
    if backend == "cpp":
        from .cpp_impl import ragged_attention_cpp

        return ragged_attention_cpp
    return ragged_attention_torch


@torch.library.custom_op("maskkv::ragged_attention", mutates_args=())
def _ragged_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    num_kv_heads: int,
    k_tail: Optional[torch.Tensor],  # noqa: UP045 (schema inference on torch < 2.5)
    v_tail: Optional[torch.Tensor],  # noqa: UP045
    scale: float,
    return_lse: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RaggedKV fields as tensors; ``backend`` is "triton", "cpp" or "torch" (already resolved).

    Returns (out [B, Hq, Lq, D] in q's dtype, lse fp32 [B, Hq, Lq], or [0] without return_lse).
    """
    impl = _impl(backend)
    out, lse = impl(
        q, k, v, cu_seqlens, max_seqlen, num_kv_heads, k_tail, v_tail, scale, return_lse
    )
    if lse is None:
        lse = q.new_empty((0,), dtype=torch.float32)
    return out, lse


@_ragged_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, num_kv_heads, k_tail, v_tail, scale, return_lse, backend):
    B, Hq, Lq, D = q.shape
    out = q.new_empty((B, Hq, Lq, D))
    lse = q.new_empty((B, Hq, Lq) if return_lse else (0,), dtype=torch.float32)
    return out, lse


def ragged_attention(
    q: torch.Tensor,
    cache: RaggedKV,
    k_tail: torch.Tensor | None = None,
    v_tail: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each KV head's queries over [its kept prompt segment ‖ the dense tail].

    Non-causal, one softmax per query over the concatenated keys (never materialised).

    Args:
        q: [B, Hq, Lq, D] queries (any strides); Hq a multiple of ``cache.num_kv_heads``.
        cache: RaggedKV with B * Hkv segments of head dim D, same dtype/device as q.
        k_tail, v_tail: optional [B, Hkv, Lt, D] dense keys/values appended to every segment
            (the response of this denoising step); both or neither.
        scale: softmax scale, default D ** -0.5.
        return_lse: also return the fp32 natural-log log-sum-exp [B, Hq, Lq].
        backend: "auto" (Triton on CUDA, the C++ kernels on CPU, else torch), "triton", "cpp",
            "torch" or "reference".
        check_inputs: False skips validation and the custom-op dispatch and calls the backend
            directly: for hot loops whose inputs were built (and validated) by the caller, with
            ``backend`` already one of "triton" / "cpp" / "torch" / "reference" (``resolve_backend``).
            Wrong input is then undefined behaviour, so leave it True everywhere else.
    Returns:
        out [B, Hq, Lq, D] in q's dtype (0 for a head with no key at all), and with
        ``return_lse`` also lse [B, Hq, Lq] fp32 (-inf for a head with no key).
    """
    if not check_inputs:
        return _ragged_attention_unchecked(q, cache, k_tail, v_tail, scale, return_lse, backend)
    B, Hq, Hkv, Lq, D, Lt = C.check_ragged_attention(q, cache, k_tail, v_tail)
    scale = C.check_scale(scale, D)
    if not isinstance(return_lse, bool):
        raise C.fail("return_lse", "a bool", repr(return_lse))
    backend = resolve_backend(backend, q.device)
    if backend == "reference":
        return _ref.ragged_attention(q, cache, k_tail, v_tail, scale=scale, return_lse=return_lse)
    if backend == "triton" and D > 256:
        raise C.fail("q", "[B, Hq, Lq, D] with D <= 256 for backend='triton'", C.describe(q))
    if Lt == 0:
        k_tail = v_tail = None
    out, lse = torch.ops.maskkv.ragged_attention(
        q,
        cache.k,
        cache.v,
        cache.cu_seqlens,
        cache.max_seqlen,
        Hkv,
        k_tail,
        v_tail,
        scale,
        return_lse,
        backend,
    )
    return (out, lse) if return_lse else out


def _ragged_attention_unchecked(q, cache, k_tail, v_tail, scale, return_lse, backend):
    """``ragged_attention`` minus validation and dispatch (about 10x less host time per call)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "reference":
        return _ref.ragged_attention(q, cache, k_tail, v_tail, scale=scale, return_lse=return_lse)
    if k_tail is not None and k_tail.shape[2] == 0:
        k_tail = v_tail = None
    impl = _impl(backend)
    out, lse = impl(
        q, cache.k, cache.v, cache.cu_seqlens, cache.max_seqlen, cache.num_kv_heads, k_tail,
        v_tail, scale, return_lse,
    )  # fmt: skip
    return (out, lse) if return_lse else out
