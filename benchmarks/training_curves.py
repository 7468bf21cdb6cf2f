"""Loss and one-shot exact-match curves of quality-model training runs (``maskkv.quality.train
--no-progress`` writes one JSON line per log row), as committed JSON + PNG.

    python benchmarks/training_curves.py --run d128-b16=.train/llada-b16/log.txt \\
        --run d192-6L=.train/llada/log.txt --out benchmarks/results/cpu-x86_64/kv_training
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(path: str | Path, every: int = 100) -> list[dict]:
    """Log rows (every ``every``-th step) of a training log file; other lines are skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if row["step"] % every == 0:
                rows.append(row)
    return rows


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({k[5:] for rows in runs.values() for r in rows for k in r if k[:5] == "loss_"})
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.6 * len(tasks), 6), squeeze=False)
    for name, rows in runs.items():
        steps = [r["step"] for r in rows]
        for j, task in enumerate(tasks):
            for i, key in enumerate(("loss_", "exact_")):
                ys = [r.get(key + task) for r in rows]
                axes[i][j].plot(steps, ys, label=name)
    for j, task in enumerate(tasks):
        axes[0][j].set_title(task, fontsize=9)
        axes[0][j].set_yscale("log")
        axes[1][j].set_ylim(-0.02, 1.02)
        axes[1][j].set_xlabel("step")
    axes[0][0].set_ylabel("training loss (running)")
    axes[1][0].set_ylabel("one-shot exact match (t = 1 rows)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=LOGFILE")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--out", required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.run:
        name, _, path = spec.partition("=")
        runs[name] = read_log(path, args.every)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(runs, indent=0) + "\n")
    plot(runs, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
