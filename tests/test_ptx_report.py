"""No Triton kernel variant the launchers pick at the LLaDA-8B / Dream-7B shapes may spill registers,
use an instruction its architecture lacks or need more shared memory than it has, on the H100 /
H200 (sm_90a) and on the paper's GPUs, the A100 (sm_80) and the RTX 4090 (sm_89). Compiled ahead
of time by ``benchmarks/ptx_report.py`` with Triton's bundled ptxas (no GPU needed); results are
cached per kernel source and specialisation, so a rerun compiles only what changed.

Profiles (``MASKKV_PTX``):

- ``defaults`` (default, ~1 min cold on 2 cores for the three architectures): what the shipped
  defaults launch at the Dream-7B shape (GQA, G = 7) in bf16, every autotune config of it
  (``ptx_report.py --variants defaults --models dream-7b``).
- ``all``: both models (LLaDA-8B's G = 1 is a separate specialisation) in bf16 and fp16, and
  every selectable alternative: the other pass-2 score kernel, the serial and fused
  compactions, the "grid" split-K planner, ``ROW_TILE = 128``, ``ragged_attention``'s LSE
  output (``--variants all``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PROFILE = os.environ.get("MASKKV_PTX", "defaults")
if PROFILE not in ("defaults", "all"):
    raise ValueError(f"MASKKV_PTX: expected 'defaults' or 'all', got {PROFILE!r}")
# Kernel families every profile must show (the interception really ran the launchers), and those
# only the alternatives launch.
FAMILIES = ("_lse_kernel", "_score_kernel", "_score_kstream_kernel",
            "_score_rows_combine_kernel", "_pool_kernel", "_radix_hist_kernel",
            "_radix_level_kernel", "_compact_kernel", "_gather_rows_kernel", "_ragged_attn_fwd",
            "_ragged_attn_combine_items", "_rms_norm_kernel", "_rotary_kernel",
            "_silu_mul_kernel")  # fmt: skip
ALTERNATIVE_FAMILIES = ("_gather_kernel", "_topk_rows_kernel", "_ragged_attn_combine")


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia import compiler

        if hasattr(compiler, "get_ptxas"):
            return all(Path(compiler.get_ptxas(cc).path).exists() for cc in (80, 90))
        return Path(compiler._path_to_binary("ptxas")[0]).exists()
    except Exception:
        return False


needs_ptxas = pytest.mark.skipif(
    not _ptxas_available(), reason="Triton's bundled ptxas is not available"
)


@needs_ptxas
@pytest.mark.parametrize("arch", ["90a", "80", "89"])
def test_no_picked_variant_spills_or_lacks_support(tmp_path, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    out = tmp_path / "variants.json"
    if PROFILE == "defaults":
        shapes = ["--models", "dream-7b", "--dtypes", "bfloat16"]
    else:
        shapes = ["--models", "llada-8b", "dream-7b", "--dtypes", "bfloat16", "float16"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ptx_report.py"), *shapes, "--archs", arch,
         "--prompt-len", "32768", "--variants", PROFILE, "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    variants = json.loads(out.read_text()) if out.exists() else []
    assert variants, run.stdout[-2000:] + run.stderr[-2000:]
    assert {v["arch"] for v in variants} == {arch}
    kernels = {v["kernel"] for v in variants}
    for name in FAMILIES + (ALTERNATIVE_FAMILIES if PROFILE == "all" else ()):
        assert name in kernels, name
    if PROFILE == "defaults":  # the alternatives are left out
        assert not kernels & set(ALTERNATIVE_FAMILIES), kernels & set(ALTERNATIVE_FAMILIES)
    failed = [v for v in variants if v["error"]]
    spilling = [v for v in variants if v["spill_stores"] > 0 or v["spill_loads"] > 0]
    newer = [v for v in variants if v["hopper_only"] and arch != "90a"]
    assert not failed, failed[:3]
    assert not spilling, spilling[:3]
    assert not newer, newer[:3]
    assert run.returncode == 0, run.stdout[-2000:]  # also: every kernel fits the shared memory


def test_report_detects_what_it_must():
    """The report's detectors on ptxas / PTX text: spills parsed, Hopper-only instructions
    found, an autotuned launch over the shared memory only when no config fits."""
    import ptx_report as pr

    fields = {}
    pr._parse_ptxas("ptxas info    : Used 255 registers, 92 bytes spill stores, 104 bytes "
                    "spill loads\n", fields)  # fmt: skip
    assert (fields["registers"], fields["spill_stores"], fields["spill_loads"]) == (255, 92, 104)
    ptx = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16 {...};\n mma.sync.aligned.m16n8k16"
    assert pr.HOPPER_ONLY.findall(ptx) == ["wgmma.mma_async"]
    assert not pr.HOPPER_ONLY.findall("mma.sync.aligned.m16n8k16.row.col cp.async.ca.shared")

    def var(arch, tuned, shared, bn=64):
        return pr.Variant("k", "case", {"BLOCK_N": bn}, 4, 3, arch, tuned, shared=shared,
                          smem_limit=pr.ARCHS[arch][1], registers=100, spill_stores=0,
                          spill_loads=0)  # fmt: skip

    ok = [var("89", True, 150000, 128), var("89", True, 60000, 32)]  # the autotuner skips one
    assert not any(pr.problems(ok).values())
    over = [var("89", True, 150000, 128), var("89", True, 110000, 64), var("80", False, 170000)]
    found = pr.problems(over)["over the shared memory"]
    assert {v.arch for v in found} == {"89", "80"}
    hopper = pr.Variant("k", "c", {}, 4, 3, "80", hopper_only=("wgmma.mma_async",))
    assert pr.problems([hopper])["Hopper-only instructions"] == [hopper]
