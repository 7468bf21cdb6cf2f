"""ragged_attention (placeholder wiring to the reference; replaced by the Triton op)."""

from .. import reference as _ref
from .._dispatch import resolve_backend


def ragged_attention(q, cache, k_tail=None, v_tail=None, *, scale=None, return_lse=False, backend="auto"):
    resolve_backend(backend, q.device)
    return _ref.ragged_attention(q, cache, k_tail, v_tail, scale=scale, return_lse=return_lse)
