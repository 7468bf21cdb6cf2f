"""The samplers as step-wise state machines.

A sampler (LLaDA's, Dream's) is written as a Python generator: it yields what it needs from the
model and receives the answer, so its state between two forward passes lives in the suspended
generator. ``maskkv.generate`` drives one generator with one ``Denoiser`` (``run_sampler``); the
serving engine keeps one generator per request and answers many of them with one batched
forward pass. Both run the very same sampler code, so they cannot drift apart.

Events a sampler yields:

- ``BlockStart(lo, hi)``: decoding of response positions ``[lo, hi)`` starts (the cache policy
  may refresh there); the sampler is resumed with ``None``.
- ``NeedLogits(x, need)``: the logits [n, vocab] of response positions ``need`` (bool [B, R])
  of sequence ``x`` [B, P + R], in row-major order; the sampler is resumed with them.

The generator's return value (``StopIteration.value``) is the final sequence [B, P + R].
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

__all__ = ["BlockStart", "NeedLogits", "SamplerSteps", "run_sampler"]


@dataclass(frozen=True)
class BlockStart:
    """Response positions ``[lo, hi)`` start being decoded."""

    lo: int
    hi: int


@dataclass(frozen=True)
class NeedLogits:
    """Logits of response positions ``need`` (bool [B, R]) of ``x`` (int64 [B, P + R])."""

    x: torch.Tensor
    need: torch.Tensor


SamplerSteps = Generator["BlockStart | NeedLogits", "torch.Tensor | None", torch.Tensor]


def run_sampler(
    steps: SamplerSteps, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Drive ``steps`` to the end with ``denoise(x, need) -> logits``; a ``begin_block(lo, hi)``
    method of ``denoise``, if any, is called at each ``BlockStart``. Returns the sequence."""
    begin_block = getattr(denoise, "begin_block", None)
    try:
        event = next(steps)
        while True:
            if isinstance(event, BlockStart):
                if begin_block is not None:
                    begin_block(event.lo, event.hi)
                event = steps.send(None)
            else:
                event = steps.send(denoise(event.x, event.need))
    except StopIteration as done:
        return done.value
