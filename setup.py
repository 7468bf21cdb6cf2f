"""Package layout for maskkv.

``maskkv`` (the framework) lives under ``python/``, ``maskkv_kernels`` (the ops) at the root.
The C++ sources under ``csrc/`` (the CPU kernels of the "cpp" backend) are compiled just in time
with ninja on first use (``maskkv_kernels/_cpp.py``); a wheel (``pip install .``) ships them as
``maskkv_kernels/csrc/``, so an installed package builds them the same way. ``MASKKV_BUILD_EXT=1
pip install .`` (or ``-e .``) builds them ahead of time into ``maskkv_kernels/_C*.so``, which is
then loaded instead.
"""

import os

from setuptools import find_packages, setup


def _ext_modules():
    if os.environ.get("MASKKV_BUILD_EXT") != "1":
        return []
    # Ahead-of-time build of csrc/ (off by default). Kept behind an env var so that a plain
    # `pip install -e .` never needs a compiler or a CUDA toolkit.
    import importlib.util

    from torch.utils.cpp_extension import CppExtension

    # The JIT build's flags (vector ISA of this machine), from maskkv_kernels/_cpp.py, loaded by
    # path: importing the package here would need its dependencies at build time.
    spec = importlib.util.spec_from_file_location("_maskkv_cpp_build", "maskkv_kernels/_cpp.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    sources = [os.path.join("csrc", f) for f in sorted(os.listdir("csrc")) if f.endswith(".cpp")]
    if not sources:
        return []
    return [CppExtension("maskkv_kernels._C", sources, extra_compile_args=build.build_flags())]


def _cmdclass():
    if os.environ.get("MASKKV_BUILD_EXT") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


setup(
    packages=find_packages(where="python")
    + find_packages(include=["maskkv_kernels", "maskkv_kernels.*"])
    + ["maskkv_kernels.csrc"],
    # csrc/ stays at the repository root (DESIGN.md's layout) and is installed inside the package.
    package_dir={"": "python", "maskkv_kernels": "maskkv_kernels", "maskkv_kernels.csrc": "csrc"},
    package_data={
        # The trained models of the quality suite (`maskkv eval`) and the lm-eval tasks over its
        # data (YAML + the utils.py their `!function` tags load).
        "maskkv": ["assets/*/*", "quality/lm_eval_tasks/*.yaml", "quality/lm_eval_tasks/*.py"],
        # The C++ sources of the "cpp" backend, compiled on first use where they are installed.
        "maskkv_kernels.csrc": ["*.cpp", "*.h"],
    },
    ext_modules=_ext_modules(),
    cmdclass=_cmdclass(),
)
