"""Cache policies: what each denoising step recomputes, and which cached KV it reads.

Eviction (the ``Method``) decides *which prompt KV* survives; a cache policy decides *what is
recomputed at each step*. The two are independent: every policy works with every method.

The engine asks the policy for a ``StepPlan`` before every forward pass. Positions are given in
*tail coordinates*: the tail is everything after the cached prompt region, ``x[:, Pc:]`` with
``Pc = P - shift`` (Dream keeps its last prompt position in the tail because it predicts token
``i`` from position ``i - 1``), so the logits of response position ``r`` come from tail index
``r`` for both models.

- ``PromptCache`` (the default): the pruned prompt is frozen after step 1; every later step
  recomputes the whole tail.
- ``PrefixCache`` / ``DualCache`` (Fast-dLLM): a block-start pass refreshes the response KV
  (and, with ``refresh_prompt=True``, the whole sequence, re-selecting the prompt); inside the
  block, prefix recomputes the current and all later blocks, dual only the current block.
- ``DLLMCache`` (dLLM-Cache): the prompt is refreshed every ``prompt_interval`` steps, the
  response every ``response_interval`` steps, and in between only the ``transfer_ratio`` share of
  tail tokens whose value vectors drifted most is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CachePolicy",
    "DLLMCache",
    "DualCache",
    "PrefixCache",
    "PromptCache",
    "StepPlan",
    "get_policy",
]


@dataclass(frozen=True)
class StepPlan:
    """What one forward pass computes.

    kind:
        ``"full"``: every token runs; the prompt cache is (re)built (and re-selected by an eviction
        method); the tail KV are stored when the policy keeps them.
        ``"tail"``: tail indices ``[lo, hi)`` run against the pruned prompt; when the policy keeps
        response KV, the computed KV overwrite their slots and attention reads the whole stored
        tail (cached slots outside ``[lo, hi)`` included).
        ``"partial"``: dLLM-Cache's in-between step (drifted share of the tail only).
    refresh: True for the passes that refresh a cache (block starts, interval refreshes): the
        stats split time between refreshes and inner steps with it.
    """

    kind: str
    lo: int = 0
    hi: int | None = None
    refresh: bool = False


class CachePolicy:
    """Base class. ``plan`` is called once per forward pass."""

    name: str = ""
    #: the engine keeps per-layer response K/V [B, Hkv, T, D] between steps
    keeps_response_kv: bool = False
    #: the engine also keeps per-layer attention and MLP outputs of the tail (dLLM-Cache)
    keeps_response_features: bool = False
    #: the sampler decodes block by block and tells the engine where each block starts
    block_wise: bool = False

    def plan(self, step: int, block_step: int, lo: int, hi: int, tail_len: int) -> StepPlan:
        """step: 0-based forward pass index; block_step: 0-based index inside the current block
        (0 = block start); [lo, hi): the current block in tail coordinates; tail_len: T."""
        raise NotImplementedError


@dataclass(frozen=True)
class PromptCache(CachePolicy):
    """Today's behaviour: prompt pruned once at step 1, the whole tail recomputed every step."""

    name = "prompt"

    def plan(self, step, block_step, lo, hi, tail_len):
        if step == 0:
            return StepPlan("full", refresh=True)
        return StepPlan("tail", 0, tail_len)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected a bool, got {value!r}")


@dataclass(frozen=True)
class _BlockCache(CachePolicy):
    """Fast-dLLM's block caches: a refresh pass at every block start (the whole sequence with
    ``refresh_prompt``, else the tail against the pruned prompt), then ``_inner`` per step."""

    refresh_prompt: bool = False
    keeps_response_kv = True
    block_wise = True

    def __post_init__(self):
        _check_bool("refresh_prompt", self.refresh_prompt)

    def plan(self, step, block_step, lo, hi, tail_len):
        if step == 0 or (block_step == 0 and self.refresh_prompt):
            return StepPlan("full", refresh=True)
        if block_step == 0:
            return StepPlan("tail", 0, tail_len, refresh=True)
        return StepPlan("tail", lo, self._inner_end(hi, tail_len))

    def _inner_end(self, hi: int, tail_len: int) -> int:
        raise NotImplementedError


@dataclass(frozen=True)
class PrefixCache(_BlockCache):
    """Fast-dLLM's prefix cache: block-start refresh, then [current ‖ later blocks] per step.

    Args:
        refresh_prompt: recompute the full prompt at each block start (Fast-dLLM; with an
            eviction method the prompt is re-selected there). False keeps the pruned step-1
            prompt and refreshes the response positions only.
    """

    name = "prefix"

    def _inner_end(self, hi, tail_len):
        return tail_len  # the current block and every later one


@dataclass(frozen=True)
class DualCache(_BlockCache):
    """Fast-dLLM's dual cache: block-start refresh, then the current block only per step (its new
    KV overwrite the block's slots; earlier and later blocks are read from the cache).

    Args:
        refresh_prompt: as for ``PrefixCache``.
    """

    name = "dual"

    def _inner_end(self, hi, tail_len):
        return hi  # the current block only


@dataclass(frozen=True)
class DLLMCache(CachePolicy):
    """dLLM-Cache's interval refresh with value-drift partial updates.

    Step s (1-based, counted over the whole generation) refreshes the prompt when
    ``(s - 1) % prompt_interval == 0`` (a full pass: under eviction the prompt is re-selected;
    the response is recomputed too), else the response when ``(s - 1) % response_interval == 0``
    (the whole tail against the pruned prompt). Other steps compute, per layer, the value vectors
    of the whole tail and recompute only the ``int(T * transfer_ratio)`` tokens whose values have
    the lowest cosine similarity with the cached ones; the other tokens reuse their cached
    attention and MLP outputs (added to the current residual stream).

    Args:
        prompt_interval: Tp > 0 (the MaskKV paper: 50).
        response_interval: Tr > 0 (the paper: 5).
        transfer_ratio: share of the tail recomputed in between, in [0, 1] (the paper: 0.25).
    """

    prompt_interval: int = 50
    response_interval: int = 5
    transfer_ratio: float = 0.25
    name = "dllm"
    keeps_response_kv = True
    keeps_response_features = True

    def __post_init__(self):
        for arg in ("prompt_interval", "response_interval"):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg}: expected a positive int, got {value!r}")
        ratio = self.transfer_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ValueError(f"transfer_ratio: expected a number in [0, 1], got {ratio!r}")

    def plan(self, step, block_step, lo, hi, tail_len):
        if step % self.prompt_interval == 0:
            return StepPlan("full", refresh=True)
        if step % self.response_interval == 0:
            return StepPlan("tail", 0, tail_len, refresh=True)
        return StepPlan("partial", 0, tail_len)


_BY_NAME = {"prompt": PromptCache, "prefix": PrefixCache, "dual": DualCache, "dllm": DLLMCache}


def get_policy(cache: CachePolicy | str | None) -> CachePolicy:
    """A policy object from itself, its name (``prompt | prefix | dual | dllm``) or None."""
    if cache is None:
        return PromptCache()
    if isinstance(cache, CachePolicy):
        return cache
    if isinstance(cache, str) and cache.lower() in _BY_NAME:
        return _BY_NAME[cache.lower()]()
    raise ValueError(f"cache: expected a CachePolicy or one of {sorted(_BY_NAME)}, got {cache!r}")
