"""The command line on tiny checkpoints: generate (with the chat template) and calibrate."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

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


def test_generate_rejects_two_rules_and_bad_threshold(tmp_path, capsys):
    path = tiny_checkpoint("llada", tmp_path / "m")
    argv = ["generate", "--model", str(path), "--prompt", "a b", "--gen-length", "4"]
    for extra, line in [
        (["--threshold", "0.9", "--factor", "1"], "--factor: give at most one of --threshold"),
        (["--threshold", "1.5"], "--threshold: expected a number in (0, 1], got 1.5"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main([*argv, *extra])
        assert exc.value.code == 2
        assert capsys.readouterr().err.startswith(f"maskkv generate: {line}")


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


def test_generate_needs_one_prompt(tmp_path, capsys):
    path = tiny_checkpoint("llada", tmp_path / "m")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(path)])
    assert exc.value.code == 2
    assert "--prompt: give exactly one of --prompt and --prompt-file" in capsys.readouterr().err


def _run_cli(argv, capsys):
    assert main(argv) == 0
    return capsys.readouterr().out.strip()


@pytest.mark.parametrize(
    "kind,options",
    [
        (
            "llada",
            dict(
                block_length=4,
                remasking="random",
                cfg_scale=1.5,
                temperature=0.5,
                logits_eos_inf=True,
                confidence_eos_eot_inf=True,
            ),
        ),
        ("dream", dict(alg="entropy", temperature=0.2, top_p=0.95, top_k=50, alg_temp=0.1)),
    ],
)
def test_generate_passes_sampling_options(tmp_path, capsys, kind, options):
    # The CLI's answer equals the API's with the same options and seed.
    import torch

    from maskkv import generate
    from maskkv.models import load_checkpoint

    path = tiny_checkpoint(kind, tmp_path / kind)
    argv = ["generate", "--model", str(path), "--prompt", "two plus two", "--method", "nocache"]
    argv += ["--gen-length", "8", "--steps", "4", "--seed", "3", "--dtype", "fp32"]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    printed = _run_cli(argv, capsys)

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_checkpoint(path).eval()
    if kind == "llada":
        model.config.eot_token_id = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    messages = [{"role": "user", "content": "two plus two"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    out = generate(model, ids, method="nocache", gen_length=8, steps=4, seed=3, **options)
    answer = out.responses[0]
    eos = model.config.eos_token_id
    if (answer == eos).any():
        answer = answer[: int((answer == eos).nonzero()[0])]
    assert printed == tokenizer.decode(answer.tolist(), skip_special_tokens=True)


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--alg", "greedy"),
        ("--remasking", "lowest"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--top-k", "-1"),
        ("--temperature", "-1"),
        ("--cfg-scale", "-0.5"),
        ("--alg-temp", "-1"),
        ("--block-length", "0"),
    ],
)
def test_generate_rejects_bad_options(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", "tiny-llada-kv", "--prompt", "x", flag, value])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith(f"maskkv generate: {flag}: ")


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "maskkv", "generate", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for flag in ("--alg", "--alg-temp", "--top-p", "--top-k", "--block-length", "--remasking"):
        assert flag in done.stdout
    assert "--cfg-scale" in done.stdout and "--confidence-eos-eot-inf" in done.stdout
