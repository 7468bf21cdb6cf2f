"""PyramidKV (Cai et al., 2024): (window, pyramid, uniform).

Layer budgets follow KVCache-Factory's arithmetic, as DESIGN "Layer budgets" states: with the
window W and beta,

    min = (B - W) / beta,  max = 2 (B - W) - min
    if max >= P - W:  max = P - W,  min = 2 (B - W) - max
    k_l = W + round(max - l * (max - min) / (layers - 1))

so layer 0 keeps the most and the mean is B. Two choices differ from KVCache-Factory's code:

- exact rational arithmetic and round-half-even (Python's ``round``) instead of its floor
  divisions ``(B - W) // beta`` and ``steps = (max - min) // (layers - 1)``, which lose budget
  (its mean is below B). Since max + min = 2 (B - W) is even, the layers pair up as l and
  layers-1-l with x_l + x_{layers-1-l} = 2 (B - W), and round-half-even maps every such pair
  (halves included) to integers with the same sum: the total is exactly B * layers.
- W is the effective window min(window, B // 2) (DESIGN "Window score"), so B - W >= 0 at every
  budget. No fall-back to uniform budgets when min < W (kvpress has one; it would make PyramidKV
  equal SnapKV at every budget the paper tests).
One layer gets B.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real

from .base import WindowMethod, check_int, exact, register
from .profile import LayerProfile


@register("pyramid", "pyramid_kv")
@dataclass(frozen=True)
class PyramidKV(WindowMethod):
    """PyramidKV: window scores, pyramid layer budgets (most at layer 0), uniform head budgets.

    Attributes:
        beta: ratio max/min steepness knob of the pyramid (min = (B - W) / beta); >= 1.
    """

    name = "pyramidkv"
    head_budget = "uniform"

    beta: float = 20

    def _validate(self) -> None:
        super()._validate()
        b = self.beta
        # beta < 1 would put min above max (an upside-down pyramid), and below 1/2 max < 0.
        if isinstance(b, bool) or not isinstance(b, Real) or not 1 <= float(b) < float("inf"):
            raise ValueError(f"beta: expected a finite number >= 1, got {b!r}")
        self._set("beta", int(b) if isinstance(b, Integral) else float(b))

    @property
    def effective_window(self) -> int:
        """The W of the schedule: min(window, budget // 2)."""
        return min(self.window, self.budget // 2)

    def window_size(self, layer_budget: int) -> int:
        """The schedule's W = min(window, budget // 2) (at most ``layer_budget``).

        Not ``layer_budget // 2`` as for SnapKV: every layer's budget is W + x_l by
        construction, and shrinking the window on the thin top layers would change the
        schedule PyramidKV defines (KVCache-Factory keeps the full window on every layer).
        """
        return min(self.effective_window, check_int(layer_budget, "layer_budget"))

    def _schedule(self, L: int, P: int, profile: LayerProfile | None) -> list[int]:
        B, W = self.budget, self.effective_window
        if L == 1:
            return [B]
        span = 2 * (B - W)
        lo = Fraction(B - W) / exact(self.beta)
        hi = span - lo
        if hi >= P - W:
            hi = Fraction(P - W)
            lo = span - hi
        step = (hi - lo) / (L - 1)
        return [W + round(hi - i * step) for i in range(L)]
