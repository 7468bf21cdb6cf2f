"""Public ``ragged_attention`` and its ``torch.library`` custom op ``maskkv::ragged_attention``."""

# No `from __future__ import annotations` here: torch.library infers the custom op's schema from
# real annotations (older torch releases cannot parse string annotations).
from typing import Optional

import torch

from .. import _checks as C
from .. import reference as _ref
from .._dispatch import resolve_backend
from .._ragged import RaggedKV
from .torch_impl import ragged_attention_torch, ragged_attention_varlen_torch

__all__ = ["ragged_attention"]


def _impl(backend: str):
    """The 4-D launcher of a resolved backend ("triton", "cpp" or "torch"), imported when used."""
    if backend == "triton":
        from .triton_ragged import ragged_attention_triton

        return ragged_attention_triton
    if backend == "cpp":
        from .cpp_impl import ragged_attention_cpp

        return ragged_attention_cpp
    return ragged_attention_torch


def _impl_varlen(backend: str):
    """The varlen launcher of a resolved backend ("triton", "cpp" or "torch")."""
    if backend == "triton":
        from .triton_ragged import ragged_attention_varlen_triton

        return ragged_attention_varlen_triton
    if backend == "cpp":
        from .cpp_impl import ragged_attention_varlen_cpp

        return ragged_attention_varlen_cpp
    return ragged_attention_varlen_torch


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
    seg_starts: Optional[torch.Tensor] = None,  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor]:
    """RaggedKV fields as tensors; ``backend`` is "triton", "cpp" or "torch" (already resolved).

    Returns (out [B, Hq, Lq, D] in q's dtype, lse fp32 [B, Hq, Lq], or [0] without return_lse).
    """
    impl = _impl(backend)
    out, lse = impl(
        q, k, v, cu_seqlens, max_seqlen, num_kv_heads, k_tail, v_tail, scale, return_lse,
        seg_starts=seg_starts,
    )  # fmt: skip
    if lse is None:
        lse = q.new_empty((0,), dtype=torch.float32)
    return out, lse


@_ragged_attention_op.register_fake
def _(
    q, k, v, cu_seqlens, max_seqlen, num_kv_heads, k_tail, v_tail, scale, return_lse, backend,
    seg_starts=None,
):  # fmt: skip
    B, Hq, Lq, D = q.shape
    out = q.new_empty((B, Hq, Lq, D))
    lse = q.new_empty((B, Hq, Lq) if return_lse else (0,), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("maskkv::ragged_attention_varlen", mutates_args=())
def _ragged_attention_varlen_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_starts: Optional[torch.Tensor],  # noqa: UP045
    max_seqlen: int,
    num_kv_heads: int,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    k_tail: Optional[torch.Tensor],  # noqa: UP045
    v_tail: Optional[torch.Tensor],  # noqa: UP045
    cu_seqlens_tail: Optional[torch.Tensor],  # noqa: UP045
    tail_starts: Optional[torch.Tensor],  # noqa: UP045
    max_seqlen_tail: int,
    scale: float,
    return_lse: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The varlen form with RaggedKV fields as tensors; ``backend`` already resolved.

    Returns (out [Nq, Hq, D] in q's dtype, lse fp32 [Nq, Hq], or [0] without return_lse).
    """
    out, lse = _impl_varlen(backend)(
        q, k, v, cu_seqlens, seg_starts, max_seqlen, num_kv_heads, cu_seqlens_q, max_seqlen_q,
        k_tail, v_tail, cu_seqlens_tail, tail_starts, max_seqlen_tail, scale, return_lse,
    )  # fmt: skip
    if lse is None:
        lse = q.new_empty((0,), dtype=torch.float32)
    return out, lse


@_ragged_attention_varlen_op.register_fake
def _(
    q, k, v, cu_seqlens, seg_starts, max_seqlen, num_kv_heads, cu_seqlens_q, max_seqlen_q,
    k_tail, v_tail, cu_seqlens_tail, tail_starts, max_seqlen_tail, scale, return_lse, backend,
):  # fmt: skip
    Nq, Hq, D = q.shape
    out = q.new_empty((Nq, Hq, D))
    lse = q.new_empty((Nq, Hq) if return_lse else (0,), dtype=torch.float32)
    return out, lse


def ragged_attention(
    q: torch.Tensor,
    cache: RaggedKV,
    k_tail: torch.Tensor | None = None,
    v_tail: torch.Tensor | None = None,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    cu_seqlens_tail: torch.Tensor | None = None,
    max_seqlen_tail: int | None = None,
    tail_starts: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each KV head's queries over [its kept prompt segment ‖ its tail].

    Non-causal, one softmax per query over the concatenated keys (never materialised). Two forms:

    - dense (one position for the whole batch): q [B, Hq, Lq, D], k_tail / v_tail
      [B, Hkv, Lt, D]; out [B, Hq, Lq, D].
    - varlen (``cu_seqlens_q`` given; FlashAttention's varlen convention): requests at different
      positions in one call. q [Nq, Hq, D] packs every request's queries, request b owning rows
      ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]``; k_tail / v_tail [Nt, Hkv, D] pack every
      request's tail (e.g. its response KV), request b's being ``cu_seqlens_tail[b + 1] -
      cu_seqlens_tail[b]`` rows starting at ``tail_starts[b]`` (default ``cu_seqlens_tail[b]``;
      with ``tail_starts`` the tails may sit anywhere in a pool). out [Nq, Hq, D]; rows past
      ``cu_seqlens_q[B]`` belong to no request and are 0 (so Nq may be padded to a bucket).

    Args:
        q: [B, Hq, Lq, D] or, with ``cu_seqlens_q``, [Nq, Hq, D] (any strides); Hq a multiple
            of ``cache.num_kv_heads``.
        cache: RaggedKV with B * Hkv segments of head dim D, same dtype/device as q; may be a
            view into a pool (``seg_starts``).
        k_tail, v_tail: optional keys/values appended to every segment of their request (the
            response of this denoising step); both or neither. Dense: [B, Hkv, Lt, D]; varlen:
            [Nt, Hkv, D] with ``cu_seqlens_tail``.
        cu_seqlens_q: int32 [B + 1] on q's device: selects the varlen form.
        max_seqlen_q: with ``cu_seqlens_q`` (required): an int >= every request's query count,
            known on the host (sizes grids without a device sync).
        cu_seqlens_tail: int32 [B + 1] on q's device, required with a varlen tail.
        max_seqlen_tail: optional host bound on a request's tail rows (default Nt).
        tail_starts: optional int64 [B] on q's device, first tail row of every request.
        scale: softmax scale, default D ** -0.5.
        return_lse: also return the fp32 natural-log log-sum-exp ([B, Hq, Lq] or [Nq, Hq]).
        backend: "auto" (Triton on CUDA, the C++ kernels on CPU, else torch), "triton", "cpp",
            "torch" or "reference".
        check_inputs: False skips validation and the custom-op dispatch and calls the backend
            directly: for hot loops whose inputs were built (and validated) by the caller, with
            ``backend`` already one of "triton" / "cpp" / "torch" / "reference" (``resolve_backend``).
            Wrong input is then undefined behaviour, so leave it True everywhere else.
    Returns:
        out in q's dtype and shape (0 for a head with no key at all), and with ``return_lse``
        also lse fp32 of q's shape without D (-inf for a head with no key).
    """
    varlen = dict(
        cu_seqlens_q=cu_seqlens_q,
        max_seqlen_q=max_seqlen_q,
        cu_seqlens_tail=cu_seqlens_tail,
        max_seqlen_tail=max_seqlen_tail,
        tail_starts=tail_starts,
    )
    if not check_inputs:
        return _ragged_attention_unchecked(
            q, cache, k_tail, v_tail, varlen, scale, return_lse, backend
        )
    if cu_seqlens_q is None:
        for arg, value in varlen.items():
            if value is not None:
                raise C.fail(arg, "None without cu_seqlens_q (the dense form)", C.describe(value))
        if isinstance(q, torch.Tensor) and q.dim() == 3:
            raise C.fail(
                "q", "a 4-D tensor [B, Hq, Lq, D] (or [Nq, Hq, D] with cu_seqlens_q)", C.describe(q)
            )
        B, Hq, Hkv, Lq, D, Lt = C.check_ragged_attention(q, cache, k_tail, v_tail)
    else:
        dims = C.check_ragged_attention_varlen(q, cache, k_tail, v_tail, **varlen)
        D = dims.D
        if k_tail is not None:  # the host bound, Nt when not given
            varlen["max_seqlen_tail"] = dims.max_seqlen_tail
    scale = C.check_scale(scale, D)
    if not isinstance(return_lse, bool):
        raise C.fail("return_lse", "a bool", repr(return_lse))
    backend = resolve_backend(backend, q.device)
    if backend == "triton" and D > 256:
        shape = "[B, Hq, Lq, D]" if cu_seqlens_q is None else "[Nq, Hq, D]"
        raise C.fail("q", f"{shape} with D <= 256 for backend='triton'", C.describe(q))
    return _ragged_attention_unchecked(
        q, cache, k_tail, v_tail, varlen, scale, return_lse, backend, op=True
    )


def _ragged_attention_unchecked(
    q, cache, k_tail, v_tail, varlen, scale, return_lse, backend, op=False
):
    """``ragged_attention`` minus validation (and, unless ``op``, the custom-op dispatch:
    about 10x less host time per call)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "reference":
        return _ref.ragged_attention(
            q, cache, k_tail, v_tail, **varlen, scale=scale, return_lse=return_lse
        )
    fields = (cache.k, cache.v, cache.cu_seqlens)
    if varlen["cu_seqlens_q"] is None:
        if k_tail is not None and k_tail.shape[2] == 0:
            k_tail = v_tail = None
        args = (
            q, *fields, cache.max_seqlen, cache.num_kv_heads, k_tail, v_tail, scale, return_lse
        )  # fmt: skip
        if op:
            out, lse = torch.ops.maskkv.ragged_attention(*args, backend, cache.seg_starts)
        else:
            out, lse = _impl(backend)(*args, seg_starts=cache.seg_starts)
    else:
        max_t = varlen["max_seqlen_tail"]
        if max_t is None:
            max_t = 0 if k_tail is None else k_tail.shape[0]
        args = (
            q, *fields, cache.seg_starts, cache.max_seqlen, cache.num_kv_heads,
            varlen["cu_seqlens_q"], varlen["max_seqlen_q"], k_tail, v_tail,
            varlen["cu_seqlens_tail"], varlen["tail_starts"], max_t, scale, return_lse,
        )  # fmt: skip
        if op:
            out, lse = torch.ops.maskkv.ragged_attention_varlen(*args, backend)
        else:
            out, lse = _impl_varlen(backend)(*args)
    return (out, lse) if return_lse else out
