"""What every ``maskkv`` subcommand shares: one way to report bad input, one way to name a model.

The convention, for every subcommand (``demo``, ``generate``, ``calibrate``, ``bench``, ``eval``,
``serve``, and any added later):

- **Bad input ends in one line** on stderr, ``maskkv <cmd>: <argument>: <what is wrong>``, with exit
  status 2 and no traceback. Four sources end so:

  1. argparse's own errors (a value its ``type`` rejects, a choice not offered, a missing or an
     unrecognised option): ``maskkv generate: --budget: expected a value in [0, inf), got -3``;
  2. a :class:`UsageError` the command raises for what argparse cannot see (two options that
     exclude each other, a file whose content is wrong);
  3. a ``ValueError`` raised while the command runs: the library names the argument that is wrong
     (``"budget: expected ..."``, DESIGN "Bad input"), and the line names the option that sets it
     (``--budget``) when the command has one of that name;
  4. an ``OSError`` naming a file (a missing prompt file, an output folder not writable).

- **A model is a checkpoint directory or the name of a shipped model** (:func:`shipped_models`:
  ``tiny-llada-kv``, ``tiny-dream-kv``, whatever ``maskkv/assets/`` holds). :func:`resolve_model`
  maps either to the directory (an existing directory wins over an asset of the same name);
  :func:`add_model_argument` adds a ``--model`` option that does it while parsing, so the command
  sees a directory path.

A subcommand gets both by construction: ``maskkv.cli.build_parser`` makes a
:class:`CommandParser`, whose ``add_subparsers().add_parser(...)`` returns CommandParsers too, and
``maskkv.cli.main`` runs the chosen command through :meth:`CommandParser.run`. A new subcommand
is a function that registers itself, plus the function it runs::

    from maskkv.cli_common import UsageError, add_model_argument, number

    def add_serve_parser(subparsers):  # called from maskkv.cli.build_parser
        parser = subparsers.add_parser("serve", help="serve a model over HTTP")
        add_model_argument(parser, default="tiny-llada-kv")  # args.model: a directory
        parser.add_argument("--port", type=number(1, 65535, kind=int), default=8000)
        parser.set_defaults(func=_serve)

    def _serve(args):
        if args.host == "":
            raise UsageError("--host", "expected a host name or address")
        ...  # a ValueError("budget: ...") from the library ends as "maskkv serve: --budget: ..."

Argument types that report in the same form: :func:`number`, :func:`int_list`,
:func:`method_name`, :func:`method_names`, :func:`torch_device`, :func:`existing_file`,
:func:`model_directory`.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "ASSETS",
    "CommandParser",
    "UsageError",
    "add_model_argument",
    "existing_file",
    "int_list",
    "method_name",
    "method_names",
    "model_directory",
    "number",
    "resolve_model",
    "shipped_models",
    "torch_device",
]

#: The shipped models (trained by ``maskkv.quality.train``; each folder has a README.md).
ASSETS = Path(__file__).resolve().parent / "assets"


class UsageError(Exception):
    """Bad command-line input that argparse cannot see: ends the command as
    ``maskkv <cmd>: <argument>: <what>``, exit status 2 (see the module docstring)."""

    def __init__(self, argument: str, what: str):
        super().__init__(f"{argument}: {what}")
        self.argument = argument
        self.what = what

    @classmethod
    def wrap(cls, argument: str, err: Exception) -> UsageError:
        """A library error attributed to ``argument`` (an option), its own leading name dropped:
        ``wrap("--threshold", ValueError("tau: expected ..."))`` reads
        ``--threshold: expected ...``."""
        _, what = _split_name(str(err))
        return cls(argument, what)


# ----------------------------------------------------------------------------- models


def shipped_models() -> list[str]:
    """Names of the shipped models (folders of ``maskkv/assets`` with a config.json)."""
    if not ASSETS.is_dir():
        return []
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """The checkpoint directory that ``name_or_path`` names: an existing directory holding a
    config.json, or the name of a shipped model (an existing directory wins over an asset of the
    same name). ``ValueError`` naming ``model`` otherwise."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model: expected a checkpoint directory with a config.json, {str(path)!r} has none"
            )
        return path
    if str(name_or_path) in shipped_models():
        return ASSETS / str(name_or_path)
    raise ValueError(
        f"model: expected a checkpoint directory or a shipped model "
        f"({', '.join(shipped_models()) or 'none installed'}), got {str(name_or_path)!r}"
    )


def model_directory(text: str) -> str:
    """argparse type of a model argument: the checkpoint directory (``resolve_model``) as a
    string."""
    try:
        return str(resolve_model(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(_split_name(str(err))[1]) from None


def add_model_argument(
    parser: argparse.ArgumentParser, *, default: str | None = None, help: str | None = None
) -> argparse.Action:
    """``--model``: a checkpoint directory or a shipped model's name; ``args.model`` is the
    directory. Required unless ``default`` (a name or a path) is given."""
    names = ", ".join(shipped_models())
    text = help or f"checkpoint directory (config.json + safetensors) or a shipped model ({names})"
    if default is not None:
        text += f"; default {default}"
    return parser.add_argument(
        "--model", type=model_directory, required=default is None, default=default, help=text
    )


# ----------------------------------------------------------------------------- argument types


def number(lo: float, hi: float | None = None, *, lo_open: bool = False, kind: type = float):
    """argparse type: a ``kind`` (float or int) in [lo, hi] ((lo, hi] with ``lo_open``; no upper
    bound without ``hi``); the error names the range."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        ok = (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
        if not ok:
            lo_text = f"({lo}" if lo_open else f"[{lo}"
            hi_text = f"{hi}]" if hi is not None else "inf)"
            raise argparse.ArgumentTypeError(
                f"expected a value in {lo_text}, {hi_text}, got {text}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def int_list(lo: int = 1) -> Callable[[str], list[int]]:
    """argparse type: comma-separated ints, each >= ``lo``, at least one."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated ints, got {text!r}"
            ) from None
        if not values or min(values) < lo:
            raise argparse.ArgumentTypeError(f"expected comma-separated ints >= {lo}, got {text!r}")
        return values

    return parse


def method_name(text: str) -> str:
    """argparse type: a method name or alias (``maskkv.methods.get``), returned as typed."""
    from . import methods

    try:
        methods.get(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(_split_name(str(err))[1]) from None
    return text


def method_names(text: str) -> list[str]:
    """argparse type: comma-separated method names or aliases, at least one."""
    names = [x for x in text.replace(" ", "").split(",") if x]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated method names, got {text!r}")
    return [method_name(x) for x in names]


def torch_device(text: str) -> str:
    """argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``), as typed."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected a device such as cpu, cuda or cuda:0, got {text!r}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"expected cpu (CUDA is not available here), got {text!r}"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    return text


def existing_file(text: str) -> str:
    """argparse type: a path to a readable file, as typed."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


# ----------------------------------------------------------------------------- the parser

_NAME = re.compile(r"([A-Za-z_][\w.]*): (.*)", re.S)


def _split_name(message: str) -> tuple[str | None, str]:
    """("budget", "expected ...") from "budget: expected ..."; (None, message) without a name."""
    m = _NAME.fullmatch(message)
    return (m.group(1), m.group(2)) if m else (None, message)


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that reports bad input as one line
    ``<prog>: <argument>: <what>`` with exit status 2 (``prog`` is ``maskkv <cmd>`` for a
    subcommand), and runs the chosen subcommand's ``func`` under the same rule (:meth:`run`).
    Subparsers made by ``add_subparsers().add_parser`` are CommandParsers too (argparse gives
    them the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # The innermost parser that parsed a command line: its defaults overwrite its parent's,
        # so after parsing ``args._command_parser`` is the subcommand's parser.
        self.set_defaults(_command_parser=self)

    def fail(self, argument: str | None, what: str) -> NoReturn:
        """Print ``<prog>: <argument>: <what>`` (``<prog>: <what>`` without an argument, for a
        message that starts with its own subject) on one line and exit with status 2."""
        line = f"{argument}: {what}" if argument else str(what)
        self.exit(2, f"{self.prog}: {' '.join(line.split())}\n")  # one line, whatever it held

    def error(self, message: str) -> NoReturn:
        """argparse's errors, reworded as ``<argument>: <what>`` (no usage block)."""
        if m := re.fullmatch(r"argument (.+?): (.*)", message, re.S):
            self.fail(m.group(1), m.group(2))
        required = "the following arguments are required: "
        if message.startswith(required):
            self.fail(message[len(required) :], "required")
        if m := re.fullmatch(r"ambiguous option: (\S+) (.*)", message, re.S):
            self.fail(m.group(1), f"ambiguous: {m.group(2)}")
        self.fail("arguments", message)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        # Unrecognised arguments are reported by the subcommand that got them, not the root.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = getattr(parsed, "_command_parser", self)
            parser.fail(" ".join(extras), "unrecognized argument" + "s" * (len(extras) > 1))
        return parsed

    def option_for(self, name: str) -> str | None:
        """The option that sets ``args.<name>`` (its long form), or None."""
        for action in self._actions:
            if action.dest == name and action.option_strings:
                return max(action.option_strings, key=len)
        return None

    def run(self, argv: Sequence[str] | None = None) -> int:
        """Parse ``argv`` and call the chosen command's ``func(args)``; bad input, raised as
        :class:`UsageError`, ``ValueError`` or a file's ``OSError``, ends as one line with exit
        status 2 (the module docstring). Returns 0."""
        args = self.parse_args(argv)
        parser: CommandParser = getattr(args, "_command_parser", self)
        try:
            args.func(args)
        except UsageError as err:
            parser.fail(err.argument, err.what)
        except ValueError as err:
            name, what = _split_name(str(err))
            option = parser.option_for(name) if name else None
            parser.fail(option or name, what)
        except OSError as err:
            if err.filename is None:  # not about a file the user named: a real failure
                raise
            parser.fail(str(err.filename), err.strerror or str(err))
        return 0
