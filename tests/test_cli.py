"""The command line on tiny checkpoints: generate (with the chat template) and calibrate."""

import json

import pytest

from maskkv import methods
from maskkv.cli import main
from maskkv.testing import tiny_checkpoint


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_generate_prints_answer_and_stats(tmp_path, capsys, kind):
    path = tiny_checkpoint(kind, tmp_path / kind)
    argv = [
        "generate",
        "--model",
        str(path),
        "--prompt",
        "the cat sat on the mat " * 8,
        "--method",
        "snapkv",
        "--budget",
        "8",
        "--gen-length",
        "8",
        "--steps",
        "4",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "method SnapKV(budget=8" in err and "prompt KV" in err and "later steps" in err


@pytest.mark.parametrize(
    "extra",
    [
        ["--cache", "dual", "--threshold", "0.9", "--block-length", "4"],
        ["--cache", "prefix", "--refresh-prompt", "--factor", "1.0", "--block-length", "4"],
        ["--cache", "dllm", "--prompt-interval", "4", "--response-interval", "2"],
    ],
)
def test_generate_with_cache_policy_and_rule(tmp_path, capsys, extra):
    path = tiny_checkpoint("llada", tmp_path / "m")
    argv = ["generate", "--model", str(path), "--prompt", "a b c d " * 8, "--method", "snapkv"]
    argv += ["--budget", "8", "--gen-length", "8", "--steps", "4", *extra]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "forward passes" in err and "tokens per step" in err and "cached response KV" in err


def test_generate_rejects_two_rules_and_bad_threshold(tmp_path):
    path = tiny_checkpoint("llada", tmp_path / "m")
    argv = ["generate", "--model", str(path), "--prompt", "a b", "--gen-length", "4"]
    with pytest.raises(SystemExit, match="at most one of --threshold and --factor"):
        main([*argv, "--threshold", "0.9", "--factor", "1"])
    with pytest.raises(SystemExit, match="tau: expected a number in"):
        main([*argv, "--threshold", "1.5"])


def test_calibrate_writes_a_profile_that_maskkv_finds(tmp_path, capsys):
    path = tiny_checkpoint("llada", tmp_path / "m", n_layers=3)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a b c d e f"}) + "\n" + json.dumps("g h i j") + "\n")
    assert (
        main(["calibrate", "--model", str(path), "--prompts", str(prompts), "--gen-length", "4"])
        == 0
    )
    profile = methods.LayerProfile.find(path)
    assert profile is not None and profile.num_layers == 3 and profile.num_prompts == 2
    assert all(0.0 <= x <= 2.0 for x in profile.importance)
    assert "wrote" in capsys.readouterr().out


def test_generate_needs_one_prompt(tmp_path):
    path = tiny_checkpoint("llada", tmp_path / "m")
    with pytest.raises(SystemExit, match="exactly one of --prompt and --prompt-file"):
        main(["generate", "--model", str(path)])
