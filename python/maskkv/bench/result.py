"""What one benchmark run returns and how it is judged: ``BenchResult``, the later-step statistic
behind the ratios, and the DESIGN targets checked on the measured rows.

``runner.py`` fills a ``BenchResult`` and checks its targets; ``report.py`` prints and plots it.
Both import this module and neither imports the other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .presets import _TARGETS


@dataclass
class BenchResult:
    """Everything one ``run_e2e`` measured; ``to_dict()`` is what the JSON file holds."""

    preset: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    ceilings: dict[str, float] | None = None
    search: dict[str, Any] | None = None
    targets: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def row(self, method: str, prompt_len: int) -> dict[str, Any] | None:
        """The row of ``method`` (any alias) at ``prompt_len``, if it ran."""
        from .. import methods

        name = methods.get(method).name
        for r in self.rows:
            if r["method"] == name and r["prompt_len"] == prompt_len:
                return r
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return None
    return a / b


# Which later-step statistic the ratios and targets use. "median" is the engine's
# `later_step_time`; "min" is robust to other processes' load on a shared machine (load only ever
# adds time), at the price of being optimistic on a quiet one.
_LATER_KEY = {"median": "later_step_s", "min": "later_step_min_s"}


def _check(name: str, measured: float | None, op: str, bound: float, note: str = "") -> dict:
    if measured is None or not math.isfinite(measured):
        status = "N/A"
    else:
        status = "PASS" if (measured >= bound if op == ">=" else measured <= bound) else "MISS"
    return {
        "target": name,
        "measured": measured,
        "op": op,
        "bound": bound,
        "status": status,
        "note": note,
    }


def check_targets(result: BenchResult) -> list[dict[str, Any]]:
    """DESIGN "Performance contract" targets, from the measured rows (PASS / MISS / N/A).

    CPU preset at an 8k prompt: MaskKV later steps >= 50x NoCache and >= 2x FullCache.
    llada-8b at a 32k prompt: >= 100x NoCache, later step <= 1.5x the floor, peak memory <= 50%
    of FullCache's, and (with the search) longest prompt >= 8x FullCache's.
    N/A: the row needed was not measured (another prompt length, an OOM, a method left out).
    """
    if result.preset not in _TARGETS:
        return []
    P, specs = _TARGETS[result.preset]
    r = result.row("maskkv", P) or {}
    why = "" if r.get("status") == "ok" else f"MaskKV at P={P} not measured"
    checks = [
        _check(f"{result.preset} P={P}: MaskKV {what}", r.get(key), op, bound, why)
        for what, key, op, bound in specs
    ]
    if result.preset == "llada-8b":
        s = result.search or {}
        fc, mkv = s.get("fullcache", {}), s.get("maskkv", {})
        note = "" if s else "run with --max-prompt-search"
        if mkv and mkv.get("first_oom") is None:
            note = f"MaskKV fit up to the search limit {mkv.get('limit')}: a lower bound"
        ratio = _ratio(mkv.get("max_fit"), fc.get("max_fit"))
        checks.append(_check("llada-8b: longest prompt MaskKV / FullCache", ratio, ">=", 8, note))
    return checks
