"""Backend resolution shared by the public ops."""

from __future__ import annotations

import functools
import os

import torch

from . import _checks as C
from . import _cpp


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on an unsupported platform
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels through its NumPy interpreter (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` to one of "triton", "cpp", "torch", "reference" for tensors on ``device``.

    "auto" is Triton on CUDA (when Triton imports), the C++ kernels on CPU (built with ninja on
    first use; where they cannot be built, the torch path with one warning), else the vectorised
    torch path. An explicit "triton" on CPU tensors needs ``TRITON_INTERPRET=1`` (set before
    Triton is imported); an explicit "cpp" needs CPU tensors and raises
    :class:`~maskkv_kernels._cpp.CppBackendUnavailable` naming what is missing (e.g. the
    compiler) when the kernels cannot be built.
    """
    C.check_backend(backend)
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_available() else "torch"
        if device.type == "cpu":
            if _cpp.available():
                return "cpp"
            _cpp.warn_fallback()
        return "torch"
    if backend == "cpp":
        if device.type != "cpu":
            raise C.fail("backend", "'cpp' only for CPU tensors", f"'cpp' with tensors on {device}")
        _cpp.load()
    if backend == "triton":
        if not triton_available():
            raise C.fail(
                "backend", "'auto', 'torch' or 'reference' (Triton is not importable)", "'triton'"
            )
        if device.type != "cuda" and not interpreting():
            raise C.fail(
                "backend",
                "'triton' only for CUDA tensors, or CPU tensors under TRITON_INTERPRET=1",
                f"'triton' with tensors on {device}",
            )
    return backend
