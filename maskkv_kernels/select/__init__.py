"""select_and_gather and its steps (placeholder wiring to the reference; replaced by the fused op)."""

from .. import reference as _ref
from .._dispatch import resolve_backend


def _wrap(name):
    fn = getattr(_ref, name)

    def op(*args, backend: str = "auto", **kwargs):
        resolve_backend(backend, args[0].device)
        return fn(*args, **kwargs)

    op.__name__ = name
    op.__doc__ = fn.__doc__
    return op


select_and_gather = _wrap("select_and_gather")
mask_scores = _wrap("mask_scores")
window_scores = _wrap("window_scores")
topk_gather = _wrap("topk_gather")
