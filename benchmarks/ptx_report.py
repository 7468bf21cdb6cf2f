"""Compile report without a GPU: registers, spills and shared memory of every Triton kernel variant
the launchers pick at the LLaDA-8B and Dream-7B shapes, for the H100/H200 (sm_90a) and for the
paper's GPUs, the A100 (sm_80) and the RTX 4090 (sm_89).

    python benchmarks/ptx_report.py                 # bf16 + fp16, both models, three archs
    python benchmarks/ptx_report.py --dtypes bfloat16 --models llada-8b --archs 80 --json out.json
    python benchmarks/ptx_report.py --variants defaults   # only what the defaults launch

How: the real launchers (``score_keys``, ``pool_window``, ``topk_gather``,
``ragged_attention_triton`` dense and varlen, the fused elementwise kernels of a later step) run
on CPU tensors at the real shapes with every kernel launch intercepted: a plain launch records
its arguments, an autotuned one records one variant per config. The GPU-only planning (SM count,
split-K) is told it runs on a 132-SM GPU of the target's compute capability.

Which launches (``--variants``): ``defaults`` records what the shipped defaults launch at these
shapes, every autotune config of it: ``SCORE_KERNEL="auto"``'s pass-2 kernel with and without a
given LSE, window pooling, the default ``COMPACTION``, ``ragged_attention`` dense and varlen
without split-K and with the default ``PLANNER``'s split-K, without the LSE output, the
elementwise kernels. ``all`` (the default here) adds the selectable alternatives: both pass-2
kernels for every case, every compaction, the "grid" planner, ``ROW_TILE = 128`` and
``ragged_attention``'s LSE output.

Each recorded variant is compiled ahead of time for each architecture (``triton.compile`` for
``GPUTarget("cuda", cc)``, with the launch's 16-byte divisibility hints and options, up to PTX)
in a pool of ``--jobs`` processes, and its PTX is run through Triton's bundled ``ptxas -v``.

Exit status 1 when a variant fails to compile or is rejected by ptxas (an instruction the
architecture lacks), spills (``--allow-spills`` reports only), uses a Hopper-only instruction on
an older architecture, or needs more shared memory than the architecture has (a plain launch; an
autotuned kernel needs one config that fits: the autotuner skips the others).

Results are cached per (kernel source, specialisation, options, architecture, Triton version)
under ``~/.cache/maskkv/ptx_report`` (``MASKKV_PTX_CACHE``; ``--no-cache``): a rerun compiles only
what changed (Triton's own cache is a temporary directory: see ``_ptx_only``). Works on Triton
3.6 and 3.9 (``TRITON_INTERPRET`` must be unset: the interpreter has no autotune configs). No
kernel runs, so this needs no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

SM_COUNT = 132
MODELS = {"llada-8b": (32, 32, 128), "dream-7b": (28, 4, 128)}  # Hq, Hkv, D
LAYER = {"llada-8b": (4096, 12288, True), "dream-7b": (3584, 18944, False)}  # d, FFN, fp32 RoPE
# Architecture -> (compute capability, opt-in shared memory per block in bytes, the GPU).
ARCHS = {
    "90a": (90, 232448, "H100 / H200"),
    "80": (80, 166912, "A100"),
    "89": (89, 101376, "RTX 4090"),
}
# PTX instructions that exist only from sm_90 on (wgmma, TMA, clusters, mbarrier waits, register
# reallocation): none may appear in a variant compiled for sm_80 / sm_89.
HOPPER_ONLY = re.compile(
    r"\b(wgmma\.\w+|cp\.async\.bulk\S*|mbarrier\.try_wait\S*|setmaxnreg\S*|elect\.sync"
    r"|fence\.proxy\.async\S*|stmatrix\S*|%cluster\w*|barrier\.cluster\S*|multimem\S*)"
)

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
    arch: str = "90a"
    autotuned: bool = False
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared: int = -1
    smem_limit: int = -1
    hopper_only: tuple = ()  # Hopper-only PTX instructions found (an error below sm_90)
    error: str = ""
    cached: bool = False  # read from the report's cache, not compiled in this run

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def over_smem(self) -> bool:
        return self.shared > self.smem_limit >= 0


# ----------------------------------------------------------------------------- interception


_OPTIONS = ("enable_fp_fusion", "maxnreg")  # launch options that change the compiled code


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
            options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
            rec.launches.append((rec.case, fn, args, kwargs, warps, stages, options, False))

        def run_tuned(tuner, *args, **kwargs):
            configs = tuner.configs
            if getattr(tuner, "early_config_prune", None):  # as the autotuner prunes at launch
                configs = tuner.early_config_prune(configs, dict(zip(tuner.arg_names, args)),
                                                   **kwargs)  # fmt: skip
            for cfg in configs:
                meta = {**kwargs, **cfg.kwargs}
                rec.launches.append(
                    (rec.case, tuner.fn, args, meta, cfg.num_warps, cfg.num_stages, {}, True)
                )

        JITFunction.run, Autotuner.run = run_jit, run_tuned
        try:
            yield
        finally:
            JITFunction.run, Autotuner.run = jit_run, tune_run


@contextlib.contextmanager
def _as_if_on_gpu(capability: int):
    """The launchers' GPU-only planning, fed a 132-SM device of compute capability
    ``capability`` (inputs are CPU tensors here)."""
    from maskkv_kernels.attention import triton_ragged
    from maskkv_kernels.select import triton_scores, triton_topk

    gpu = torch.device("cuda", 0)
    saved = (
        triton_scores._sm_count,
        triton_topk._sm_count if hasattr(triton_topk, "_sm_count") else None,
        triton_ragged._plans_splits,
        triton_scores._num_splits,
        triton_topk._chunk_size,
        triton_topk._row_block,
        triton_ragged._capability,
    )
    num_splits, chunk_size = triton_scores._num_splits, triton_topk._chunk_size
    row_block = triton_topk._row_block
    triton_scores._sm_count = lambda index: SM_COUNT
    if saved[1] is not None:
        triton_topk._sm_count = lambda index: SM_COUNT
    triton_ragged._plans_splits = lambda t: True
    triton_scores._num_splits = lambda bh, gm, key_end, device: num_splits(bh, gm, key_end, gpu)
    triton_topk._chunk_size = lambda P, rows, device: chunk_size(P, rows, gpu)
    triton_topk._row_block = lambda P, device: row_block(P, gpu)
    triton_ragged._capability = lambda: divmod(capability, 10)
    try:
        yield
    finally:
        (
            triton_scores._sm_count,
            sm_topk,
            triton_ragged._plans_splits,
            triton_scores._num_splits,
            triton_topk._chunk_size,
            triton_topk._row_block,
            triton_ragged._capability,
        ) = saved
        if sm_topk is not None:
            triton_topk._sm_count = sm_topk


def record_launches(
    models: list[str],
    dtypes: list[torch.dtype],
    prompt_len: int,
    capability: int = 90,
    *,
    alternatives: bool = True,
) -> _Recorder:
    """Run the launchers at the models' shapes (step 1 selection, later-step attention and
    elementwise work) as they would launch on a GPU of compute capability ``capability``: with
    the shipped defaults, and with ``alternatives`` also every selectable alternative (see
    ``--variants``)."""
    from maskkv_kernels.attention import triton_ragged
    from maskkv_kernels.elementwise import triton_elementwise as tew
    from maskkv_kernels.select import triton_scores, triton_topk

    # None = the launcher's default (SCORE_KERNEL, COMPACTION, PLANNER, ROW_TILE).
    score_kernels = ("key_resident", "k_streaming") if alternatives else (None,)
    compactions = ("serial", "parallel", "fused") if alternatives else (None,)
    planners = ("worklist", "grid") if alternatives else (None,)
    row_tiles = (None, 128) if alternatives else (triton_ragged.ROW_TILE,)
    lse_outputs = (False, True) if alternatives else (False,)  # the framework asks for no LSE
    rec = _Recorder()
    with _as_if_on_gpu(capability), rec.active():
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
                    for kernel in score_kernels:
                        scores, _ = triton_scores.score_keys(
                            qs, k, first, prompt_len=P, window=window,
                            lse=lse if with_lse else None, scale=D**-0.5, need_mass=not window,
                            kernel=kernel,
                        )  # fmt: skip
                    if window:
                        triton_scores.pool_window(scores, first, 32, "max", 7)
                budgets = torch.full((1, Hkv), budget, dtype=torch.int32)
                cu = torch.arange(Hkv + 1, dtype=torch.int32) * budget
                for compaction in compactions:
                    rec.case = f"{tag} topk_gather {compaction or triton_topk.COMPACTION}"
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
                plans = [(1, None)] + [(4, planner) for planner in planners]
                for splits, planner in plans:
                    for store_lse in lse_outputs:
                        for tile in row_tiles:
                            shown = "" if splits == 1 else planner or triton_ragged.PLANNER
                            rec.case = (f"{tag} ragged splits={splits} {shown} "
                                        f"lse={store_lse} row_tile={tile or 'auto'}")  # fmt: skip
                            saved, triton_ragged.ROW_TILE = triton_ragged.ROW_TILE, tile
                            try:
                                triton_ragged.ragged_attention_triton(
                                    q, kr, kr, cu, budget * 32, Hkv, q[:, ::G], q[:, ::G],
                                    D**-0.5, store_lse, num_splits=splits, planner=planner,
                                )  # fmt: skip
                            finally:
                                triton_ragged.ROW_TILE = saved
                # Serving: 4 requests of R queries each in one varlen call (packed q and tails).
                nb = 4
                qv = torch.empty(nb * R, Hq, D, dtype=dtype)
                tv = torch.empty(nb * R, Hkv, D, dtype=dtype)
                kv = torch.empty(nb * n, D, dtype=dtype)
                cu_kv = torch.arange(nb * Hkv + 1, dtype=torch.int32) * budget
                cu_r = torch.arange(nb + 1, dtype=torch.int32) * R
                for splits in (1, 4):
                    for store_lse in lse_outputs:
                        rec.case = f"{tag} ragged varlen splits={splits} lse={store_lse}"
                        triton_ragged.ragged_attention_varlen_triton(
                            qv, kv, kv, cu_kv, None, budget * 32, Hkv, cu_r, R, tv, tv, cu_r,
                            None, R, D**-0.5, store_lse, num_splits=splits,
                        )  # fmt: skip
                # The fused elementwise kernels of a later step (fusion="triton").
                d, ffn, full = LAYER[name]
                rec.case = f"{tag} elementwise"
                x = torch.empty(1, R, d, dtype=dtype)
                tew.rms_norm_triton(x, torch.empty(d, dtype=dtype), 1e-6)
                tew.rms_norm_triton(x, torch.empty(d, dtype=dtype), 1e-6, x)
                cos = torch.empty(1, R, D)
                tew.rotary_triton(x[..., : Hq * D], torch.empty(1, R, Hkv * D, dtype=dtype), cos,
                                  cos, D, full)  # fmt: skip
                g = torch.empty(1, R, ffn, dtype=dtype)
                tew.silu_mul_triton(g, g)
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


def _ptxas(cc: int = 90) -> str:
    """The ptxas Triton itself runs for compute capability ``cc``."""
    from triton.backends.nvidia import compiler

    if hasattr(compiler, "get_ptxas"):  # Triton 3.9: a second ptxas for sm_90 and later
        return compiler.get_ptxas(cc).path
    return compiler._path_to_binary("ptxas")[0]  # Triton 3.6


def _cache_dir() -> Path | None:
    path = Path(os.environ.get("MASKKV_PTX_CACHE") or Path.home() / ".cache/maskkv/ptx_report")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path


def _variant_key(fn, signature, constexprs, attrs, options, warps, stages, arch) -> str:
    """Everything the compiled code depends on: the kernel source and the sources of the jit
    functions it calls (``cache_key``), the specialisation, the options, the target, Triton."""
    text = repr((fn.cache_key, sorted(signature.items()), repr(sorted(constexprs.items())),
                 repr(sorted(attrs.items())), sorted(options.items()), warps, stages, arch,
                 triton.__version__, _ptxas(ARCHS[arch][0])))  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


def _run_ptxas(ptx: str, arch: str, fmad: bool) -> str:
    """ptxas -v of one PTX module; returns its log (stderr). Raises on rejection."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        cmd = [_ptxas(ARCHS[arch][0]), "-v", f"--gpu-name=sm_{arch}", f.name, "-o", os.devnull]
        if not fmad:
            cmd.insert(2, "--fmad=false")
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"ptxas sm_{arch}: {run.stderr.strip()[:300]}")
        return run.stderr
    finally:
        os.unlink(f.name)


def _compile(module: str, name: str, signature, constexprs, attrs, options, arch) -> dict:
    """Compile one variant for ``arch`` to PTX and run ptxas -v on it (in a worker process);
    returns its report fields. The kernel is looked up by module and name (what a process pool
    can send)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):  # an autotuned / heuristics-wrapped kernel
        fn = fn.fn
    target = GPUTarget("cuda", ARCHS[arch][0], 32)
    opts = make_backend(target).parse_options(options)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        compiled = triton.compile(src, target=target, options=opts.__dict__)
    except Exception as e:  # report the failure, keep going
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    ptx = compiled.asm["ptx"]
    fields = {
        "shared": int(getattr(compiled.metadata, "shared", -1)),
        "hopper_only": sorted(set(HOPPER_ONLY.findall(ptx))),  # an error below sm_90
    }
    try:
        _parse_ptxas(_run_ptxas(ptx, arch, opts.enable_fp_fusion), fields)
    except Exception as e:
        fields["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return fields


def _ptx_only(triton_cache: str) -> dict:
    """Make ``triton.compile`` stop at PTX in this process; returns what to restore.

    Triton's PTX -> cubin step would run ptxas a second time (~15% of the compile time), with
    the flags of its version (Triton 3.9 adds ``--regAllocOptLevel=2`` for sm_90, working around
    a ptxas 13 bug; 3.6, on the GPU image, runs ptxas 12.8 with none): the report runs ptxas -v
    itself with Triton's bundled binary and plain flags. The stub's empty cubins go to a private
    Triton cache, deleted after the report."""
    from triton.backends.nvidia.compiler import CUDABackend

    saved = {"make_cubin": CUDABackend.make_cubin, "env": os.environ.get("TRITON_CACHE_DIR")}
    CUDABackend.make_cubin = lambda self, src, metadata, opt, capability: b""
    os.environ["TRITON_CACHE_DIR"] = triton_cache
    return saved


class _InProcess:
    """The pool's interface for ``--jobs 1`` (and where ``fork`` is missing): compiles at once."""

    def __init__(self, triton_cache: str) -> None:
        self.triton_cache = triton_cache

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def __enter__(self):
        self.saved = _ptx_only(self.triton_cache)
        return self

    def __exit__(self, *exc) -> None:
        from triton.backends.nvidia.compiler import CUDABackend

        CUDABackend.make_cubin = self.saved["make_cubin"]
        if self.saved["env"] is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = self.saved["env"]


@contextlib.contextmanager
def _compile_pool(jobs: int):
    """``jobs`` forked worker processes (they inherit the imported kernels), or in-process."""
    triton_cache = tempfile.mkdtemp(prefix="maskkv_ptx_triton_")
    try:
        if jobs > 1 and "fork" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(jobs, ctx, _ptx_only, (triton_cache,)) as pool:
                yield pool
        else:
            with _InProcess(triton_cache) as pool:
                yield pool
    finally:
        shutil.rmtree(triton_cache, ignore_errors=True)


def _parse_ptxas(log: str, fields: dict) -> None:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    fields["registers"] = int(regs.group(1)) if regs else -1
    if spills:
        fields["spill_stores"], fields["spill_loads"] = int(spills.group(1)), int(spills.group(2))


def report(recs: dict[str, _Recorder], *, cache: bool = True, jobs: int = 1) -> list[Variant]:
    """Compile every distinct variant recorded for each arch (``recs``: arch -> launches) in
    ``jobs`` processes. Print one line per variant and return them all."""
    cache_dir = _cache_dir() if cache else None
    seen, pending = set(), []
    with _compile_pool(jobs) as pool:
        for arch, rec in recs.items():
            for case, fn, args, meta, warps, stages, options, tuned in rec.launches:
                signature, constexprs, attrs = _signature(fn, args, meta)
                same = (fn.__name__, tuple(sorted(signature.items())),
                        repr(sorted(constexprs.items())), warps, stages, repr(options), arch)  # fmt: skip
                if same in seen:  # differing only in divisibility hints: one is enough
                    continue
                seen.add(same)
                key = _variant_key(fn, signature, constexprs, attrs, options, warps, stages, arch)
                shown = {k: v for k, v in constexprs.items() if v is not None and k.isupper()}
                var = Variant(fn.__name__, case, shown, warps, stages, arch, tuned,
                              smem_limit=ARCHS[arch][1])  # fmt: skip
                hit = cache_dir / f"{key}.json" if cache_dir else None
                if hit is not None and hit.exists():
                    var.cached = True
                    pending.append((var, json.loads(hit.read_text()), None, None))
                    continue
                opts = {"num_warps": warps, "num_stages": stages, **options}
                future = pool.submit(_compile, fn.__module__, fn.__name__, signature,
                                     constexprs, attrs, opts, arch)  # fmt: skip
                pending.append((var, None, future, hit))
        variants = []
        for var, fields, future, hit in pending:
            if future is not None:
                fields = future.result()
            for name, value in fields.items():
                setattr(var, name, tuple(value) if name == "hopper_only" else value)
            if hit is not None and not var.error:  # atomic: parallel runs share the cache
                tmp = hit.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(fields))
                tmp.replace(hit)
            variants.append(var)
            print(
                f"sm_{var.arch:3s} {var.kernel:28s} regs {var.registers:4d} "
                f"spill {var.spill_stores:5d}/{var.spill_loads:<5d} smem {var.shared:6d} "
                f"w{var.num_warps} s{var.num_stages} {var.constexprs} [{var.case}]"
                + (
                    f" HOPPER-ONLY {list(var.hopper_only)}"
                    if var.hopper_only and var.arch != "90a"
                    else ""
                )
                + (f" ERROR {var.error}" if var.error else ""),
                flush=True,
            )
    return variants


def problems(variants: list[Variant], *, allow_spills: bool = False) -> dict[str, list[Variant]]:
    """What makes the report fail, by kind. An autotuned kernel fails on shared memory only when
    no config of its launch fits (the autotuner skips configs that do not)."""
    over = [v for v in variants if v.over_smem and not v.autotuned]
    groups: dict[tuple, list[Variant]] = {}
    for v in variants:
        if v.autotuned:
            shape = {k: c for k, c in v.constexprs.items() if not k.startswith("BLOCK_N")}
            groups.setdefault((v.arch, v.kernel, v.case, repr(sorted(shape.items()))), []).append(v)
    over += [g[0] for g in groups.values() if all(v.over_smem for v in g)]
    return {
        "failed to compile": [v for v in variants if v.error],
        "spilling": [] if allow_spills else [v for v in variants if v.spills],
        "Hopper-only instructions": [v for v in variants if v.hopper_only and v.arch != "90a"],
        "over the shared memory": over,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--prompt-len", type=int, default=32768)
    ap.add_argument("--json", default=None, help="also write the variants here")
    ap.add_argument("--allow-spills", action="store_true")
    ap.add_argument("--no-cache", action="store_true", help="compile everything again")
    ap.add_argument("--variants", default="all", choices=["defaults", "all"],
                    help="what the shipped defaults launch, or also every alternative")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="compile processes (default: one per CPU)")  # fmt: skip
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter has no autotune configs", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    start = time.perf_counter()
    targets = ", ".join(f"sm_{a} ({ARCHS[a][2]})" for a in args.archs)
    tools = sorted({_ptxas(ARCHS[a][0]) for a in args.archs})
    print(f"triton {triton.__version__}, targets {targets}, ptxas {', '.join(tools)}")
    dtypes = [getattr(torch, d) for d in args.dtypes]
    alternatives = args.variants == "all"
    recs = {
        a: record_launches(
            args.models, dtypes, args.prompt_len, ARCHS[a][0], alternatives=alternatives
        )  # fmt: skip
        for a in args.archs
    }
    variants = report(recs, cache=not args.no_cache, jobs=max(1, args.jobs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(v) for v in variants], f, indent=1)
    found = problems(variants, allow_spills=args.allow_spills)
    for arch in args.archs:
        mine = [v for v in variants if v.arch == arch]
        counts = ", ".join(f"{len([v for v in found[k] if v.arch == arch])} {k}" for k in found)
        cached = sum(v.cached for v in mine)
        print(f"sm_{arch}: {len(mine)} variants ({len(mine) - cached} compiled), {counts}")
    print(f"{time.perf_counter() - start:.0f} s")
    return 1 if any(found.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
