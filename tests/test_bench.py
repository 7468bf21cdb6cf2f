"""Smoke test of the end-to-end benchmark (``maskkv.bench``) on the CPU "tiny" preset.

No timing assertions (shared CI machines): only relations the numbers must satisfy whatever the
speed -- kept bytes below full bytes for evicting methods, kept lengths adding up to the layer
budgets, ratios consistent with the times they come from.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from maskkv import bench
from maskkv.bench.runner import _add_ratios as add_ratios

METHODS = ["nocache", "fullcache", "maskkv", "snapkv"]


@pytest.fixture(scope="module")
def result() -> bench.BenchResult:
    torch.manual_seed(0)
    return bench.run_e2e("tiny", methods=METHODS, progress=False)


def test_rows_cover_the_grid(result: bench.BenchResult) -> None:
    p = bench.PRESETS["tiny"]
    assert [(r["method"], r["prompt_len"]) for r in result.rows] == [
        (m, P) for P in p.prompt_lens for m in METHODS
    ]
    assert all(r["status"] == "ok" for r in result.rows)
    json.dumps(result.to_dict())  # the result file must serialise as is


def test_times_and_ratios(result: bench.BenchResult) -> None:
    for r in result.rows:
        assert r["first_step_s"] > 0 and r["later_step_s"] > 0
        assert len(r["step_times_s"]) == r["steps"]
        assert r["first_step_s"] == r["step_times_s"][0]
        later = sorted(r["step_times_s"][1:])
        assert r["later_step_s"] == later[len(later) // 2]
        assert r["later_step_min_s"] == later[0]
    nc = result.row("nocache", 200)
    fc = result.row("fullcache", 200)
    # NoCache runs only --nocache-steps steps; the cached methods the preset's steps.
    assert nc["steps"] == 3 and fc["steps"] == bench.PRESETS["tiny"].steps
    assert nc["speedup_vs_nocache"] == 1.0 and fc["speedup_vs_fullcache"] == 1.0
    for r in result.rows:
        assert math.isclose(r["speedup_vs_nocache"], nc["later_step_s"] / r["later_step_s"])
        assert math.isclose(r["speedup_vs_fullcache"], fc["later_step_s"] / r["later_step_s"])
        assert r["peak_memory_bytes"] is None  # CPU: no peak counter
        assert "floor_s" not in r  # the floor is CUDA only


def test_kv_bytes_and_kept_lengths(result: bench.BenchResult) -> None:
    p = bench.PRESETS["tiny"]
    P = p.prompt_lens[0]
    full = 2 * p.layers * p.kv_heads * P * p.head_dim * 4  # fp32 K + V of the whole prompt
    for r in result.rows:
        assert r["prompt_kv_bytes_full"] == full
    assert result.row("nocache", P)["prompt_kv_bytes_kept"] is None  # caches nothing
    fc = result.row("fullcache", P)
    assert fc["prompt_kv_bytes_kept"] == full
    assert fc["kept_per_head_mean"] == P and fc["kept_per_layer"] == [P] * p.layers
    for name in ("maskkv", "snapkv"):
        r = result.row(name, P)
        assert r["prompt_kv_bytes_kept"] < r["prompt_kv_bytes_full"]
        budgets = r["layer_budgets"]
        assert len(budgets) == p.layers and sum(budgets) == p.budget * p.layers
        # Every layer keeps exactly its budget, on average over its heads (the head allocators
        # split Hkv * k_l exactly), and the bytes are those tokens' K and V rows.
        assert r["kept_per_layer"] == [float(b) for b in budgets]
        assert r["kept_per_head_mean"] == p.budget
        assert 0 <= r["kept_per_head_min"] <= r["kept_per_head_max"] <= P
        kept_tokens = sum(budgets) * p.kv_heads
        assert r["prompt_kv_bytes_kept"] == 2 * kept_tokens * p.head_dim * 4
        assert math.isclose(r["kv_kept_fraction"], p.budget / P)


def test_profile_and_targets(result: bench.BenchResult) -> None:
    # One calibrated profile (MaskKV is in the grid), one importance per layer.
    assert len(result.config["profile_importance"]) == bench.PRESETS["tiny"].layers
    assert result.targets == []  # the DESIGN targets concern the cpu and llada-8b presets
    fake = bench.BenchResult("cpu", {}, [])
    assert [t["status"] for t in bench.check_targets(fake)] == ["N/A", "N/A"]
    fake.rows = [{"method": "maskkv", "prompt_len": 8192, "status": "ok",
                  "speedup_vs_nocache": 60.0, "speedup_vs_fullcache": 1.5}]  # fmt: skip
    assert [t["status"] for t in bench.check_targets(fake)] == ["PASS", "MISS"]


def test_report_plot_and_payload(result: bench.BenchResult, tmp_path) -> None:
    text = bench.report(result)
    for name in METHODS:
        assert name in text
    png = bench.plot_results(result, tmp_path / "e2e_tiny.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config, rows = bench.result_payload(result)
    assert rows is result.rows and config["budget"] == 32 and "targets" in config


def test_cli_parser() -> None:
    parser = argparse.ArgumentParser(prog="maskkv")
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_bench_parser(sub)
    args = parser.parse_args(
        ["bench", "--preset", "tiny", "--methods", "maskkv,snapkv", "--prompt-lens", "128,256"]
    )
    assert args.func is not None and args.preset == "tiny"
    assert args.methods == ["maskkv", "snapkv"] and args.prompt_lens == [128, 256]
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--prompt-lens", "4k"])


def test_min_timing_ratios() -> None:
    rows = [
        {"method": m, "prompt_len": 64, "status": "ok", "later_step_s": med,
         "later_step_min_s": lo}
        for m, med, lo in (("nocache", 8.0, 6.0), ("fullcache", 2.0, 1.0), ("maskkv", 1.0, 0.5))
    ]  # fmt: skip
    add_ratios(rows, "min")
    assert rows[2]["speedup_vs_nocache"] == 12.0 and rows[2]["speedup_vs_fullcache"] == 2.0
    add_ratios(rows, "median")
    assert rows[2]["speedup_vs_nocache"] == 8.0 and rows[2]["speedup_vs_fullcache"] == 2.0


def test_later_step_need() -> None:
    # One block of 256 in 8 steps: 256 masked at step 1, then 224, 192, ..., 32.
    assert bench.later_step_need(256, 256, 8) == sum(range(32, 225, 32)) / 7


def test_step_floor_formula() -> None:
    # CUDA measures the ceilings; the arithmetic is checked here with made-up ones.
    model = bench.build_model("tiny")
    p = bench.PRESETS["tiny"]
    f = bench.step_floor(
        model, gen_length=32, kept_per_layer=[32.0, 32.0], need_tokens=16.0,
        ceilings={"copy_bandwidth_Bps": 1e9, "matmul_flops": 1e9},
    )  # fmt: skip
    linear = 4 * p.hidden * p.hidden + 3 * p.hidden * p.ffn  # q, k, v, out + gated MLP
    attn = 4 * 32 * p.heads * p.head_dim * (32 + 32)
    flops = p.layers * (2 * 32 * linear + attn) + 2 * 16 * p.hidden * p.vocab
    assert f["response_flops"] == flops
    assert f["weight_bytes"] == 4 * (
        sum(q.numel() for q in model.parameters()) - p.vocab * p.hidden
    )
    assert f["floor_s"] == max(f["weight_bytes"], flops) / 1e9


def test_whole_generation_benchmark(tmp_path) -> None:
    from maskkv.bench.whole import CONFIGURATIONS, plot_whole, report_whole, run_whole

    result = run_whole(
        "tiny", gen_length=16, block_length=8, tokens_per_step=2, progress=False, threads=1
    )
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == [c[0] for c in CONFIGURATIONS]
    assert result["config"]["tokens_per_step"] == 2 and result["config"]["steps"] == 8
    for r in result["rows"]:
        assert r["nfe"] == 8 and r["total_s"] > 0
        assert r["mean_tokens_per_step"] == 2  # the same fixed schedule everywhere
    assert rows["NoCache"]["extrapolated"] and rows["NoCache"]["speedup_vs_nocache"] == 1
    fast = rows["Fast-dLLM (FullCache + DualCache refresh_prompt)"]
    assert fast["passes"] == {"full": 2, "tail": 6}  # one refresh per block
    dual = rows["MaskKV + DualCache"]
    assert dual["passes"] == {"full": 1, "tail": 7} and dual["response_kv_bytes"] > 0
    assert dual["prompt_kv_bytes"] < fast["prompt_kv_bytes"]
    assert {t["target"] for t in result["targets"]} == {
        "MaskKV + DualCache vs Fast-dLLM config",
        "MaskKV + DualCache vs NoCache",
    }
    assert "x Fast-dLLM" in report_whole(result)
    assert plot_whole(result, tmp_path / "w.png").stat().st_size > 0
