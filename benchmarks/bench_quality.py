"""Quality benchmark: accuracy against KV budget for every method on a committed tiny model.

All the work is in ``maskkv.quality.evaluate`` (also reachable as ``maskkv eval``); this script adds
the repository's result layout, with the environment record (device, torch, git commit) of the
other benchmarks:

- ``benchmarks/results/<device>/quality-<model>.json`` and ``.png``: every task, method and budget;
- with ``--heatmap``: ``heatmap-<model>-<task>.json`` and ``.png``, the depth x length sweep at one budget
  (first of ``--budgets``) on the first of ``--tasks``, one panel per method.

    python benchmarks/bench_quality.py --prompt-len 512                 # every method, budgets 8..64
    python benchmarks/bench_quality.py --heatmap --tasks kv_retrieval --budgets 16 --num-examples 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common
import torch

from maskkv.quality import evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    evaluate.add_eval_arguments(parser)
    args = parser.parse_args(argv)
    result = evaluate.run_from_args(args)
    device = torch.device(result["config"]["device"])
    kind = "heatmap" if args.heatmap else "quality"
    name = f"{kind}-{Path(args.model).name}.json"
    if args.heatmap:  # one sweep per task
        name = f"heatmap-{Path(args.model).name}-{args.tasks.split(',')[0]}.json"
    path = common.out_dir(device) / name if args.out is None else Path(args.out)
    evaluate.save(result, path, env=common.environment(device))
    evaluate.report(result, None)
    print(f"\nwrote {path}")
    if not args.no_plot:
        png = path.with_suffix(".png")
        draw = evaluate.plot_heatmap if args.heatmap else evaluate.plot
        print(f"wrote {draw(result, png)}")


if __name__ == "__main__":
    main()
