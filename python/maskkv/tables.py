"""The one fixed-width table printer of ``maskkv bench`` and ``maskkv eval``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["format_cell", "format_rows"]

#: A column: (header, row key, format). Format: None (``str``), a format spec such as ".3f", or a
#: float scale (the value times the scale, 3 significant digits).
Column = tuple[str, str, "float | str | None"]


def format_cell(value: Any, fmt: float | str | None = None) -> str:
    """One cell: "-" for None, ``str`` for strings or without a format, else as ``fmt`` says."""
    if value is None:
        return "-"
    if fmt is None or isinstance(value, str):
        return str(value)
    if isinstance(fmt, str):
        return format(value, fmt)
    v = value * fmt
    if not math.isfinite(v):
        return "nan"
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"


def format_rows(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Right-aligned fixed-width table of ``rows``; columns without any value are left out."""
    cols = [c for c in columns if any(r.get(c[1]) is not None for r in rows)]
    cells = [[c[0] for c in cols]] + [[format_cell(r.get(k), f) for _, k, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)
