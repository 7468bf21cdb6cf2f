"""End-to-end benchmark: every method side by side on a random-weight LLaDA / Dream model.

Per (method, prompt length): step-1 time, median later-step time, speedups against NoCache and
FullCache, prompt KV bytes full vs kept, kept tokens per head, peak memory (CUDA), the later step
against its floor (CUDA), and the DESIGN targets as PASS / MISS. All the work is in
``maskkv.bench`` (also reachable as ``maskkv bench``); this script adds the repository's result
layout: ``benchmarks/results/<device>/e2e_<preset>.json`` and ``.png``.

    python benchmarks/bench_e2e.py --preset cpu --prompt-lens 8192 --methods nocache,fullcache,maskkv
    python benchmarks/bench_e2e.py --preset llada-8b                    # CUDA: 4k..32k, 7 methods
    python benchmarks/bench_e2e.py --preset llada-8b --max-prompt-search
"""

from __future__ import annotations

import argparse

import common
import torch

from maskkv import bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_bench_arguments(parser)
    args = parser.parse_args(argv)
    if args.whole:  # python benchmarks/bench_e2e.py --whole --preset cpu --threads 1
        bench.run_whole_from_args(args)
        return
    result = bench.run_from_args(args)
    device = torch.device(result.config["device"])
    config, rows = bench.result_payload(result)
    path = common.save(f"e2e_{result.preset}", device, config, rows, args.out)
    print(bench.report(result))
    print(f"\nwrote {path}")
    if not args.no_plot:
        print(f"wrote {bench.plot_results(result, path.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
