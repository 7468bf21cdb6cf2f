"""Quality benchmark: accuracy against KV budget for every method on the committed tiny LLaDA.

All the work is in ``maskkv.quality.evaluate`` (also reachable as ``maskkv eval``); this script adds
the repository's result layout: ``benchmarks/results/<device>/quality.json`` and ``.png``, with the
environment record (device, torch, git commit) of the other benchmarks.

    python benchmarks/bench_quality.py                                  # 7 methods, budgets 8..64
    python benchmarks/bench_quality.py --num-examples 20 --methods fullcache,maskkv,snapkv
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
    path = common.out_dir(device) / "quality.json" if args.out is None else Path(args.out)
    evaluate.save(result, path, env=common.environment(device))
    print(evaluate.format_table(result))
    print(f"\nwrote {path}")
    if not args.no_plot:
        print(f"wrote {evaluate.plot(result, path.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
