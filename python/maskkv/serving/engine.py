"""``Engine``: many requests, one model, step-level continuous batching.

    engine = maskkv.serving.Engine(model, method=maskkv.MaskKV(budget=256), cache="dual")
    outs = engine.generate(prompts, SamplingParams(gen_length=256, block_length=32))

The eviction method, its budget and the cache policy are the engine's; lengths, sampler options
and the decoding rule are per request (``SamplingParams``). Each iteration (``step``): admit
waiting requests whose KV footprint fits the pool (FIFO), one batched tail pass over every
running request whose next pass is one, then a token budget of full (prompt) passes, layer by
layer; a finished request returns its KV rows at once. Every request's greedy output is
``maskkv.generate``'s on that request alone (batch invariance: ``runner``, ``batch_invariant``).

Thread model: ``add_request`` and ``abort`` may be called from any thread (they go through
queues); ``step`` / ``generate`` run the model in one thread at a time (``AsyncEngine`` keeps a
thread for it).

Supported: LLaDA, Dream, LLaDA-MoE and block-causal LLaDA2 (any model of the layer protocol;
LLaDA2 requests decode block by block with LLaDA2's own sampler, their committed blocks' exact
KV appended in the pool), every eviction method, FullCache and NoCache; cache policies
``PromptCache``, ``PrefixCache``, ``DualCache`` (with or without ``refresh_prompt``); decoding
rules ``FixedSteps``, ``Threshold``, ``Factor``. On CUDA the batched steps replay CUDA graphs by
bucket of shapes (``graphs``). Not supported (refused with a ``ValueError``): ``DLLMCache`` (its
partial steps keep per-request feature caches outside the pool), classifier-free guidance (two
rows per request).
"""

from __future__ import annotations

import itertools
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence

import torch

from .. import methods as methods_lib
from ..generation import sampler_steps
from ..generation.batch_invariant import batch_invariant
from ..generation.block_causal import BlockProgress
from ..generation.policies import CachePolicy, DLLMCache, DualCache, get_policy
from ..methods import LayerProfile, Method
from .kv_memory import KVPool, RequestTooLarge, default_kv_budget
from .metrics import EngineStats
from .params import SamplingParams
from .request import FinishReason, Request, RequestOutput
from .runner import ModelRunner
from .scheduler import EngineOverloaded, Scheduler

__all__ = ["Engine", "EngineOverloaded", "RequestTooLarge"]


def model_context_length(model) -> int | None:
    """The longest sequence (prompt + response) the model's config allows, if it says."""
    config = model.config
    for name in ("max_sequence_length", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class Engine:
    """Continuous-batching dLLM engine with a KV memory budget.

    Args:
        model: a loaded ``LLaDAModelLM`` / ``DreamModelLM`` / ``LLaDAMoEModelLM`` /
            ``LLaDA2MoeModelLM`` (eval mode, on its device).
        method: a ``maskkv.methods.Method`` or its name (``"maskkv"`` = MaskKV(budget=256)).
        cache: the cache policy (object or name: prompt, prefix, dual); default PromptCache.
        kv_budget: bytes of the KV pool (pruned prompt caches and stored response KV of every
            admitted request); default: half of the free device memory (CUDA) or of the
            available RAM (CPU), see ``default_kv_budget``.
        profile: MaskKV / SqueezeAttention layer profile; default: the one next to the model.
        tokenizer: optional; lets ``add_request`` / ``generate`` take strings.
        max_running, max_waiting, prefill_tokens: ``Scheduler``'s limits.
        max_gen_length: the longest ``gen_length`` accepted (default: the context length).
        backend, token_chunk, step1_lse, fusion: as ``maskkv.generate``.
        attention: ``ModelRunner``'s attention mode ("auto", "varlen", "per_request").
        cuda_graphs: on CUDA, replay the batched steps as CUDA graphs, one per bucket of shapes
            (``ModelRunner``; False: eager; "padded": the padded steps eagerly, any device).
        batch_invariant: run linears batch-invariantly (must match ``maskkv.generate``'s
            ``batch_invariant`` for its outputs to be reproduced exactly).
    """

    def __init__(
        self,
        model,
        *,
        method: Method | str = "maskkv",
        cache: CachePolicy | str | None = None,
        kv_budget: int | None = None,
        profile: LayerProfile | None = None,
        tokenizer=None,
        max_running: int = 64,
        max_waiting: int = 1024,
        prefill_tokens: int = 8192,
        max_gen_length: int | None = None,
        backend: str = "auto",
        token_chunk: int = 4096,
        step1_lse: bool | str = True,
        fusion: str = "auto",
        attention: str = "auto",
        cuda_graphs: bool | str = True,
        batch_invariant: bool = True,
    ) -> None:
        if isinstance(method, str):
            method = methods_lib.get(method)
        if not isinstance(method, Method):
            raise ValueError(f"method: expected a maskkv Method or its name, got {method!r}")
        self.block_causal = getattr(model, "dllm_kind", "llada") == "llada2"
        if cache is None and self.block_causal:
            cache = DualCache()  # maskkv.generate's default for these models
        policy = get_policy(cache)
        if isinstance(policy, DLLMCache):
            raise ValueError(
                "cache: DLLMCache is not supported by the serving engine (its partial steps keep "
                "per-request feature caches outside the KV pool); use prompt, prefix or dual"
            )
        self.model, self.method, self.policy = model, method, policy
        self.tokenizer = tokenizer
        if profile is None and getattr(model, "name_or_path", None):
            profile = LayerProfile.find(model.name_or_path)
        self.profile = profile
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        config = model.config
        self.context_length = model_context_length(model)
        self.max_gen_length = max_gen_length or self.context_length
        if kv_budget is None:
            kv_budget = default_kv_budget(self.device)
        self.pool = KVPool(
            config.num_key_value_heads,
            config.hidden_size // config.num_attention_heads,
            self.dtype,
            self.device,
            kv_budget,
        )
        self.runner = ModelRunner(
            model, method, policy, self.pool, profile=profile, backend=backend,
            token_chunk=token_chunk, step1_lse=step1_lse, fusion=fusion, attention=attention,
            cuda_graphs=cuda_graphs,
        )  # fmt: skip
        self.scheduler = Scheduler(self.pool, max_running, max_waiting, prefill_tokens)
        self.batch_invariant = batch_invariant
        self.stats = EngineStats(kv_bytes_capacity=self.pool.capacity_bytes)
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._seeds = random.SystemRandom()
        self._unfinished = 0  # added and not yet finished (any thread reads it)
        self._count_lock = threading.Lock()

    # -- requests ------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int] | torch.Tensor,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        on_block: Callable[[Request, list[int]], None] | None = None,
        on_finish: Callable[[Request], None] | None = None,
    ) -> Request:
        """Queue a request (thread-safe). ``prompt``: token ids (a list or a 1-D tensor) or text
        (with a tokenizer). ``on_block(request, tokens)`` gets each committed block's tokens,
        ``on_finish(request)`` the end; both are called from the engine's thread.

        Raises ``ValueError`` naming the field for bad input (``prompt``, ``gen_length``, ...),
        ``RequestTooLarge`` if the request's KV footprint exceeds the whole budget, and
        ``EngineOverloaded`` when the waiting queue is full.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected a SamplingParams, got {type(params).__name__}")
        ids = self._prompt_ids(prompt)
        params = params.resolved(self.model)
        P, G = ids.numel(), params.gen_length
        if self.max_gen_length is not None and G > self.max_gen_length:
            raise ValueError(f"gen_length: expected at most {self.max_gen_length} tokens, got {G}")
        if self.context_length is not None and P + G > self.context_length:
            raise ValueError(
                f"prompt: {P} tokens + gen_length {G} exceed the model's context of "
                f"{self.context_length} tokens"
            )
        if params.block_mask != "causal" and self.method.caches_prompt:
            raise ValueError(
                "block_mask: 'additive' (the LLaDA2.1 file's attention) reads later blocks, so "
                "no cache is exact with it; serve it with method='nocache'"
            )
        footprint = self.runner.footprint(P, params)
        need = footprint.rows * self.pool.row_bytes
        if not self.pool.fits_ever(footprint.rows):
            raise RequestTooLarge(
                f"prompt: a request of {P} prompt + {G} response tokens needs {need} bytes of "
                f"KV cache with {self.method.name} and {self.policy.name} caching, more than "
                f"the engine's whole KV budget ({self.pool.capacity_bytes} bytes); it can never run"
            )
        Pc, T = self.runner.layout(P, params)
        if self.scheduler.max_waiting <= len(self.scheduler.waiting) + self._inbox.qsize():
            raise EngineOverloaded(
                f"the waiting queue is full ({self.scheduler.max_waiting} requests); retry later"
            )
        req = Request(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt=ids.to(self.device)[None],
            params=params,
            footprint=footprint,
            cached_prompt_len=Pc,
            tail_len=T,
            on_block=on_block,
            on_finish=on_finish,
            eos_id=self.model.config.eos_token_id,
            response_shift=P - Pc if self.block_causal else 0,
            eos_fill=self.block_causal,
        )
        with self._count_lock:
            self._unfinished += 1
        self._inbox.put(req)
        return req

    def _prompt_ids(self, prompt) -> torch.Tensor:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text needs an engine with a tokenizer; pass token ids")
            prompt = self.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
                raise ValueError(
                    f"prompt: expected a 1-D integer tensor of token ids, got "
                    f"{prompt.dtype} {tuple(prompt.shape)}"
                )
            ids = prompt.detach().to("cpu", torch.long)
        else:
            if not isinstance(prompt, Sequence) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt
            ):
                raise ValueError("prompt: expected a string or a list of int token ids")
            ids = torch.tensor(list(prompt), dtype=torch.long)
        vocab = self.model.config.vocab_size
        if ids.numel() == 0:
            raise ValueError("prompt: expected at least one token")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        return ids

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe): it finishes with reason "abort" at the next step
        and its KV rows return to the pool."""
        self._aborts.put(request_id)

    def has_unfinished(self) -> bool:
        return self._unfinished > 0

    @property
    def kv_bytes_in_use(self) -> int:
        return self.pool.bytes_in_use

    # -- one iteration ---------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """One engine iteration; returns the requests that finished in it."""
        t0 = time.perf_counter()
        finished: list[Request] = []
        sched = self.scheduler
        while not self._inbox.empty():
            sched.waiting.append(self._inbox.get())
        while not self._aborts.empty():
            req = sched.find(self._aborts.get())
            if req is not None:
                req.finish(FinishReason.ABORT)
                finished.append(self._retire(req))
        with batch_invariant(self.batch_invariant), torch.no_grad():
            for req in sched.admit():
                self.stats.prompt_tokens += req.prompt_len
                self._guard(req, self._start, req)
            batch = [r for r in sched.tail_batch() if not r.finished]
            if batch:
                self._tail_step(batch)
            self._full_steps()
        for req in list(sched.running):
            if req.finished:
                finished.append(self._retire(req))
        self.stats.waiting, self.stats.running = len(sched.waiting), len(sched.running)
        self.stats.kv_bytes_in_use = self.pool.bytes_in_use
        self.stats.iterations += 1
        if finished or batch or sched.running:
            self.stats.observe_step(time.perf_counter() - t0)
        return finished

    def _start(self, req: Request) -> None:
        params = req.params
        steps = sampler_steps(self.model, req.prompt, **params.sampler_options())
        seed = params.seed if params.seed is not None else self._seeds.randrange(2**63)
        progress = None
        if self.block_causal:
            progress = BlockProgress(
                params.block_length, caching=self.method.caches_prompt,
                stored=self.runner.stored,
                refresh_prompt=getattr(self.policy, "refresh_prompt", False),
            )  # fmt: skip
        req.start(steps, seed, self.method.caches_prompt, self.policy, progress)

    def _guard(self, req: Request, fn, *args):
        """Run ``fn(*args)`` for one request; an exception fails that request only."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - one request's failure must not stop the rest
            req.finish(FinishReason.ERROR, f"{type(err).__name__}: {err}")
            return None

    def _tail_step(self, batch: list[Request]) -> None:
        try:
            logits = self.runner.tail_forward(batch)
        except Exception:  # noqa: BLE001 - find the request(s) at fault, run the others alone
            logits = []
            for req in batch:
                out = self._guard(req, self.runner.tail_forward, [req])
                logits.append(None if out is None else out[0])
        self.stats.passes["tail"] += len(batch)
        for req, lg in zip(batch, logits):
            if lg is not None and not req.finished:
                self._advance(req, lg)

    def _full_steps(self) -> None:
        """Full passes, oldest first, layer by layer, within ``prefill_tokens`` token-layers
        (the first one always runs at least one layer)."""
        budget = self.scheduler.prefill_tokens
        n_layers = self.runner.num_layers
        for i, req in enumerate(self.scheduler.full_passes()):
            L = req.event.x.shape[1]
            if req.finished or (i and budget < L):
                continue
            if req.full_pass is None:
                self._guard(req, self.runner.begin_full_pass, req)
                if req.finished:
                    continue
            layers = min(max(1, budget // L), n_layers - req.full_pass.layer)
            logits = self._guard(req, self.runner.full_pass_step, req, layers)
            budget -= layers * L
            if logits is not None and not req.finished:
                self.stats.passes["full"] += 1
                self._advance(req, logits)
            if budget <= 0:
                break

    def _advance(self, req: Request, logits: torch.Tensor) -> None:
        before = req.committed
        self._guard(req, req.advance, logits)
        if req.committed > before:
            self.stats.add_output_tokens(req.committed - before)

    def _retire(self, req: Request) -> Request:
        self.scheduler.remove(req)
        with self._count_lock:
            self._unfinished -= 1
        self.stats.finished_request(req.finish_reason.value)
        if req.on_finish is not None:
            try:
                req.on_finish(req)
            except Exception:  # noqa: BLE001 - a callback's failure is the caller's business
                pass
        return req

    def cancel_all(self) -> list[Request]:
        """Finish every waiting and running request with reason "abort" (shutdown)."""
        while not self._inbox.empty():
            self.scheduler.waiting.append(self._inbox.get())
        done = []
        for req in [*self.scheduler.running, *self.scheduler.waiting]:
            req.finish(FinishReason.ABORT)
            done.append(self._retire(req))
        return done

    # -- offline ---------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Sequence[int] | torch.Tensor],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool = True,
    ) -> list[RequestOutput]:
        """Run ``prompts`` to the end; outputs in input order (a progress bar over requests).

        ``params``: one ``SamplingParams`` for all, or one per prompt. Bad input raises
        ``ValueError`` naming the prompt's index before anything runs; a request that fails
        while running raises ``RuntimeError`` after the others finished.
        """
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(
                f"params: expected one SamplingParams or {len(prompts)} of them, got {len(params)}"
            )
        if self.has_unfinished():
            raise RuntimeError("generate: the engine already has requests in flight")
        prepared = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            p = SamplingParams() if p is None else p
            try:
                ids = self._prompt_ids(prompt)
                footprint = self.runner.footprint(ids.numel(), p.resolved(self.model))
                if not self.pool.fits_ever(footprint.rows):
                    raise RequestTooLarge(
                        f"prompt: needs {footprint.rows * self.pool.row_bytes} bytes of KV, "
                        f"more than the engine's KV budget ({self.pool.capacity_bytes} bytes)"
                    )
            except ValueError as err:
                raise type(err)(f"prompts[{i}]: {err}") from None
            prepared.append((ids, p))
        from tqdm.auto import tqdm

        max_waiting = self.scheduler.max_waiting  # an offline batch may queue all its prompts
        self.scheduler.max_waiting = max(max_waiting, len(prepared))
        bar = tqdm(total=len(prepared), desc="maskkv engine", unit="req", disable=not progress)
        try:
            reqs = [self.add_request(ids, p) for ids, p in prepared]
            while self.has_unfinished():
                bar.update(len(self.step()))
        finally:
            bar.close()
            self.scheduler.max_waiting = max_waiting
        failed = [(i, r) for i, r in enumerate(reqs) if r.finish_reason is FinishReason.ERROR]
        if failed:
            i, r = failed[0]
            raise RuntimeError(f"prompts[{i}]: generation failed: {r.error}")
        return [r.output() for r in reqs]
