"""``python -m maskkv.eval_harness ARGS``: lm-eval's command line (``lm_eval ARGS``) with the
``maskkv`` model registered. Works under ``accelerate launch -m maskkv.eval_harness ARGS``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import maskkv.eval_harness  # noqa: F401  (registers the "maskkv" model)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
