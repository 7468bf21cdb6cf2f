"""Where the time goes on a GPU: kernel-level profiles of select_and_gather and of one later
denoising step at LLaDA-8B shape (random weights), plus the same step replayed as a CUDA graph.

    python3 benchmarks/profile_gpu.py [--prompt-len 32768] [--parts select,step]

Prints torch.profiler tables (device time per kernel, host time per op) and, per later step,
wall time vs summed kernel time: a wall time far above the kernel time means the step is bound by
host launches, which a CUDA graph removes.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import maskkv_kernels as mk


def _table(prof, sort: str, rows: int = 22) -> str:
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)


def _kernel_ms(prof) -> float:
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3


def _wall(fn, reps: int = 5) -> float:
    torch.cuda.synchronize()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        t.append(time.perf_counter() - t0)
    return sorted(t)[len(t) // 2] * 1e3


def profile_select(P: int) -> None:
    torch.manual_seed(0)
    for name, Hq, Hkv in (("llada-8b", 32, 32), ("dream-7b", 28, 4)):
        M, D = 256, 128
        q = torch.randn(1, Hq, M, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, Hkv, P + M, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lens = torch.tensor([P])
        for head_budget in ("prompt_preference", "uniform"):

            def call(q=q, k=k, v=v, lens=lens, hb=head_budget):
                return mk.select_and_gather(
                    q, k, v, 256, prompt_len=P, prompt_lens=lens, head_budget=hb, backend="triton"
                )

            call()
            wall = _wall(call)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
            print(f"\n### select_and_gather {name} P={P} M={M} {head_budget}: wall {wall:.3f} ms, "
                  f"kernels {_kernel_ms(prof):.3f} ms")  # fmt: skip
            print(_table(prof, "self_cuda_time_total", 14))


def _llada_step_inputs(P: int, R: int = 256):
    """A random-weight LLaDA-8B, [prompt ‖ R masks] ids and the all-True logits mask."""
    from maskkv import bench

    model = bench.build_model("llada-8b", device="cuda", dtype="bfloat16")
    masks = torch.full((1, R), model.config.mask_token_id, device="cuda", dtype=torch.long)
    x = torch.cat([bench.random_prompt(model, P), masks], 1)
    return model, x, torch.ones(1, R, dtype=torch.bool, device="cuda")


def profile_step(P: int, method_name: str) -> None:
    from maskkv import methods
    from maskkv.generation.engine import Denoiser

    model, x, need = _llada_step_inputs(P)
    for name in method_name.split(","):
        den = Denoiser(model, methods.get(name), P)
        den(x, need)  # step 1
        den(x, need)  # warm later step (autotune)
        wall = _wall(lambda d=den: d(x, need), 3)
        bare = _wall(lambda d=den: d._cached_pass(x), 3)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            den(x, need)
            torch.cuda.synchronize()
        print(f"\n### later step {name} P={P}: wall {wall:.2f} ms (cached pass alone {bare:.2f}),"
              f" kernels {_kernel_ms(prof):.2f} ms")  # fmt: skip
        print(_table(prof, "self_cuda_time_total", 22))
        print(_table(prof, "self_cpu_time_total", 14))
        try:  # the cached pass as one CUDA graph
            static_x = x.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                den._cached_pass(static_x)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = den._cached_pass(static_x)
            ref = den._cached_pass(x)
            g.replay()
            torch.cuda.synchronize()
            err = (out.float() - ref.float()).abs().max().item()
            print(f"graph replay {_wall(g.replay, 5):.2f} ms (max |graph - eager| = {err:.3g})")
        except Exception as e:  # report, do not stop the profile
            print(f"graph capture failed: {type(e).__name__}: {e}")
        del den
        torch.cuda.empty_cache()


def profile_step1(P: int) -> None:
    """Step 1 of MaskKV with the LSE from the cuDNN or flash forward vs SDPA's own pick +
    select_and_gather's LSE pass (step1_lse=False)."""
    from maskkv import methods
    from maskkv.generation.engine import Denoiser

    model, x, need = _llada_step_inputs(P)
    # Each twice: the first round warms up (compiles, cuDNN plans); True = the cuDNN forward.
    for step1_lse in ("cudnn", False, "flash", "cudnn", False, "flash"):
        den = Denoiser(model, methods.MaskKV(budget=256), P, step1_lse=step1_lse)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        den(x, need)
        torch.cuda.synchronize()
        print(f"step 1 step1_lse={step1_lse}: {1e3 * (time.perf_counter() - t0):.1f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        Denoiser(model, methods.MaskKV(budget=256), P)(x, need)
        torch.cuda.synchronize()
    print(_table(prof, "self_cuda_time_total", 16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=32768)
    ap.add_argument("--parts", default="select,step", help="any of select, step, step1")
    ap.add_argument("--methods", default="maskkv,fullcache")
    args = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name())
    if "select" in args.parts.split(","):
        profile_select(args.prompt_len)
    parts = args.parts.split(",")
    if "step" in parts:
        profile_step(args.prompt_len, args.methods)
    if "step1" in parts:
        profile_step1(args.prompt_len)


if __name__ == "__main__":
    main()
