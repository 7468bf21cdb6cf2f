"""A request: its own state machine, from the waiting queue to the last committed block.

    WAITING --admitted (KV rows reserved)--> RUNNING --last block / EOS / stop--> FINISHED
                                               |  each forward pass is either
                                               |  "full": the prompt pass (step 1, with
                                               |   eviction), run in layer chunks across
                                               |   engine iterations, or a block-start refresh
                                               |   with refresh_prompt, or every NoCache step;
                                               |  "tail": the response against the request's
                                               |   pruned prompt, batched with the others
    any state --cancel / error--> FINISHED (finish_reason "abort" / "error")

The sampler is the family's own (``llada_steps`` / ``dream_steps`` / ``llada2_steps``), suspended
between forward passes as a generator; what each pass computes is the engine's cache policy's
``plan``, asked exactly as ``maskkv.generate``'s ``Denoiser`` asks it (block-causal LLaDA2: its
``BlockProgress``, which also schedules the pass that commits a finished block's KV). The
request's random stream (Dream's ``origin`` draws, sampling at temperature > 0) is its own:
swapped in around every sampler step, so it is the stream ``maskkv.generate(seed=...)`` would
use alone.

Coordinates: the *tail* is the sequence after the cached prompt region, ``x[:, Pc:]``; plans,
block starts and ``need`` are tail positions. For LLaDA and Dream tail position j gives the
logits of response token j; for LLaDA2 the tail starts at the complete prompt blocks' end, so
response token j is tail position ``j + response_shift`` (the prompt's last partial block).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generation.block_causal import BlockProgress
from ..generation.policies import CachePolicy, StepPlan
from ..generation.stepwise import BlockStart, NeedLogits, SamplerSteps
from .kv_memory import KVFootprint, PoolRange
from .params import SamplingParams

__all__ = ["FinishReason", "Request", "RequestOutput", "RequestState"]


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # every response token generated
    STOP = "stop"  # EOS (or a stop string, decided by the caller) in a committed block
    ABORT = "abort"  # cancelled (client gone, shutdown)
    ERROR = "error"  # this request's step raised; the others went on


@dataclass
class RequestOutput:
    """What a finished (or streaming) request returns."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]  # committed response tokens (all gen_length unless stopped early)
    finish_reason: FinishReason | None
    error: str | None = None
    arrival_time: float = 0.0
    first_block_time: float | None = None  # seconds since arrival, first committed block
    finish_time: float | None = None  # seconds since arrival
    passes: int = 0  # forward passes run for this request

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _RngState:
    cpu: torch.Tensor
    cuda: torch.Tensor | None = None


@dataclass
class Request:
    """One request inside the engine (built by ``Engine.add_request``)."""

    request_id: str
    prompt: torch.Tensor  # int64 [1, P] on the model's device
    params: SamplingParams  # resolved (block_length, steps filled in)
    footprint: KVFootprint
    cached_prompt_len: int  # Pc: P, less Dream's last position (LLaDA2: complete prompt blocks)
    tail_len: int  # T: positions after the cached region (LLaDA2: whole generation blocks)
    on_block: Callable[[Request, list[int]], None] | None = None  # committed tokens, in order
    on_finish: Callable[[Request], None] | None = None
    eos_id: int | None = None  # for params.stop_at_eos
    response_shift: int = 0  # tail position of response token 0 (LLaDA2: the prompt's tail)
    eos_fill: bool = False  # LLaDA2: every token after the first EOS is EOS
    arrival_time: float = field(default_factory=time.monotonic)

    state: RequestState = RequestState.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    pool_range: PoolRange | None = None
    # per layer, after the prompt pass: int32 [Hkv + 1] segment offsets (on the device) and
    # kept tokens per KV head (host), longest segment
    cu_seqlens: list[torch.Tensor] = field(default_factory=list)
    seg_lens: list[list[int]] = field(default_factory=list)
    max_seqlen: list[int] = field(default_factory=list)
    denoiser: object | None = None  # the one-row Denoiser whose full passes the runner runs
    full_pass: object | None = None  # a full pass in progress (``FullPass``)
    progress: BlockProgress | None = None  # LLaDA2: block-causal pass schedule

    sampler: SamplerSteps | None = None
    event: NeedLogits | None = None  # what the sampler waits for
    plan: StepPlan | None = None  # how the engine computes it
    passes: int = 0
    block: tuple[int, int] | None = None
    block_step: int = 0
    x: torch.Tensor | None = None  # the sampler's live sequence [1, P + R]
    committed: int = 0  # response tokens already handed to on_block
    token_ids: list[int] = field(default_factory=list)
    first_block_time: float | None = None
    finish_time: float | None = None
    rng: _RngState | None = None

    @property
    def prompt_len(self) -> int:
        return self.prompt.shape[1]

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED

    # -- the sampler ----------------------------------------------------------------------

    def start(
        self,
        sampler: SamplerSteps,
        seed: int,
        caches_prompt: bool,
        policy: CachePolicy,
        progress: BlockProgress | None = None,
    ) -> None:
        """Admit: the sampler runs up to its first forward pass. ``progress``: a block-causal
        model's pass schedule (its plans replace the policy's)."""
        self.sampler, self.progress = sampler, progress
        device = self.prompt.device
        cpu = torch.Generator().manual_seed(seed).get_state()
        cuda = None
        if device.type == "cuda":
            cuda = torch.Generator(device).manual_seed(seed).get_state()
        self.rng = _RngState(cpu, cuda)
        self.state = RequestState.RUNNING
        self._caches_prompt, self._policy = caches_prompt, policy
        self._resume(None, first=True)

    def advance(self, logits: torch.Tensor) -> None:
        """The planned pass ran: hand the sampler the logits of its pending ``NeedLogits`` and
        run it to its next (a ``"commit"`` pass answers nothing: the next plan follows)."""
        self.passes += 1
        if self.progress is not None:
            self.progress.ran(self.plan)
            if self.plan.kind == "commit":
                self.plan = self._plan()
                return
        self.block_step += 1
        self._resume(logits)

    def _resume(self, value, first: bool = False) -> None:
        device = self.prompt.device
        saved_cpu = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state(device) if self.rng.cuda is not None else None
        torch.set_rng_state(self.rng.cpu)
        if saved_cuda is not None:
            torch.cuda.set_rng_state(self.rng.cuda, device)
        try:
            event = next(self.sampler) if first else self.sampler.send(value)
            while isinstance(event, BlockStart):
                self._begin_block(event.lo, event.hi)
                if self.finished:
                    return
                event = self.sampler.send(None)
        except StopIteration as done:
            self.x = done.value
            self._commit(self.params.gen_length)
            self.finish(FinishReason.LENGTH)
            return
        finally:
            self.rng.cpu = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if saved_cuda is not None:
                self.rng.cuda = torch.cuda.get_rng_state(device)
                torch.cuda.set_rng_state(saved_cuda, device)
        self.event, self.x = event, event.x
        self.plan = self._plan()

    def _plan(self) -> StepPlan:
        """The cache policy's plan for the pending pass (``Denoiser.plan`` for one row)."""
        if self.progress is not None:
            return self.progress.plan()
        if not self._caches_prompt:
            return StepPlan("full", refresh=True)
        T = self.tail_len
        lo, hi = self.block if self.block is not None else (0, T)
        return self._policy.plan(self.passes, self.block_step, lo, hi, T)

    def _begin_block(self, lo: int, hi: int) -> None:
        """Tail positions before ``lo`` are final: hand them on (the first block's start commits
        none)."""
        self.block, self.block_step = (lo, hi), 0
        if self.progress is not None:
            self.progress.begin_block(lo // self.params.block_length)
        upto = min(max(lo - self.response_shift, 0), self.params.gen_length)
        if upto > self.committed and self.x is not None:
            self._commit(upto)

    def _commit(self, upto: int) -> None:
        new = self.x[0, self.prompt_len + self.committed : self.prompt_len + upto].tolist()
        if self.eos_fill and self.eos_id is not None:  # ``finish_responses``, block by block
            seen = self.eos_id in self.token_ids
            first = 0 if seen else (new.index(self.eos_id) if self.eos_id in new else len(new))
            new[first:] = [self.eos_id] * (len(new) - first)
        self.committed = upto
        self.token_ids.extend(new)
        if self.first_block_time is None:
            self.first_block_time = time.monotonic() - self.arrival_time
        if self.on_block is not None and new:
            self.on_block(self, new)
        eos = self.eos_id
        if self.params.stop_at_eos and eos is not None and eos in new and not self.finished:
            if upto < self.params.gen_length:
                self.finish(FinishReason.STOP)

    # -- the end --------------------------------------------------------------------------

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        """Final state; the engine returns the KV rows (``Engine._retire``)."""
        if self.finished:
            return
        self.state = RequestState.FINISHED
        self.finish_reason, self.error = reason, error
        self.finish_time = time.monotonic() - self.arrival_time
        self.full_pass = None
        self.event = self.plan = None
        if self.sampler is not None:
            self.sampler.close()

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt_ids=self.prompt[0].tolist(),
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason,
            error=self.error,
            arrival_time=self.arrival_time,
            first_block_time=self.first_block_time,
            finish_time=self.finish_time,
            passes=self.passes,
        )
