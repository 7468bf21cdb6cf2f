"""No Triton kernel variant the launchers pick at the LLaDA-8B / Dream-7B shapes may spill
registers on sm_90a. Compiled ahead of time by ``benchmarks/ptx_report.py`` (no GPU needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia import compiler

        if hasattr(compiler, "get_ptxas"):
            return Path(compiler.get_ptxas(90).path).exists()
        return Path(compiler._path_to_binary("ptxas")[0]).exists()
    except Exception:
        return False


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas is not available")
def test_no_picked_bf16_variant_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "variants.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ptx_report.py"), "--dtypes", "bfloat16",
         "--prompt-len", "32768", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    variants = json.loads(out.read_text()) if out.exists() else []
    assert variants, run.stdout[-2000:] + run.stderr[-2000:]
    kernels = {v["kernel"] for v in variants}
    # Every kernel family of both ops was seen (the interception really ran the launchers).
    for name in ("_lse_kernel", "_score_kernel", "_score_kstream_kernel",
                 "_score_rows_combine_kernel", "_radix_hist_kernel", "_gather_kernel",
                 "_pool_kernel", "_ragged_attn_fwd", "_ragged_attn_combine_items",
                 "_radix_level_kernel", "_compact_kernel", "_gather_rows_kernel"):  # fmt: skip
        assert name in kernels, name
    failed = [v for v in variants if v["error"]]
    spilling = [v for v in variants if v["spill_stores"] > 0 or v["spill_loads"] > 0]
    assert not failed, failed[:3]
    assert not spilling, spilling[:3]
    assert run.returncode == 0, run.stdout[-2000:]
