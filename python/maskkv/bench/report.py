"""Reports of a benchmark run: the result table, the targets' PASS / MISS lines, the
longest-prompt search and the plots. Reads results only (``result.py``); never runs anything."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..tables import format_cell
from .presets import device_name
from .result import _LATER_KEY, BenchResult

# ----------------------------------------------------------------------------- table, targets


_TABLE = [
    ("method", "method", None),
    ("prompt", "prompt_len", None),
    ("step1 s", "first_step_s", 1.0),
    ("later ms", "later_step_s", 1e3),
    ("x NoCache", "speedup_vs_nocache", 1.0),
    ("x Full", "speedup_vs_fullcache", 1.0),
    ("KV full MiB", "prompt_kv_bytes_full", 2.0**-20),
    ("KV kept MiB", "prompt_kv_bytes_kept", 2.0**-20),
    ("kept/head", "kept_per_head_mean", 1.0),
    ("peak GiB", "peak_memory_bytes", 2.0**-30),
    ("/floor", "later_vs_floor", 1.0),
]


def format_table(rows: Sequence[dict[str, Any]], timing: str = "median") -> str:
    """A compact fixed-width table of the rows (columns without any value are left out);
    ``timing`` picks the later-step column (median or min)."""
    table = [
        (f"later ms ({timing})", _LATER_KEY[timing], s) if key == "later_step_s" else (h, key, s)
        for h, key, s in _TABLE
    ]
    cols = [c for c in table if any(r.get(c[1]) is not None for r in rows)]
    cells = [[c[0] for c in cols]]
    for r in rows:
        if r.get("status", "ok") != "ok":
            cells.append([r["method"], str(r["prompt_len"]), r["status"]] + [""] * (len(cols) - 3))
            continue
        cells.append([format_cell(r.get(key), scale) for _, key, scale in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)


def format_targets(targets: Sequence[dict[str, Any]]) -> str:
    lines = []
    for t in targets:
        m = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        note = f"  ({t['note']})" if t["note"] else ""
        lines.append(f"[{t['status']:>4}] {t['target']}: {m} {t['op']} {t['bound']:g}{note}")
    return "\n".join(lines)


def format_search(search: dict[str, Any] | None) -> str:
    if not search:
        return ""
    return "\n".join(
        f"longest prompt that fits, {name}: {s['max_fit']} (first OOM: {s['first_oom']}, "
        f"predicted {s.get('predicted_max')}, limit {s['limit']})"
        for name, s in search.items()
    )


# ----------------------------------------------------------------------------- plot, save


def plot_results(result: BenchResult, path: str | os.PathLike) -> Path:
    """PNG: later-step latency vs prompt length per method (log-log); second panel peak memory
    (CUDA) or, on CPU where there is no peak counter, prompt KV bytes kept."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on benchmark machines
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ok = [r for r in result.rows if r["status"] == "ok"]
    timing = result.config.get("timing", "median")
    key = _LATER_KEY[timing]
    has_peak = any(r.get("peak_memory_bytes") for r in ok)
    mem_key = "peak_memory_bytes" if has_peak else "prompt_kv_bytes_kept"
    for i, name in enumerate(dict.fromkeys(r["method"] for r in ok)):
        style = {
            "marker": "o",
            "label": name,
            "color": f"C{i}",
        }  # one colour per method, both panels
        rs = sorted((r for r in ok if r["method"] == name), key=lambda r: r["prompt_len"])
        xs = [r["prompt_len"] for r in rs]
        ax1.plot(xs, [1e3 * r[key] for r in rs], **style)
        mem = [(r["prompt_len"], r.get(mem_key)) for r in rs if r.get(mem_key)]
        if mem:
            ax2.plot([x for x, _ in mem], [v / 2**30 for _, v in mem], **style)
    floor = [
        (r["prompt_len"], r["floor_s"]) for r in ok if r["method"] == "maskkv" and r.get("floor_s")
    ]
    if floor:
        ax1.plot(
            [x for x, _ in floor], [1e3 * f for _, f in floor], "k--", lw=1, label="floor (MaskKV)"
        )
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel(f"later-step latency, {timing} (ms)")
    ax1.set_title(f"{result.preset}: denoising step after step 1")
    ax2.set_ylabel("peak memory (GiB)" if has_peak else "prompt KV kept (GiB)")
    ax2.set_title(
        "peak device memory" if has_peak else "prompt KV bytes kept (no CPU peak counter)"
    )
    ax1.legend(fontsize=8)
    dev = device_name(result.config["device"]) if result.config.get("device") else ""
    fig.suptitle(f"maskkv e2e, {result.preset}, {dev}, budget {result.config.get('budget')}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(result: BenchResult) -> str:
    """Table, search and targets as printed at the end of a run."""
    parts = [format_table(result.rows, result.config.get("timing", "median"))]
    if result.search:
        parts.append(format_search(result.search))
    if result.ceilings:
        c = result.ceilings
        parts.append(
            f"ceilings: copy {c['copy_bandwidth_Bps'] / 1e9:.0f} GB/s, "
            f"{c['matmul_dtype']} matmul {c['matmul_flops'] / 1e12:.0f} TFLOP/s"
        )
    if result.targets:
        parts.append(format_targets(result.targets))
    return "\n\n".join(parts)
