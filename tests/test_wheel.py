"""The wheel that ``pip install .`` builds, installed away from this source tree, runs the C++
backend and finds the shipped models and lm-eval task files.

The installed copy compiles its C++ sources on first use like a checkout; the build cache entry
is named by the sources' content, not their path, so the installed copy loads the library that
this test session has built (``_cpp.load()`` first) instead of compiling it again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from maskkv_kernels import _cpp

ROOT = Path(__file__).resolve().parent.parent

# Runs in the installed copy: where everything came from, and one C++ op against torch.
CHECK_INSTALLED = """
import json, sys
import torch
import maskkv, maskkv_kernels as mk
from maskkv_kernels import _cpp
from maskkv.eval_harness import TASKS_DIR
from maskkv.quality.evaluate import ASSETS

_cpp.load()
g = torch.Generator().manual_seed(0)
q, k = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
lens = torch.tensor([37, 20])
runs = {
    backend: mk.select_and_gather(
        q, k, k, 6, prompt_len=37, prompt_lens=lens, head_budget="adakv", backend=backend,
        return_scores=True,
    )
    for backend in ("cpp", "torch")
}
(cache, scores), (want, want_scores) = runs["cpp"], runs["torch"]
torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-6)
assert torch.equal(cache.positions, want.positions), "cpp and torch keep different rows"
model = maskkv.load_checkpoint(ASSETS / "tiny-llada-kv")
print(json.dumps({
    "maskkv": maskkv.__file__,
    "maskkv_kernels": mk.__file__,
    "csrc": str(_cpp._CSRC),
    "kept": cache.positions.numel(),
    "assets": sorted(p.name for p in ASSETS.iterdir()),
    "model_layers": model.config.num_hidden_layers,
    "tasks": sorted(p.name for p in TASKS_DIR.iterdir()),
}))
"""


def _copy_sources(dst: Path) -> None:
    """What a `pip install .` of a clone sees (pip builds in the tree: keep ours clean)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "build", "*.egg-info")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    for name in ("maskkv_kernels", "python", "csrc"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)


@pytest.mark.slow
@pytest.mark.skipif(_cpp._find_compiler() is None, reason="no C++ compiler for the 'cpp' backend")
def test_wheel_runs_cpp_backend_from_its_install_location(tmp_path):
    _cpp.load()  # the shared build cache entry the installed copy will find
    src, dist, site = tmp_path / "src", tmp_path / "dist", tmp_path / "site"
    src.mkdir()
    _copy_sources(src)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MASKKV_BUILD_EXT")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src],
        check=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = dist.glob("maskkv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"maskkv_kernels/csrc/{n}" for n in (*_cpp._SOURCES, *_cpp._HEADERS)}
    assert shipped <= names, f"C++ sources missing from the wheel: {shipped - names}"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", site, wheel],
        check=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    # The installed copy only: PYTHONPATH comes before site-packages (whose editable install of
    # this tree, if any, is a finder consulted after the path), and the cwd is not the tree.
    run = subprocess.run(
        [sys.executable, "-c", CHECK_INSTALLED],
        env={**env, "PYTHONPATH": str(site)}, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compiling" not in run.stderr, "the installed copy rebuilt the cached kernels"
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for key in ("maskkv", "maskkv_kernels", "csrc"):
        assert Path(got[key]).is_relative_to(site), f"{key} came from {got[key]}, not the wheel"
    assert got["kept"] > 0
    assert {"tiny-llada-kv", "tiny-dream-kv"} <= set(got["assets"])
    assert got["model_layers"] > 0
    tasks = sorted(p.name for p in (ROOT / "python/maskkv/quality/lm_eval_tasks").iterdir())
    assert [t for t in tasks if t != "__pycache__"] == [
        t for t in got["tasks"] if t != "__pycache__"
    ]
