"""The method object, the registry behind ``maskkv.methods.get`` and exact integer apportioning.

A method is (score, layer budgets, head budgets) -- DESIGN.md "Method =":

- ``score``: how the first denoising step ranks prompt keys, ``"mask"`` (MaskKV's mask-query
  voting) or ``"window"`` (SnapKV's last-W-prompt-tokens window);
- ``layer_budgets``: k_l per layer, the average number of prompt KV pairs kept per KV head of
  layer l (offline, from the budget B, the prompt length and maybe a layer-importance profile);
- ``head_budget``: how ``maskkv_kernels.allocate_head_budgets`` splits Hkv * k_l between heads.

The budget B is the average number of prompt KV pairs kept per (layer, KV head); response KV is
always kept and never counted. Every schedule returns integers in [0, prompt_len]; where the
formula says so they sum to exactly B * num_layers; a prompt with P <= B keeps everything.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .profile import LayerProfile

if TYPE_CHECKING:
    import torch

__all__ = [
    "Method",
    "WindowMethod",
    "apportion",
    "available",
    "get",
    "register",
]

# ----------------------------------------------------------------------------- validation


def check_int(value: Any, name: str, *, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        kind = "a non-negative int" if minimum == 0 else f"an int >= {minimum}"
        raise ValueError(f"{name}: expected {kind}, got {value!r}")
    return int(value)


def check_unit(value: Any, name: str) -> float:
    """``value`` as a float in [0, 1], else ``ValueError`` naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(float(value))
        or not 0.0 <= float(value) <= 1.0
    ):
        raise ValueError(f"{name}: expected a float in [0, 1], got {value!r}")
    return float(value)


def exact(x: float | int) -> Fraction:
    """The number the user typed, as an exact fraction: 0.4 -> 2/5 (not 0.40000000000000002).

    Going through ``repr`` (the shortest string that round-trips) keeps floor(0.29 * 100) at 29,
    where binary floats would give 28.
    """
    return Fraction(repr(float(x))) if isinstance(x, float) else Fraction(x)


# ----------------------------------------------------------------------------- apportioning


def apportion(quotas: Sequence[Fraction], total: int, cap: int) -> list[int]:
    """Integers in [0, cap] summing to exactly ``total``, as close as possible to ``quotas``.

    Same two steps as the head-budget allocators in ``maskkv_kernels`` (DESIGN "Head budgets"):

    1. water-filling: entries whose (rescaled) quota exceeds ``cap`` are pinned at ``cap`` and the
       rest of ``total`` is shared by the others in proportion to their quotas (evenly if those
       are all 0), until nothing overflows -- so clamping to the prompt never loses budget;
    2. largest remainder: floors, then +1 to the largest fractional parts, ties to the lower
       index.

    Exact rational arithmetic throughout, so the result does not depend on float rounding.
    """
    n = len(quotas)
    if not 0 <= total <= n * cap:
        raise ValueError(f"total: expected in [0, {n * cap}], got {total}")
    q = [max(Fraction(x), Fraction(0)) for x in quotas]
    pinned = [False] * n
    share = list(q)
    while True:
        free = [i for i in range(n) if not pinned[i]]
        if not free:
            break
        left = total - cap * (n - len(free))
        weight = sum((q[i] for i in free), Fraction(0))
        for i in free:
            share[i] = q[i] * left / weight if weight > 0 else Fraction(left, len(free))
        over = [i for i in free if share[i] > cap]
        if not over:
            break
        for i in over:
            pinned[i] = True
            share[i] = Fraction(cap)
    out = [math.floor(s) for s in share]
    left = total - sum(out)
    # Every fractional part is < 1 and they sum to `left`, so only entries with a positive
    # fraction get +1, and those are below cap: the cap holds after rounding.
    order = sorted(range(n), key=lambda i: (-(share[i] - out[i]), i))
    for i in order[:left]:
        out[i] += 1
    return out


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Method]] = {}
_ALIASES: dict[str, str] = {}

M = TypeVar("M", bound="type[Method]")


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "").replace(" ", "")


def register(*aliases: str) -> Callable[[M], M]:
    """Class decorator: make a method reachable as ``get(cls.name)`` and ``get(alias)``.

    Names are case-insensitive and ignore ``-``/``_``, so "SqueezeAttention", "squeeze_attention"
    and "squeeze-attention" are one name.
    """

    def deco(cls: M) -> M:
        canonical = cls.name
        for key in (canonical, *aliases):
            k = _normalize(key)
            if k in _ALIASES and _ALIASES[k] != canonical:
                raise ValueError(f"name: {key!r} already names method {_ALIASES[k]!r}")
            _ALIASES[k] = canonical
        _REGISTRY[canonical] = cls
        return cls

    return deco


def available() -> list[str]:
    """Canonical method names, in registration order (the order of the paper's tables)."""
    return list(_REGISTRY)


def get(name: str | Method, **params: Any) -> Method:
    """A method by name (case-insensitive; aliases such as "squeeze", "full", "vanilla"), built
    with ``params``; or a :class:`Method` instance, copied with ``params`` replaced.

    Unknown names and unknown parameters raise ``ValueError`` naming them.
    """
    if isinstance(name, Method):
        cls: type[Method] = type(name)
    elif isinstance(name, str) and _normalize(name) in _ALIASES:
        cls = _REGISTRY[_ALIASES[_normalize(name)]]
    else:
        raise ValueError(
            f"name: unknown method {name!r}; expected one of {', '.join(available())} "
            f"(aliases: {', '.join(sorted(k for k, v in _ALIASES.items() if k != v))})"
        )
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in params:
        if key not in allowed:
            raise ValueError(
                f"{key}: not a parameter of {cls.name}; expected one of {', '.join(allowed)}"
            )
    if isinstance(name, Method):
        return dataclasses.replace(name, **params) if params else name
    return cls(**params)


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """Base of every method: a small frozen dataclass whose ``repr`` shows every parameter.

    Subclasses set the class attributes ``name``, ``score`` and ``head_budget``, add their
    parameters as fields with defaults, and override :meth:`_schedule` when their layer budgets
    are not uniform. Adding a method is one file: subclass, decorate with :func:`register`,
    import it in ``maskkv/methods/__init__.py``.

    Attributes:
        budget: B, the average number of prompt KV pairs kept per (layer, KV head).
    """

    name: ClassVar[str] = "method"
    #: "mask" | "window"; None for the methods that keep the whole prompt.
    score: ClassVar[str | None] = None
    #: "uniform" | "prompt_preference" | "adakv" (maskkv_kernels.allocate_head_budgets modes).
    head_budget: ClassVar[str] = "uniform"
    #: Mask scoring: which step-1 queries vote. False: the response positions (the [MASK]
    #: tokens; MaskKV). True: every tail position, i.e. also the prompt positions the engine
    #: recomputes at every later step (Dream's last one, which predicts the first response token).
    tail_votes: ClassVar[bool] = False

    budget: int = 256

    def __post_init__(self) -> None:
        self._validate()

    def _set(self, field: str, value: Any) -> None:
        # Frozen dataclass: normalise validated values (1 -> 1.0, numpy ints -> int) in place.
        object.__setattr__(self, field, value)

    def _validate(self) -> None:
        self._set("budget", check_int(self.budget, "budget"))

    # ------------------------------------------------------------------------------- traits

    @property
    def evicts(self) -> bool:
        """True for the five eviction methods: the first step prunes the prompt KV."""
        return True

    @property
    def caches_prompt(self) -> bool:
        """False only for NoCache, which recomputes the prompt at every step."""
        return True

    @property
    def head_alpha(self) -> float | None:
        """The ``alpha`` passed to the head allocator: MaskKV's alpha, AdaKV's safeguard."""
        return None

    def params(self) -> dict[str, Any]:
        """``{"name": ..., **fields}``: what result files record about the method."""
        return {"name": self.name, **dataclasses.asdict(self)}

    # ------------------------------------------------------------------------ layer budgets

    def layer_budgets(
        self,
        num_layers: int,
        prompt_len: int,
        profile: LayerProfile | Sequence[float] | None = None,
    ) -> list[int]:
        """k_l for every layer: ints in [0, prompt_len].

        Eviction methods sum to exactly ``budget * num_layers`` when ``prompt_len > budget``;
        a prompt with ``prompt_len <= budget`` keeps everything (every layer gets
        ``prompt_len``). ``profile`` (a :class:`LayerProfile` or a list of I(l)) must have
        ``num_layers`` entries whether or not the method reads it.
        """
        L = check_int(num_layers, "num_layers", minimum=1)
        P = check_int(prompt_len, "prompt_len")
        prof = self._check_profile(profile, L)
        if not self.evicts or P <= self.budget:
            return [P] * L
        self._check_prompt(P)
        return [min(max(k, 0), P) for k in self._schedule(L, P, prof)]

    @staticmethod
    def _check_profile(
        profile: LayerProfile | Sequence[float] | None, num_layers: int
    ) -> LayerProfile | None:
        if profile is None:
            return None
        if not isinstance(profile, LayerProfile):
            try:
                profile = LayerProfile(list(profile))
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"profile: expected a LayerProfile or a list of floats, got {profile!r}"
                ) from e
        profile.check(num_layers)
        return profile

    def _check_prompt(self, prompt_len: int) -> None:
        """Hook: reject prompts the method cannot evict from (called only when P > B)."""

    def _schedule(self, L: int, P: int, profile: LayerProfile | None) -> list[int]:
        """The method's layer budgets for P > B (the caller clamps to [0, P])."""
        return [self.budget] * L

    # ------------------------------------------------------------------------- selection

    def window_size(self, layer_budget: int) -> int:
        """Observation-window length for window scoring at this layer budget; 0 for mask
        scoring (and for the methods that do not evict)."""
        check_int(layer_budget, "layer_budget")
        return 0

    def selector_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``maskkv_kernels.select_and_gather`` (score, head_budget,
        alpha; plus pool and pool_kernel for window scoring). Empty when nothing is evicted."""
        if not self.evicts:
            return {}
        return {"score": self.score, "head_budget": self.head_budget, "alpha": self.head_alpha}

    def allocate_head_budgets(
        self,
        scores: torch.Tensor,
        layer_budget: int,
        *,
        mask_mass: torch.Tensor | None = None,
        prompt_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Split ``Hkv * layer_budget`` between heads with this method's allocator.

        A thin call of ``maskkv_kernels.allocate_head_budgets`` (mode ``self.head_budget``,
        alpha ``self.head_alpha``): scores fp32 [B, Hkv, P] -> int32 [B, Hkv].
        """
        import maskkv_kernels as mk  # lazy: listing method names must not import Triton

        kwargs: dict[str, Any] = {"mask_mass": mask_mass, "alpha": self.head_alpha}
        if prompt_lens is not None:
            kwargs["prompt_lens"] = prompt_lens
        return mk.allocate_head_budgets(scores, layer_budget, mode=self.head_budget, **kwargs)


@dataclass(frozen=True)
class WindowMethod(Method):
    """The SnapKV family: score prompt keys by the attention of the last ``window`` prompt tokens,
    pooled over the non-window positions (DESIGN "Window score").

    Attributes:
        window: W, the observation window (the last W prompt tokens, always kept, counted
            inside the budget). With small budgets it shrinks: see :meth:`window_size`.
        pool: "max" (SnapKV), "avg", or "none" (no pooling, an ablation).
        pool_kernel: odd pooling kernel (stride 1, same padding).
    """

    score: ClassVar[str | None] = "window"

    window: int = 32
    pool: str = "max"
    pool_kernel: int = 7

    def _validate(self) -> None:
        super()._validate()
        self._set("window", check_int(self.window, "window", minimum=1))
        if self.pool not in ("max", "avg", "none"):
            raise ValueError(f"pool: expected one of 'max', 'avg', 'none', got {self.pool!r}")
        k = check_int(self.pool_kernel, "pool_kernel", minimum=1)
        if k % 2 == 0:
            raise ValueError(f"pool_kernel: expected an odd int (same padding), got {k}")
        self._set("pool_kernel", k)

    def _check_prompt(self, prompt_len: int) -> None:
        # The window is the last W prompt tokens and selection ranks the P - W tokens before
        # it; a window covering the whole prompt leaves nothing to rank, so a request to evict
        # with such a window is contradictory. (Only checked when evicting: P <= B keeps all.)
        if self.window >= prompt_len:
            raise ValueError(
                f"window: expected fewer than prompt_len={prompt_len} tokens when evicting "
                f"(budget={self.budget} < prompt_len), got {self.window}"
            )

    def window_size(self, layer_budget: int) -> int:
        """W = min(window, layer_budget // 2): the window always leaves room for selection."""
        return min(self.window, check_int(layer_budget, "layer_budget") // 2)

    def selector_kwargs(self) -> dict[str, Any]:
        return {**super().selector_kwargs(), "pool": self.pool, "pool_kernel": self.pool_kernel}
