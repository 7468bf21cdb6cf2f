"""Layer-importance profiles: I(l) = 1 - mean cos(residual before attention, residual after it).

A profile is measured once per model on calibration prompts (``maskkv calibrate``) and stored as
JSON next to the checkpoint (``maskkv_profile.json``). MaskKV and SqueezeAttention turn it into
layer budgets; a layer whose attention block barely changes the residual stream (cosine close to
1, importance close to 0) is the cheapest place to evict.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

__all__ = ["PROFILE_FILENAME", "LayerProfile", "MissingProfileWarning"]

PROFILE_FILENAME = "maskkv_profile.json"
_FORMAT = "maskkv.layer_profile"
_VERSION = 1


class MissingProfileWarning(UserWarning):
    """A profile-driven method ran without a profile and fell back to uniform layer budgets."""


# One warning per method name per process: a generation loop calls layer_budgets once per prompt,
# and a benchmark over hundreds of prompts must not bury its output in identical warnings.
_warned: set[str] = set()


def warn_missing_profile(method: str) -> None:
    """Warn (once per process and method) that ``method`` falls back to uniform layer budgets."""
    if method in _warned:
        return
    _warned.add(method)
    warnings.warn(
        f"{method}: no layer-importance profile given; falling back to uniform layer budgets. "
        f"Run `maskkv calibrate` to write {PROFILE_FILENAME} next to the model and pass "
        "LayerProfile.find(model_dir).",
        MissingProfileWarning,
        stacklevel=4,  # the caller of layer_budgets
    )


def _reset_missing_profile_warnings() -> None:
    """Forget which warnings were issued (tests only)."""
    _warned.clear()


def _importance_list(values: Any, what: str) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{what}: expected a non-empty list of finite floats, got {values!r}")
    out = []
    for i, x in enumerate(values):
        if isinstance(x, bool) or not isinstance(x, Real) or not math.isfinite(float(x)):
            raise ValueError(f"{what}: expected finite floats, got {x!r} at index {i}")
        out.append(float(x))
    return out


@dataclass
class LayerProfile:
    """Per-layer attention importance I(l) of one model.

    Attributes:
        importance: I(l) = 1 - mean cos(h_in, h_out) per layer, h_in / h_out the residual stream
            before / after layer l's attention block (mean over calibration tokens and prompts).
            Values lie in [0, 2] up to rounding; schedules read negatives as 0.
        model_type: the ``config.model_type`` the profile was measured on ("llada", "dream"), if
            known; informational.
        num_prompts: how many calibration prompts were averaged.
        meta: free-form JSON-serialisable calibration details (dataset, prompt length, dtype).
    """

    importance: list[float]
    model_type: str | None = None
    num_prompts: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.importance = _importance_list(self.importance, "importance")
        if self.model_type is not None and not isinstance(self.model_type, str):
            raise ValueError(f"model_type: expected a str or None, got {self.model_type!r}")
        n = self.num_prompts
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_prompts: expected a non-negative int, got {n!r}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta: expected a dict, got {self.meta!r}")

    @property
    def num_layers(self) -> int:
        return len(self.importance)

    @classmethod
    def from_cosines(
        cls,
        cosines: Sequence[float],
        *,
        model_type: str | None = None,
        num_prompts: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> LayerProfile:
        """Build a profile from per-layer mean cosines: I(l) = 1 - cosines[l]."""
        cos = _importance_list(cosines, "cosines")
        return cls(
            [1.0 - c for c in cos],
            model_type=model_type,
            num_prompts=num_prompts,
            meta=dict(meta or {}),
        )

    def check(self, num_layers: int) -> None:
        """Raise ``ValueError`` naming ``profile`` unless it has exactly ``num_layers`` layers."""
        if self.num_layers != num_layers:
            raise ValueError(
                f"profile: has {self.num_layers} layers, expected num_layers={num_layers} "
                "(was it measured on another model?)"
            )

    # ------------------------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "metric": "1 - mean cos(residual before attention, residual after attention)",
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_prompts": self.num_prompts,
            "importance": list(self.importance),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Any) -> LayerProfile:
        if not isinstance(data, dict):
            raise ValueError(f"profile: expected a JSON object, got {type(data).__name__}")
        if data.get("format", _FORMAT) != _FORMAT:
            raise ValueError(f"profile: expected format {_FORMAT!r}, got {data.get('format')!r}")
        if "importance" not in data:
            raise ValueError("profile: missing key 'importance'")
        prof = cls(
            importance=data["importance"],
            model_type=data.get("model_type"),
            num_prompts=data.get("num_prompts", 0),
            meta=data.get("meta") or {},
        )
        if "num_layers" in data and data["num_layers"] != prof.num_layers:
            raise ValueError(
                f"profile: num_layers={data['num_layers']!r} but importance has "
                f"{prof.num_layers} entries"
            )
        return prof

    @staticmethod
    def _file(path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        return p / PROFILE_FILENAME if p.is_dir() else p

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON to ``path`` (a file, or a model directory: then ``maskkv_profile.json`` in
        it). Returns the file written."""
        f = self._file(path)
        # allow_nan=False: the validated values are finite, and strict JSON stays portable.
        f.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return f

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LayerProfile:
        """Read and validate a profile written by :meth:`save` (file or model directory)."""
        f = cls._file(path)
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"profile: {f} is not valid JSON ({e})") from e
        return cls.from_dict(data)

    @classmethod
    def find(cls, model_dir: str | os.PathLike[str] | None) -> LayerProfile | None:
        """The profile stored next to a local model, or ``None`` (no file, or not a directory,
        e.g. a hub id)."""
        if model_dir is None:
            return None
        f = Path(model_dir) / PROFILE_FILENAME
        return cls.load(f) if f.is_file() else None
