"""Package layout for maskkv.

``maskkv`` (the framework) lives under ``python/``, ``maskkv_kernels`` (the ops) at the root.
CUDA C++ sources under ``csrc/`` are compiled just in time on first use; setting
``MASKKV_BUILD_EXT=1`` at install time is the hook for an ahead-of-time build.
"""

import os

from setuptools import find_packages, setup


def _ext_modules():
    if os.environ.get("MASKKV_BUILD_EXT") != "1":
        return []
    # Ahead-of-time build of csrc/ (off by default). Kept behind an env var so that a plain
    # `pip install -e .` never needs a compiler or a CUDA toolkit.
    from torch.utils.cpp_extension import CppExtension

    sources = [os.path.join("csrc", f) for f in sorted(os.listdir("csrc")) if f.endswith(".cpp")]
    return [CppExtension("maskkv_kernels._C", sources)] if sources else []


def _cmdclass():
    if os.environ.get("MASKKV_BUILD_EXT") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


setup(
    packages=find_packages(where="python")
    + find_packages(include=["maskkv_kernels", "maskkv_kernels.*"]),
    package_dir={"": "python", "maskkv_kernels": "maskkv_kernels"},
    # The tiny trained model of the quality suite (`maskkv eval`) and the lm-eval tasks over its
    # data (YAML + the utils.py their `!function` tags load) ship with the package.
    package_data={
        "maskkv": ["assets/*/*", "quality/lm_eval_tasks/*.yaml", "quality/lm_eval_tasks/*.py"]
    },
    ext_modules=_ext_modules(),
    cmdclass=_cmdclass(),
)
