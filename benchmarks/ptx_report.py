"""Compile report for sm_90a without a GPU: registers, spills and shared memory of every Triton
kernel variant the launchers pick at the LLaDA-8B and Dream-7B shapes.

    python benchmarks/ptx_report.py                 # bf16 + fp16, both models, full table
    python benchmarks/ptx_report.py --dtypes bfloat16 --models llada-8b --json out.json

How: the real launchers (``score_keys``, ``pool_window``, ``topk_gather``,
``ragged_attention_triton``) run on CPU tensors at the real shapes with every kernel launch
intercepted: a plain launch records its arguments, an autotuned one records one variant per
config. The GPU-only planning (SM count, split-K) is told it runs on a 132-SM H100/H200. Each
recorded variant is compiled ahead of time (``triton.compile`` for ``GPUTarget("cuda", 90)``,
with the launch's 16-byte divisibility hints) and its PTX is run through Triton's bundled
``ptxas -v``. Exit status 1 when a variant spills (``--allow-spills`` reports only).

Works on Triton 3.6 and 3.9 (``TRITON_INTERPRET`` must be unset: the interpreter has no
autotune configs). No kernel runs, so this needs no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

SM_COUNT = 132
MODELS = {"llada-8b": (32, 32, 128), "dream-7b": (28, 4, 128)}  # Hq, Hkv, D

_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int64: "i64",
    torch.int8: "i8",
    torch.bool: "i1",
}


@dataclass
class Variant:
    kernel: str
    case: str
    constexprs: dict
    num_warps: int
    num_stages: int
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared: int = -1
    error: str = ""


# ----------------------------------------------------------------------------- interception


class _Recorder:
    """Collects (fn, args, constexprs, warps, stages) of every launch instead of running it."""

    def __init__(self) -> None:
        self.launches: list[tuple] = []
        self.case = ""

    @contextlib.contextmanager
    def active(self):
        rec = self
        jit_run, tune_run = JITFunction.run, Autotuner.run

        def run_jit(fn, *args, grid=None, warmup=False, **kwargs):
            warps = kwargs.pop("num_warps", 4)
            stages = kwargs.pop("num_stages", 3)
            rec.launches.append((rec.case, fn, args, kwargs, warps, stages))

        def run_tuned(tuner, *args, **kwargs):
            for cfg in tuner.configs:
                meta = {**kwargs, **cfg.kwargs}
                rec.launches.append((rec.case, tuner.fn, args, meta, cfg.num_warps, cfg.num_stages))

        JITFunction.run, Autotuner.run = run_jit, run_tuned
        try:
            yield
        finally:
            JITFunction.run, Autotuner.run = jit_run, tune_run


@contextlib.contextmanager
def _as_if_on_gpu():
    """The launchers' GPU-only planning, fed a 132-SM device (inputs are CPU tensors here)."""
    from maskkv_kernels.attention import triton_ragged
    from maskkv_kernels.select import triton_scores, triton_topk

    gpu = torch.device("cuda", 0)
    saved = (
        triton_scores._sm_count,
        triton_topk._sm_count if hasattr(triton_topk, "_sm_count") else None,
        triton_ragged._num_sms,
        triton_ragged._plans_splits,
        triton_scores._num_splits,
        triton_topk._chunk_size,
    )
    num_splits, chunk_size = triton_scores._num_splits, triton_topk._chunk_size
    triton_scores._sm_count = lambda index: SM_COUNT
    if saved[1] is not None:
        triton_topk._sm_count = lambda index: SM_COUNT
    triton_ragged._num_sms = lambda index: SM_COUNT
    triton_ragged._plans_splits = lambda t: True
    triton_scores._num_splits = lambda bh, gm, key_end, device: num_splits(bh, gm, key_end, gpu)
    triton_topk._chunk_size = lambda P, rows, device: chunk_size(P, rows, gpu)
    try:
        yield
    finally:
        (
            triton_scores._sm_count,
            sm_topk,
            triton_ragged._num_sms,
            triton_ragged._plans_splits,
            triton_scores._num_splits,
            triton_topk._chunk_size,
        ) = saved
        if sm_topk is not None:
            triton_topk._sm_count = sm_topk


def record_launches(models: list[str], dtypes: list[torch.dtype], prompt_len: int) -> _Recorder:
    """Run the launchers at the models' shapes (step 1 selection, later-step attention)."""
    from maskkv_kernels.attention import triton_ragged
    from maskkv_kernels.select import triton_scores, triton_topk

    rec = _Recorder()
    with _as_if_on_gpu(), rec.active():
        for name in models:
            Hq, Hkv, D = MODELS[name]
            G = Hq // Hkv
            R = 256 + (1 if name.startswith("dream") else 0)  # Dream: + the last prompt position
            P, L, budget = prompt_len, prompt_len + R, 256
            for dtype in dtypes:
                tag = f"{name} {str(dtype).split('.')[-1]}"
                q = torch.empty(1, Hq, R, D, dtype=dtype)
                k = torch.empty(1, Hkv, L, D, dtype=dtype)
                first = torch.zeros(1, dtype=torch.int32)
                lse = torch.empty(1, Hq, R, dtype=torch.float32)
                for window, with_lse in ((False, False), (False, True), (True, False)):
                    rec.case = f"{tag} select {'window' if window else 'mask'}" + (
                        " +lse" if with_lse else ""
                    )
                    qs = q[:, :, :32] if window else q
                    for kernel in ("key_resident", "k_streaming"):
                        scores, _ = triton_scores.score_keys(
                            qs, k, first, prompt_len=P, window=window,
                            lse=lse if with_lse else None, scale=D**-0.5, need_mass=not window,
                            kernel=kernel,
                        )  # fmt: skip
                    if window:
                        triton_scores.pool_window(scores, first, 32, "max", 7)
                budgets = torch.full((1, Hkv), budget, dtype=torch.int32)
                cu = torch.arange(Hkv + 1, dtype=torch.int32) * budget
                for compaction in ("serial", "parallel"):
                    rec.case = f"{tag} topk_gather {compaction}"
                    triton_topk.topk_gather(
                        torch.empty(1, Hkv, P),
                        k,
                        k,
                        budgets,
                        first,
                        cu,
                        Hkv * budget,
                        compaction=compaction,
                    )
                n = Hkv * budget
                kr = torch.empty(n, D, dtype=dtype)
                for splits, planner in ((1, None), (4, "worklist"), (4, "grid")):
                    for store_lse in (False, True):
                        rec.case = f"{tag} ragged splits={splits} {planner or ''} lse={store_lse}"
                        triton_ragged.ragged_attention_triton(
                            q, kr, kr, cu, budget * 32, Hkv, q[:, ::G], q[:, ::G], D**-0.5,
                            store_lse, num_splits=splits, planner=planner,
                        )  # fmt: skip
                # Serving: 4 requests of R queries each in one varlen call (packed q and tails).
                nb = 4
                qv = torch.empty(nb * R, Hq, D, dtype=dtype)
                tv = torch.empty(nb * R, Hkv, D, dtype=dtype)
                kv = torch.empty(nb * n, D, dtype=dtype)
                cu_kv = torch.arange(nb * Hkv + 1, dtype=torch.int32) * budget
                cu_r = torch.arange(nb + 1, dtype=torch.int32) * R
                # Two of the four (split, lse) variants: the lightest and the heaviest one.
                for splits, store_lse in ((1, False), (4, True)):
                    rec.case = f"{tag} ragged varlen splits={splits} lse={store_lse}"
                    triton_ragged.ragged_attention_varlen_triton(
                        qv, kv, kv, cu_kv, None, budget * 32, Hkv, cu_r, R, tv, tv, cu_r, None, R,
                        D**-0.5, store_lse, num_splits=splits,
                    )  # fmt: skip
    return rec


# ----------------------------------------------------------------------------- compile + ptxas


def _signature(fn: JITFunction, args: tuple, meta: dict):
    """(signature, constexprs, attrs) of one launch, as the JIT would specialise it."""
    signature, constexprs, attrs = {}, {}, {}
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update(meta)
    for i, name in enumerate(names):
        value = values[name]
        param = fn.params[i]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif value is None:
            signature[name] = "constexpr"
            constexprs[name] = None
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # the JIT specialises ints equal to 1 into constants
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}.{name}: cannot type {type(value).__name__}")
    return signature, constexprs, attrs


def _ptxas() -> str:
    from triton.backends.nvidia import compiler

    if hasattr(compiler, "get_ptxas"):  # Triton 3.9
        return compiler.get_ptxas(90).path
    return compiler._path_to_binary("ptxas")[0]  # Triton 3.6


def compile_variant(fn, args, meta, warps, stages, case) -> Variant:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    signature, constexprs, attrs = _signature(fn, args, meta)
    shown = {k: v for k, v in constexprs.items() if v is not None and k.isupper()}
    var = Variant(fn.__name__, case, shown, warps, stages)
    try:
        target = GPUTarget("cuda", 90, 32)
        backend = make_backend(target)
        options = backend.parse_options({"num_warps": warps, "num_stages": stages})
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        var.shared = int(getattr(compiled.metadata, "shared", -1))
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        try:
            out = subprocess.run(
                [_ptxas(), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                capture_output=True, text=True, check=True,
            ).stderr  # fmt: skip
        finally:
            os.unlink(f.name)
        regs = re.search(r"Used (\d+) registers", out)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
        var.registers = int(regs.group(1)) if regs else -1
        if spills:
            var.spill_stores, var.spill_loads = int(spills.group(1)), int(spills.group(2))
    except Exception as e:  # report the failure, keep going
        var.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return var


def report(rec: _Recorder) -> list[Variant]:
    seen, variants = set(), []
    for case, fn, args, meta, warps, stages in rec.launches:
        signature, constexprs, _ = _signature(fn, args, meta)
        key = (fn.__name__, tuple(sorted(signature.items())), repr(sorted(constexprs.items())),
               warps, stages)  # fmt: skip
        if key in seen:
            continue
        seen.add(key)
        variants.append(compile_variant(fn, args, meta, warps, stages, case))
        v = variants[-1]
        print(
            f"{v.kernel:28s} regs {v.registers:4d} spill {v.spill_stores:5d}/{v.spill_loads:<5d} "
            f"smem {v.shared:6d} w{v.num_warps} s{v.num_stages} {v.constexprs} [{v.case}]"
            + (f" ERROR {v.error}" if v.error else ""),
            flush=True,
        )
    return variants


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    ap.add_argument("--prompt-len", type=int, default=32768)
    ap.add_argument("--json", default=None, help="also write the variants here")
    ap.add_argument("--allow-spills", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter has no autotune configs", file=sys.stderr)
        return 2
    print(f"triton {triton.__version__}, target sm_90a, ptxas {_ptxas()}")
    rec = record_launches(args.models, [getattr(torch, d) for d in args.dtypes], args.prompt_len)
    variants = report(rec)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(v) for v in variants], f, indent=1)
    bad = [v for v in variants if v.spill_stores > 0 or v.spill_loads > 0]
    errors = [v for v in variants if v.error]
    print(f"{len(variants)} variants, {len(bad)} spilling, {len(errors)} failed to compile")
    return 1 if errors or (bad and not args.allow_spills) else 0


if __name__ == "__main__":
    sys.exit(main())
