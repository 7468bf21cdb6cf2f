"""The command-line convention of every subcommand (``maskkv.cli_common``): bad input ends in one
line ``maskkv <cmd>: <argument>: <what>`` with exit status 2, and a model argument takes a
checkpoint directory or a shipped model's name. Subcommands are found in the parser, so one added
later is checked without a change here."""

import argparse
import json
import re

import pytest

from maskkv import cli_common
from maskkv.cli import build_parser, main

SUBCOMMANDS = sorted(
    next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
)


def _fails(argv, capsys) -> str:
    """Run ``maskkv argv``; it must exit with status 2 and print exactly one line on stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and err.endswith("\n") and err.count("\n") == 1, err
    return err.rstrip("\n")


def _subparser(name: str) -> argparse.ArgumentParser:
    root = build_parser()
    return next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def test_every_subcommand_is_listed():
    assert {"demo", "generate", "calibrate", "bench", "eval"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_reports_an_unknown_option_in_one_line(command, capsys):
    line = _fails([command, "--model", "/no/such/model", "--no-such-option"], capsys)
    # The first thing wrong is reported: the model (where the command takes one), a required
    # option, or the unknown option; always named by the command, in the convention's form.
    assert re.fullmatch(rf"maskkv {command}: --[a-z-]+( \S+)*: \S.*", line), line


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_model_option_takes_a_directory_or_a_shipped_name(command):
    actions = [a for a in _subparser(command)._actions if "--model" in a.option_strings]
    for action in actions:
        assert action.type is cli_common.model_directory
        assert "tiny-llada-kv" in action.help


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["generate", "--model", "nope", "--prompt", "x"],
            "maskkv generate: --model: expected a checkpoint directory or a shipped model "
            "(tiny-dream-kv, tiny-llada-kv, tiny-llada2-kv), got 'nope'",
        ),
        (
            ["generate", "--model", "tiny-llada-kv", "--prompt", "x", "--budget", "-3"],
            "maskkv generate: --budget: expected a value in [0, inf), got -3",
        ),
        (
            ["generate", "--model", "tiny-llada-kv", "--prompt", "x", "--method", "foo"],
            "maskkv generate: --method: unknown method 'foo'; expected one of",
        ),
        (
            ["generate", "--model", "tiny-llada-kv"],
            "maskkv generate: --prompt: give exactly one of --prompt and --prompt-file",
        ),
        (["generate", "--prompt", "x"], "maskkv generate: --model: required"),
        (
            ["generate", "--model", "tiny-llada-kv", "--prompt", "x", "--threshold", "0.9"]
            + ["--factor", "1"],
            "maskkv generate: --factor: give at most one of --threshold and --factor",
        ),
        (
            ["generate", "--model", "tiny-llada-kv", "--prompt", "x", "--threshold", "1.5"],
            "maskkv generate: --threshold: expected a number in (0, 1], got 1.5",
        ),
        (
            ["calibrate", "--model", "tiny-llada-kv", "--prompts", "/no/such.jsonl"],
            "maskkv calibrate: --prompts: no such file: '/no/such.jsonl'",
        ),
        (["bench", "--methods", "maskkv,foo"], "maskkv bench: --methods: unknown method 'foo'"),
        (["bench", "--prompt-lens", "4k"], "maskkv bench: --prompt-lens: expected comma-sep"),
        (["eval", "--budgets", "8,x"], "maskkv eval: --budgets: expected comma-separated"),
        (["eval", "--tasks", "nope"], "maskkv eval: --tasks: unknown task 'nope'"),
        (
            ["eval", "--tasks", "kv_retrieval", "--prompt-len", "100"],
            "maskkv eval: --prompt-len: kv_retrieval needs >= 192 tokens, got 100",
        ),
        (["eval", "--model", "/no/such/model"], "maskkv eval: --model: expected a checkpoint"),
        (["demo", "--example", "-1"], "maskkv demo: --example: expected a value in [0, inf)"),
        ([], "maskkv: command: required"),
        (["nope"], "maskkv: command: invalid choice: 'nope'"),
    ],
)
def test_bad_input_names_the_argument(argv, line, capsys):
    assert _fails(argv, capsys).startswith(line)


def test_model_directory_needs_a_config(tmp_path, capsys):
    line = _fails(["eval", "--model", str(tmp_path)], capsys)
    assert line == (
        f"maskkv eval: --model: expected a checkpoint directory with a config.json, "
        f"'{tmp_path}' has none"
    )


def test_calibrate_checks_its_prompts_and_keeps_a_shipped_profile(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"a b c"\n{not json\n')
    argv = ["calibrate", "--model", "tiny-llada-kv", "--prompts", str(prompts)]
    line = _fails(argv, capsys)  # writing next to a shipped model needs --out
    assert line.startswith("maskkv calibrate: --out: required for a shipped model")
    line = _fails([*argv, "--out", str(tmp_path / "profile.json")], capsys)
    assert line == (
        f"maskkv calibrate: --prompts: {prompts}:2: not JSON (Expecting property name enclosed "
        "in double quotes)"
    )


def test_resolve_model_prefers_an_existing_directory(tmp_path, monkeypatch):
    assert cli_common.resolve_model("tiny-dream-kv") == cli_common.ASSETS / "tiny-dream-kv"
    local = tmp_path / "tiny-dream-kv"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"model_type": "dream"}))
    monkeypatch.chdir(tmp_path)
    assert cli_common.resolve_model("tiny-dream-kv") == local.relative_to(tmp_path)
    with pytest.raises(ValueError, match="model: expected a checkpoint directory or a shipped"):
        cli_common.resolve_model("no-such-model")


def _tool(func) -> cli_common.CommandParser:
    parser = cli_common.CommandParser(prog="maskkv tool")
    parser.add_argument("--budget-limit", type=int, default=1)
    parser.set_defaults(func=func)
    return parser


def _raise(err):
    def func(args):
        raise err

    return func


@pytest.mark.parametrize(
    "err, line",
    [
        (
            ValueError("budget_limit: expected >= 0, got -1"),
            "--budget-limit: expected >= 0, got -1",
        ),
        (ValueError("prompt_lens: expected\nints"), "prompt_lens: expected ints"),
        (ValueError("checkpoint /x: no config.json"), "checkpoint /x: no config.json"),
        (cli_common.UsageError("--port", "expected 1..65535"), "--port: expected 1..65535"),
        (
            FileNotFoundError(2, "No such file or directory", "out.json"),
            "out.json: No such file or directory",
        ),
    ],
)
def test_errors_raised_while_running_end_in_one_line(err, line, capsys):
    # A ValueError whose leading name is an option's dest is reported under that option; other
    # names stay; a message without a name is printed as it is; newlines are folded.
    with pytest.raises(SystemExit) as exc:
        _tool(_raise(err)).run([])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"maskkv tool: {line}\n"


def test_other_failures_keep_their_traceback():
    with pytest.raises(RuntimeError, match="a bug"):
        _tool(_raise(RuntimeError("a bug"))).run([])
    with pytest.raises(BrokenPipeError):  # an OSError about no file the user named
        _tool(_raise(BrokenPipeError(32, "Broken pipe"))).run([])


def test_generate_takes_a_shipped_model_by_name(capsys):
    argv = ["generate", "--model", "tiny-llada-kv", "--prompt", "the sky is blue. |code?"]
    argv += ["--no-chat-template", "--gen-length", "4", "--steps", "4", "--budget", "8"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "method MaskKV(budget=8" in err and "prompt KV" in err
