"""Build and load the C++ CPU kernels of ``csrc/`` (the ``"cpp"`` backend).

The kernels register the ``torch.ops.maskkv_cpp`` operator library. They are found, in order:

1. built ahead of time into ``maskkv_kernels/_C*.so`` (``MASKKV_BUILD_EXT=1 pip install .``);
2. built just in time with ``torch.utils.cpp_extension.load`` and ninja, once per source version,
   under ``$TORCH_EXTENSIONS_DIR/maskkv`` or else ``$XDG_CACHE_HOME/maskkv`` (``~/.cache/maskkv``).
   Later processes load the cached library without compiling.

The sources are ``csrc/`` next to the package in a source checkout, and ``maskkv_kernels/csrc/``
inside it where it was installed from a wheel (``setup.py`` ships them there). The cache entry's
name hashes their content (not their path), so both layouts share one build.

A missing compiler (or a failed build) is remembered: ``backend="auto"`` then falls back to the
torch backend with one warning, and ``backend="cpp"`` raises :class:`CppBackendUnavailable`
saying why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

__all__ = [
    "CppBackendUnavailable",
    "available",
    "last_dim_contiguous",
    "load",
    "unavailable_reason",
]

_SOURCES = ("select_cpu.cpp", "ragged_attention_cpu.cpp", "register_cpu.cpp")
_HEADERS = ("maskkv_cpu.h", "tile_products_cpu.h", "amx_tiles_cpu.h")


def _find_csrc() -> Path:
    """The C++ sources: inside the installed package, else next to it (a source checkout)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in (*_SOURCES, *_HEADERS)):
            return candidate
    return package / "csrc"  # where a wheel puts them: named in the error when missing


_CSRC = _find_csrc()


class CppBackendUnavailable(RuntimeError):
    """The C++ CPU kernels cannot be built or loaded here (the message says why)."""


def _ops_registered() -> bool:
    try:
        return hasattr(torch.ops.maskkv_cpp, "score_keys")
    except (AttributeError, RuntimeError):
        return False


def _cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / "maskkv"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "maskkv"


def _cpu_flags() -> list[str]:
    """Vector ISA flags for this machine (the JIT build runs where the kernels run).

    ``CPU_CAPABILITY_*`` selects the matching ``at::vec`` implementation (AVX-512 / AVX2);
    elsewhere at::vec falls back to its portable loops. Where the CPU has AMX (amx_tile,
    amx_bf16, avx512_bf16), bf16 inputs take the AMX tile products of amx_tiles_cpu.h."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((x for x in cpuinfo.splitlines() if x.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= have:
        isa = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
        if {"amx_tile", "amx_bf16", "avx512_bf16"} <= have:
            isa += ["-mamx-tile", "-mamx-bf16", "-mavx512bf16"]
        return isa + ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if {"avx2", "fma"} <= have:
        return ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def build_flags() -> list[str]:
    """Extra C++ flags of the build (shared with setup.py's ahead-of-time build)."""
    # torch's vec headers carry `#pragma unroll`, which g++ ignores noisily under -Wall.
    return ["-O3", "-Wno-unknown-pragmas", *_cpu_flags()]


def _find_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _load_prebuilt() -> bool:
    spec = importlib.util.find_spec("maskkv_kernels._C")
    if spec is None or not spec.origin:
        return False
    torch.ops.load_library(spec.origin)
    return _ops_registered()


def _jit_build() -> None:
    compiler = _find_compiler()
    if compiler is None:
        raise CppBackendUnavailable(
            "no C++ compiler found (looked for $CXX, c++, g++, clang++): install one (e.g. "
            "`apt install g++`) to build the 'cpp' backend, or use backend='torch'"
        )
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as e:
        raise CppBackendUnavailable(
            f"ninja is required to build the 'cpp' backend ({e}): `pip install ninja`"
        ) from None
    flags = build_flags()
    digest = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS):
        digest.update((_CSRC / name).read_bytes())
    digest.update(" ".join([torch.__version__, sys.version, compiler, *flags]).encode())
    name = f"maskkv_cpu_{digest.hexdigest()[:12]}"
    build_dir = _cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{name}.so"
    if library.exists() and not (build_dir / "lock").exists():  # no build under way
        # A finished build of exactly these sources and flags (the name hashes them): load it
        # without running ninja, whose build file names the source paths of the process that
        # built it (a checkout and an installed wheel would otherwise rebuild each other's).
        try:
            torch.ops.load_library(str(library))
            return
        except OSError:
            pass  # a damaged library: rebuilt below
    if not library.exists():
        print(
            f"maskkv: compiling the C++ CPU kernels with {Path(compiler).name} (once, about a "
            f"minute) into {build_dir} ...",
            file=sys.stderr,
            flush=True,
        )
    try:
        cpp_extension.load(
            name=name,
            sources=[str(_CSRC / s) for s in _SOURCES],
            extra_cflags=flags,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # compiler errors arrive as RuntimeError / CalledProcessError
        raise CppBackendUnavailable(
            f"building the C++ CPU kernels with {compiler} failed: {e}"
        ) from None


_UNTRIED = "not tried yet"
_reason: str | None = _UNTRIED  # the outcome of the one build/load attempt of this process


def _load_once() -> str | None:
    """None once the ops are registered, else the reason they cannot be (cached per process in a
    module global, which torch.compile reads as a constant instead of tracing the build)."""
    global _reason
    if _reason is _UNTRIED:
        _reason = _try_load()
    return _reason


def _try_load() -> str | None:
    if _ops_registered():
        return None
    try:
        if _load_prebuilt():
            return None
        if not all((_CSRC / name).is_file() for name in (*_SOURCES, *_HEADERS)):
            return f"the C++ sources ({_CSRC}) are not installed and no prebuilt library exists"
        _jit_build()
    except CppBackendUnavailable as e:
        return str(e)
    except OSError as e:
        return f"loading the C++ CPU kernels failed: {e}"
    return None if _ops_registered() else "the C++ CPU kernels loaded but registered no ops"


def unavailable_reason() -> str | None:
    """Build/load the kernels if needed; None when they are ready, else why not."""
    return _load_once()


def available() -> bool:
    """True when ``torch.ops.maskkv_cpp`` is ready (builds it on first call)."""
    return _load_once() is None


def load() -> None:
    """Make ``torch.ops.maskkv_cpp`` ready or raise :class:`CppBackendUnavailable`."""
    reason = _load_once()
    if reason is not None:
        raise CppBackendUnavailable(reason)


_warned = False


def warn_fallback() -> None:
    """One warning per process when backend='auto' cannot use the C++ kernels."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"maskkv_kernels: the 'cpp' CPU backend is unavailable ({unavailable_reason()}); "
        "falling back to backend='torch'",
        RuntimeWarning,
        stacklevel=4,
    )


def last_dim_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    """The one stride policy of both C++ adapters: the kernels read rows with any outer strides
    but need unit stride along D, so such a view is copied; a tensor without elements passes as
    it is (``contiguous()`` returns it unchanged, and the kernels read nothing from it)."""
    if x is None or x.shape[-1] <= 1 or x.stride(-1) == 1:
        return x
    return x.contiguous()
