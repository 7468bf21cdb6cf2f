"""Shared benchmark plumbing: environment record, timing, JSON + PNG output.

Every result file records the device, torch/triton versions, shapes, dtype and the git commit, so a
number is never separated from how it was obtained.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

# One record format for every result file: the same helpers as `maskkv bench`.
from maskkv.bench import device_name, environment  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def bench(fn, device: torch.device, *, warmup: int = 3, rep: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events via do_bench on GPU)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def bench_graph(fn) -> float | None:
    """Median GPU time of ``fn()`` in ms replayed from a CUDA graph: the kernels alone, without
    the host's launch and Python overhead (which a graph-captured generation step never pays).
    None where ``fn`` cannot be captured."""
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    except Exception as e:  # e.g. an op that synchronises
        print(f"(cuda graph timing failed: {type(e).__name__}: {e})")
        return None


def peak_memory(fn, device: torch.device) -> int | None:
    """Peak extra device bytes allocated while ``fn()`` runs (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def out_dir(device: torch.device, override: str | None = None) -> Path:
    path = Path(override or os.environ.get("MASKKV_BENCH_OUT") or RESULTS / device_name(device))
    path.mkdir(parents=True, exist_ok=True)
    return path


def save(
    name: str, device: torch.device, config: dict, rows: list[dict], out: str | None = None
) -> Path:
    path = out_dir(device, out) / f"{name}.json"
    path.write_text(
        json.dumps({"env": environment(device), "config": config, "rows": rows}, indent=1)
    )
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return "-" if x is None else str(x)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (saying so in one line) where matplotlib
    is not installed: the benchmark's JSON is written either way."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG")
        return None
    return plt


def line_plot(
    series: dict[str, list[tuple[float, float]]],
    path: Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    log_y: bool = False,
) -> Path:
    """One line per series (label -> [(x, y), ...]) in a small PNG; prints and returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in series.items():
        ax.plot(*zip(*points), marker="o", label=label)
    if log_x:
        ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path
