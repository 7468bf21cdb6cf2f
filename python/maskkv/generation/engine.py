"""The denoiser: one forward pass of a dLLM per denoising step, with or without a pruned cache.

Both samplers (LLaDA, Dream) only ask for "the logits of these response positions for this
sequence". How the answer is computed is the method's business:

- ``NoCache`` (vanilla): every step runs the whole [prompt ‖ response] through every layer.
- ``FullCache``: step 1 runs the whole sequence and keeps each layer's prompt keys/values
  (after RoPE); later steps run only the response positions against that cache.
- eviction methods: as FullCache, but at step 1 each layer's prompt KV is pruned by
  ``maskkv_kernels.select_and_gather`` right after that layer's attention, and the full prompt KV
  of the layer is freed before the next layer runs (peak memory: one layer's full KV).

Dream predicts token i from position i-1, so for Dream the last prompt position is recomputed
with the response at every step and stays outside the cache (and outside the budget).

What each step recomputes is the cache policy's business (``policies.py``): the denoiser asks
``policy.plan(...)`` before every pass and runs one of three passes ("full", "tail" over a range
of tail positions, dLLM-Cache's "partial"). Attention of a tail pass is always one
``ragged_attention`` call over [pruned prompt ‖ tail], where the dense tail is either the
computed tokens alone (PromptCache) or the stored response KV with the computed tokens written
into their slots (Prefix/Dual/DLLMCache): no prompt concatenation, no new kernel.

On CUDA: MaskKV's step-1 attention is torch's fused cuDNN forward, which also returns the mask
rows' LSE for ``select_and_gather`` (one pass over K instead of two; ``step1_lse``), and a tail
pass without stored response KV is captured once per (shape, range) as one CUDA graph of all
layers and replayed (``cuda_graphs``): at LLaDA-8B shape an eager later step spends as long
launching its ~1150 kernels as running them.

Approximation inherent to caching a bidirectional model: prompt keys/values at layers > 0 also
depend on the response tokens, which change between steps; the cache freezes them at step 1
(as the MaskKV paper does). With a single layer the cached and uncached paths agree exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import maskkv_kernels as mk

from ..methods import LayerProfile, Method
from ..models.fused import FUSIONS, FusedLayers, resolve_fusion
from .passes import (
    FirstPassMemo,
    FullPass,
    KVSink,
    _lse_op_usable,
    attend_chunks,
    chunked,
    dense_attention,
    position_ids_from_mask,
    qkv_chunked,
    run_layers,
)
from .policies import CachePolicy, PromptCache, StepPlan

__all__ = [
    "Denoiser",
    "FirstPassMemo",
    "StepStats",
    "attend_chunks",
    "dense_attention",
    "position_ids_from_mask",
]


@dataclass
class StepStats:
    """What one ``generate`` call measured."""

    step_times: list[float] = field(default_factory=list)  # seconds, step 1 first
    prompt_kv_bytes_full: int = 0  # K+V bytes of the whole prompt, all layers
    prompt_kv_bytes_kept: int = 0  # K+V bytes actually cached after step 1
    kept_lengths: torch.Tensor | None = None  # int32 [layers, B, Hkv] kept prompt KV per head
    # Per layer, the prompt positions of the first pruned cache (flattened in segment order
    # b * Hkv + g, ``kept_lengths`` long): what the first selection kept (evidence recall).
    first_kept_positions: list[torch.Tensor] | None = None
    layer_budgets: list[int] | None = None
    peak_memory_bytes: int | None = None  # CUDA only
    gen_length: int = 0
    step_kinds: list[str] = field(default_factory=list)  # "full" | "tail" | "partial" per pass
    step_refresh: list[bool] = field(default_factory=list)  # pass refreshed a cache
    tokens_per_step: list[float] = field(default_factory=list)  # revealed per step, mean over rows
    response_kv_bytes: int = 0  # bytes of cached response KV (+ dLLM-Cache features), all layers

    @property
    def nfe(self) -> int:
        """Number of forward passes (function evaluations)."""
        return len(self.step_times)

    @property
    def total_time(self) -> float:
        return float(sum(self.step_times))

    @property
    def refresh_time(self) -> float:
        """Seconds in passes that refresh a cache (step 1, block starts, interval refreshes)."""
        return float(sum(t for t, r in zip(self.step_times, self.step_refresh) if r))

    @property
    def inner_time(self) -> float:
        """Seconds in the other passes (inside a block / between refreshes)."""
        return self.total_time - self.refresh_time

    @property
    def mean_tokens_per_step(self) -> float:
        n = self.tokens_per_step
        return sum(n) / len(n) if n else float("nan")

    @property
    def first_step_time(self) -> float:
        return self.step_times[0] if self.step_times else float("nan")

    @property
    def later_step_time(self) -> float:
        """Median seconds of the steps after the first (the cached ones)."""
        later = sorted(self.step_times[1:])
        return later[len(later) // 2] if later else float("nan")

    def summary(self) -> dict:
        out = {
            "steps": len(self.step_times),
            "first_step_s": self.first_step_time,
            "later_step_s": self.later_step_time,
            "prompt_kv_bytes_full": self.prompt_kv_bytes_full,
            "prompt_kv_bytes_kept": self.prompt_kv_bytes_kept,
            "peak_memory_bytes": self.peak_memory_bytes,
            "nfe": self.nfe,
            "total_s": self.total_time,
            "refresh_s": self.refresh_time,
            "inner_s": self.inner_time,
            "mean_tokens_per_step": self.mean_tokens_per_step,
            "response_kv_bytes": self.response_kv_bytes,
        }
        if self.kept_lengths is not None:
            out["kept_per_head_mean"] = float(self.kept_lengths.float().mean())
        return out


class Denoiser:
    """Logits of chosen response positions, one call per denoising step.

    Args:
        model: a ``LLaDAModelLM`` or ``DreamModelLM`` (the layer protocol: ``embed``, ``rotary``,
            ``layers[i].qkv / attn_output / mlp_block``, ``head``).
        method: a ``maskkv.methods.Method``.
        prompt_len: P, padded prompt length; the response is ``x[:, P:]``.
        attention_mask: optional [B, P + R] (1 = real token), left padding of the prompt.
        profile: layer-importance profile for MaskKV / SqueezeAttention budgets.
        token_chunk: tokens per chunk for QKV, attention queries and MLP in full passes.
        backend: passed to the ``maskkv_kernels`` ops.
        cuda_graphs: on CUDA, capture each later step that runs without stored response KV
            (PromptCache) as one CUDA graph (all layers) and replay it; False runs it eagerly.
        step1_lse: let the step-1 attention return the mask rows' LSE so that mask-query
            scoring skips its own pass over K: True uses torch's cuDNN forward (where it is
            available and probes correct), "flash" its flash forward; False keeps SDPA's own
            backend choice and lets ``select_and_gather`` compute the LSE.
        cache: the cache policy (default ``PromptCache()``). A method that caches nothing
            (NoCache) runs a full pass at every step whatever the policy.
        first_pass: a ``FirstPassMemo`` shared with other generations of the same batch: step 1
            replays its record when the inputs match, and records into it otherwise.
        fusion: how tail passes (later steps) run each layer's elementwise work
            (``maskkv.models.fused``): "none" (the model's layer protocol, eager PyTorch),
            "triton" (five fused kernels per layer), "compile" (``torch.compile`` of the layer
            body), "torch" (the fused loop in eager PyTorch, bit-identical to "none"). "auto"
            is "triton" on CUDA for LLaDA / Dream layers, else "none": no compile warm-up, and
            it rounds as the eager code does except for the RMSNorm sum order.
    """

    def __init__(
        self,
        model,
        method: Method,
        prompt_len: int,
        attention_mask: torch.Tensor | None = None,
        *,
        profile: LayerProfile | None = None,
        token_chunk: int = 4096,
        backend: str = "auto",
        cuda_graphs: bool = True,
        step1_lse: bool | str = True,
        cache: CachePolicy | None = None,
        first_pass: FirstPassMemo | None = None,
        fusion: str = "auto",
    ) -> None:
        self.model = model
        if fusion not in FUSIONS:
            raise ValueError(f"fusion: expected one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        self._fused: FusedLayers | None = None  # resolved in _setup (needs the device)
        self.first_pass = first_pass
        self.method = method
        self.policy = cache if cache is not None else PromptCache()
        self.P = prompt_len
        self.shift = 1 if getattr(model, "dllm_kind", "llada") == "dream" else 0
        # The cached region: the prompt, less Dream's last position (recomputed every step).
        self.Pc = max(prompt_len - self.shift, 0)
        self.attention_mask = attention_mask
        self.profile = profile
        self.token_chunk = token_chunk
        self.backend = backend
        self.cuda_graphs = cuda_graphs
        if step1_lse not in (True, False, "cudnn", "flash"):
            raise ValueError(
                f"step1_lse must be True, False, 'cudnn' or 'flash', got {step1_lse!r}"
            )
        self.step1_lse = step1_lse
        self._graphs: dict[tuple[int, ...], dict] = {}  # (B, T, lo, hi) -> graph
        self._backend = backend  # resolved per device in _setup (the hot path skips the checks)
        self.caches: list[mk.RaggedKV] | None = None
        self.stats = StepStats()
        self._positions: torch.Tensor | None = None
        self._lens_cpu: torch.Tensor | None = None  # real prompt tokens inside the cached region
        # Response (tail) caches kept by Prefix/Dual/DLLMCache, one entry per layer:
        self.tail_k: list[torch.Tensor] | None = None  # [B, Hkv, T, D] after RoPE
        self.tail_v: list[torch.Tensor] | None = None  # [B, Hkv, T, D]
        self.tail_attn: list[torch.Tensor] | None = None  # [B, T, d] attention block output
        self.tail_mlp: list[torch.Tensor] | None = None  # [B, T, d] MLP block output
        self._block: tuple[int, int] | None = None  # current block, tail coordinates
        self._block_step = 0

    def begin_block(self, lo: int, hi: int) -> None:
        """The sampler starts decoding response positions [lo, hi) (a block start)."""
        self._block = (lo, hi)
        self._block_step = 0

    # -- helpers ------------------------------------------------------------------------------

    def use_fusion(
        self, fusion: str, device: torch.device | str, *, compile_backend: str = "inductor"
    ) -> None:
        """Run the tail passes from now on with ``fusion`` (see the class docstring); clears the
        captured graphs. Benchmarks compare the candidates on one step-1 cache with it.
        ``compile_backend``: the ``torch.compile`` backend of "compile"."""
        kind = resolve_fusion(fusion, self.model, torch.device(device))
        self.fusion = fusion
        self._fused = (
            None
            if kind == "none"
            else FusedLayers(self.model, kind, compile_backend=compile_backend)
        )
        self._graphs.clear()

    def _setup(self, x: torch.Tensor) -> None:
        B, L = x.shape
        self._backend = mk.resolve_backend(self.backend, x.device)
        self.use_fusion(self.fusion, x.device)
        if self.attention_mask is None:
            self._positions = torch.arange(L, device=x.device).expand(B, L)
            self._key_valid = None
            self._lens_cpu = torch.full((B,), self.Pc, dtype=torch.long)
        else:
            if self.attention_mask.shape != (B, L):
                raise ValueError(
                    f"attention_mask: expected [B={B}, L={L}] (prompt + response), "
                    f"got {tuple(self.attention_mask.shape)}"
                )
            self._positions = position_ids_from_mask(self.attention_mask)
            self._key_valid = self.attention_mask.bool()
            self._lens_cpu = self.attention_mask[:, : self.Pc].sum(1).long().cpu()

    def head_logits(self, h: torch.Tensor, need: torch.Tensor, offset: int) -> torch.Tensor:
        """Logits [n, vocab] for response positions ``need`` (bool [B, R]), row-major, from
        hidden states ``h`` [B, T, d] whose first column is absolute position ``offset``; Dream
        reads position i - 1."""
        B, R = need.shape
        rows, cols = need.nonzero(as_tuple=True)
        src = cols + (self.P - self.shift - offset)
        return self.model.head(h[rows, src][None])[0]

    def _sync(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _keep_tail(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store layer i's tail K/V (a full pass or a whole-tail refresh)."""
        if self.tail_k is None:
            n = len(self.model.layers)
            self.tail_k, self.tail_v = [None] * n, [None] * n
        self.tail_k[i], self.tail_v[i] = k.contiguous(), v.contiguous()

    def _keep_features(self, i: int, attn_out: torch.Tensor, mlp_out: torch.Tensor) -> None:
        if self.tail_attn is None:
            n = len(self.model.layers)
            self.tail_attn, self.tail_mlp = [None] * n, [None] * n
        self.tail_attn[i], self.tail_mlp[i] = attn_out, mlp_out

    def _response_bytes(self) -> int:
        total = 0
        for group in (self.tail_k, self.tail_v, self.tail_attn, self.tail_mlp):
            if group is not None:
                total += sum(t.nbytes for t in group if t is not None)
        return total

    # -- the three kinds of pass ------------------------------------------------------------------

    def start_full_pass(self, x: torch.Tensor, sink: KVSink | None = None) -> FullPass:
        """A full pass over ``x`` [B, P + R], not yet run (``FullPass.run`` runs its layers):
        every token through every layer; a caching method (re)builds the per-layer prompt caches
        (re-selecting the prompt for an eviction method) and, per the policy, stores the tail's
        KV / features. ``sink``: where they go (default: this denoiser's own ``caches``,
        ``tail_k`` ...; the serving engine passes its KV pool's). Its hidden states feed
        ``head_logits(pass.hidden, need, 0)``."""
        build, sink = self._pass_sink(x, sink)
        return FullPass(self, x, build_cache=build, sink=sink)

    def _pass_sink(self, x: torch.Tensor, sink: KVSink | None) -> tuple[bool, KVSink | None]:
        """(build_cache, sink) of a full pass over ``x``: a caching method builds its caches,
        into ``sink`` or, by default, this denoiser's own. Sets the denoiser up on first use."""
        if self._positions is None:
            self._setup(x)
        build = self.method.caches_prompt
        if build and sink is None:
            sink = self._own_kv()
        return build, sink

    def _own_kv(self) -> KVSink:
        """The sink that keeps a full pass's caches in this denoiser (``caches``, ``tail_k`` ...)."""
        return _OwnKV(self)

    def _full_pass(self, x: torch.Tensor) -> torch.Tensor:
        """``start_full_pass`` run to the end; returns the hidden states [B, L, d]."""
        full = self.start_full_pass(x)
        full.run()
        return full.hidden

    def _store_tail(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A full pass's tail K/V of layer i (views into the layer's K/V): copies, so that the
        layer's full KV can die."""
        self._keep_tail(i, k.clone(), v.clone())

    def _adopt_caches(self, caches: list[mk.RaggedKV]) -> None:
        """The prompt caches a full pass built become the ones later steps read."""
        self.caches = caches
        self._graphs.clear()  # captured later steps read the old caches' addresses
        self.stats.kept_lengths = torch.stack([c.lengths().cpu() for c in caches])
        if self.stats.first_kept_positions is None and self.method.evicts:
            self.stats.first_kept_positions = [c.positions.cpu() for c in caches]
        self.stats.prompt_kv_bytes_kept = sum(c.k.nbytes + c.v.nbytes for c in caches)

    def _can_replay(self, memo: FirstPassMemo, x: torch.Tensor, lse_from: int | None) -> bool:
        """Whether ``memo`` holds exactly this pass: same inputs, and the same attention kernel
        (the fused LSE forward and SDPA round differently)."""
        if not memo.matches(self.model, x, self.attention_mask):
            return False
        if memo.fused_lse_from is not None:
            return lse_from == memo.fused_lse_from
        op = "flash" if self.step1_lse == "flash" else "cudnn"
        return lse_from is None or not _lse_op_usable(op, memo.layers[0][0], self._key_valid)

    def _mask_scored(self) -> bool:
        return self.method.evicts and self.method.selector_kwargs().get("score") == "mask"

    def _first_voter(self) -> int:
        """First position whose query votes under mask scoring: the response (MaskKV), or the
        whole tail for a method with ``tail_votes`` (Dream's last prompt position too)."""
        return self.Pc if self.method.tail_votes else self.P

    def select_prompt(self, q, k, v, layer_budget: int | None, lse=None) -> mk.RaggedKV:
        """One layer's prompt cache from its q [B, Hq, L, D], k, v [B, Hkv, L, D] (after RoPE):
        the first ``Pc`` positions whole (``layer_budget`` None or >= Pc), else the method's
        selection at ``layer_budget`` (mask queries or the window vote; ``lse``: the mask rows'
        LSE [B, Hq, M] from the attention, or None)."""
        Pc, lens = self.Pc, self._lens_cpu
        if layer_budget is None or layer_budget >= Pc:
            return self._keep_all(k, v)  # FullCache, or a budget that covers the prompt
        kwargs = self.method.selector_kwargs()
        if kwargs.get("score") == "window":
            # The last W positions of the cached region vote (and are kept); at least one query
            # must vote. For Dream that region ends one token early: its last prompt position is
            # recomputed every step and is neither scored nor counted in the budget.
            W = min(max(self.method.window_size(layer_budget), 1), Pc)
            q_sel = q[:, :, Pc - W : Pc]
            lse = None
        else:
            # The response queries: all [MASK] at step 1; at a later re-selection (a prompt
            # refresh) the partly decoded response votes, as Fast-dLLM's refresh would see it.
            # With ``tail_votes`` also the prompt positions recomputed every step (Dream).
            q_sel = q[:, :, self._first_voter() :]
            if lse is not None and lse.shape[-1] != q_sel.shape[2]:
                lse = None  # a caller's LSE of other rows: select_and_gather computes its own
        return mk.select_and_gather(
            q_sel,
            k,
            v,
            layer_budget,
            prompt_len=Pc,
            prompt_lens=lens,
            lse=lse,
            backend=self.backend,
            **kwargs,
        )

    def _keep_all(self, k: torch.Tensor, v: torch.Tensor) -> mk.RaggedKV:
        """Every real prompt token of every head, in order: a plain gather, no scoring.

        The row index is built on the host from the (host-known) prompt lengths, so there is
        no sort and no device sync.
        """
        B, Hkv, L, D = k.shape
        Pc, lens = self.Pc, self._lens_cpu
        seg_lens = lens.repeat_interleave(Hkv)  # [B * Hkv]
        seg = torch.arange(B * Hkv).repeat_interleave(seg_lens)
        cu = torch.zeros(B * Hkv + 1, dtype=torch.long)
        cu[1:] = seg_lens.cumsum(0)
        pos = torch.arange(int(cu[-1])) - cu[:-1][seg] + (Pc - lens).repeat_interleave(Hkv)[seg]
        rows = (seg * L + pos).to(k.device)
        return mk.RaggedKV(
            k.reshape(B * Hkv * L, D).index_select(0, rows),
            v.reshape(B * Hkv * L, D).index_select(0, rows),
            cu.to(torch.int32).to(k.device),
            pos.to(torch.int32).to(k.device),
            int(lens.max()) if B else 0,
            Hkv,
        )

    def _cached_layers(self, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """ids [B, T] of tail positions -> hidden states [B, T, d], attending to the pruned
        prompt and to themselves (no stored response KV).

        The kernels run unchecked: every input is built here (validated once, at step 1)."""
        h = self.model.embed(ids)
        return run_layers(
            self.model, h, cos, sin, self._attend_tail(None), self.token_chunk, self._fused
        )

    def _tail_pass(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Tail positions [lo, hi) run against the pruned prompt.

        Without stored response KV (PromptCache) the dense tail of ``ragged_attention`` is the
        computed tokens themselves. With stored response KV the computed K/V overwrite their
        slots and the dense tail is the whole stored response: [cached ‖ computed ‖ cached].
        A whole-tail pass refreshes the stored KV (and dLLM-Cache's features).
        """
        model, Pc, chunk = self.model, self.Pc, self.token_chunk
        T = x.shape[1] - Pc
        whole = lo == 0 and hi == T
        stored = self.policy.keeps_response_kv and self.tail_k is not None
        keep_feat = whole and self.policy.keeps_response_features
        if not (stored or keep_feat):
            return self._cached_pass(x, lo, hi)
        cos, sin = model.rotary(self._positions[:, Pc + lo : Pc + hi])
        h = model.embed(x[:, Pc + lo : Pc + hi])
        attend = self._attend_tail((lo, hi, whole) if stored else None)
        if not keep_feat:
            return run_layers(model, h, cos, sin, attend, chunk, self._fused)
        for i, layer in enumerate(model.layers):  # dLLM-Cache: each layer's block outputs too
            q, k, v = qkv_chunked(layer, h, cos, sin, chunk)
            attn = attend(i, q, k, v)
            h_attn = layer.attn_output(h, attn)
            h_mlp = chunked(layer.mlp_block, h_attn, chunk)
            self._keep_features(i, h_attn - h, h_mlp - h_attn)
            h = h_mlp
        return h

    def _attend_tail(self, stored: tuple[int, int, bool] | None):
        """attend(i, q, k, v) of layer i in a tail pass: ``ragged_attention`` over [pruned prompt
        ‖ dense tail]. Without stored response KV (``stored`` None) the tail is k, v; with it
        (``stored`` = (lo, hi, whole)) k, v overwrite their slots of the stored KV (a whole-tail
        pass replaces it) and the tail is the whole stored response."""

        def attend(i, q, k, v):
            k_tail, v_tail = k, v
            if stored is not None:
                lo, hi, whole = stored
                if whole:
                    self._keep_tail(i, k, v)
                else:
                    self.tail_k[i][:, :, lo:hi] = k
                    self.tail_v[i][:, :, lo:hi] = v
                    k_tail, v_tail = self.tail_k[i], self.tail_v[i]
            return mk.ragged_attention(
                q, self.caches[i], k_tail, v_tail, backend=self._backend, check_inputs=False
            )

        return attend

    def _partial_pass(self, x: torch.Tensor) -> torch.Tensor:
        """dLLM-Cache's in-between step over the whole tail.

        Per layer: the tail's value vectors are computed for every token; the
        ``int(T * transfer_ratio)`` tokens whose values drifted most from the cached ones (lowest
        cosine similarity, per row) are recomputed (their queries attend to [pruned prompt ‖
        stored tail KV], their attention and MLP outputs replace the cached ones); the stored
        values take the new values of every token, the stored keys those of the recomputed ones;
        every other token adds its cached attention and MLP outputs to its current residual.
        """
        model, Pc, chunk = self.model, self.Pc, self.token_chunk
        cos, sin = model.rotary(self._positions[:, Pc:])
        h = model.embed(x[:, Pc:])
        B, T, d = h.shape
        n = int(T * self.policy.transfer_ratio)
        for i, (layer, cache) in enumerate(zip(model.layers, self.caches)):
            if n == 0:
                h = h + self.tail_attn[i]
                h = h + self.tail_mlp[i]
                continue
            # The layer protocol projects q, k, v together; only v is needed for every token.
            q, k, v = qkv_chunked(layer, h, cos, sin, chunk)
            new_v = v.transpose(1, 2).reshape(B, T, -1)
            old_v = self.tail_v[i].transpose(1, 2).reshape(B, T, -1)
            drift = F.cosine_similarity(new_v.float(), old_v.float(), dim=-1)  # [B, T]
            idx = drift.topk(n, -1, largest=False).indices  # [B, n]
            head_idx = idx[:, None, :, None]
            self.tail_v[i] = v.contiguous()
            self.tail_k[i].scatter_(
                2,
                head_idx.expand(-1, k.shape[1], -1, k.shape[3]),
                k.gather(2, head_idx.expand(-1, k.shape[1], -1, k.shape[3])),
            )
            q_sel = q.gather(2, head_idx.expand(-1, q.shape[1], -1, q.shape[3]))
            attn = mk.ragged_attention(
                q_sel, cache, self.tail_k[i], self.tail_v[i], backend=self._backend,
                check_inputs=False,
            )  # fmt: skip
            tok_idx = idx[:, :, None].expand(-1, -1, d)
            h_sel = h.gather(1, tok_idx)
            self.tail_attn[i].scatter_(1, tok_idx, layer.attn_output(h_sel, attn) - h_sel)
            h = h + self.tail_attn[i]
            h_sel = h.gather(1, tok_idx)
            self.tail_mlp[i].scatter_(1, tok_idx, layer.mlp_block(h_sel) - h_sel)
            h = h + self.tail_mlp[i]
        return h

    def _cached_pass(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Tail positions [lo, hi) run against the pruned prompt and themselves.

        On CUDA each (shape, lo, hi) is captured once as one CUDA graph (all layers) and
        replayed: a later step is a few hundred small kernels whose launch cost would otherwise
        exceed their run time. The graph reads static buffers (token ids in, hidden states out)
        and the prompt caches, which stay put until a full pass rebuilds them (that clears the
        graphs)."""
        ids = x[:, self.Pc + lo : self.Pc + hi]
        key = (*ids.shape, lo, hi)
        graph = self._graphs.get(key)
        if graph is not None:
            static_ids, static_h, g = graph["ids"], graph["h"], graph["graph"]
            static_ids.copy_(ids)
            g.replay()
            return static_h
        cos, sin = self.model.rotary(self._positions[:, self.Pc + lo : self.Pc + hi])
        graph_safe = getattr(self.model, "supports_cuda_graphs", True)  # MoE: no host sync
        if not (self.cuda_graphs and x.is_cuda and graph_safe):
            return self._cached_layers(ids, cos, sin)
        # Warm up on a side stream (Triton compiles and autotunes here, outside the capture).
        static_ids = ids.clone()
        stream = torch.cuda.Stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            self._cached_layers(static_ids, cos, sin)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_h = self._cached_layers(static_ids, cos, sin)
        # The graph reads every input by address: keep each one alive as long as the graph (a
        # freed cos/sin block would be reused by the allocator and replays would read garbage).
        self._graphs[key] = dict(graph=g, ids=static_ids, h=static_h, cos=cos, sin=sin)
        g.replay()
        return static_h

    # -- the public call --------------------------------------------------------------------------

    def plan(self, x: torch.Tensor) -> StepPlan:
        """The policy's plan for the next pass over ``x`` [B, P + R]."""
        if not self.method.caches_prompt:
            return StepPlan("full", refresh=True)
        T = x.shape[1] - self.Pc
        lo, hi = self._block if self._block is not None else (0, T)
        return self.policy.plan(len(self.stats.step_times), self._block_step, lo, hi, T)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        """x: [B, P + R] token ids; need: bool [B, R] response positions whose logits are wanted.

        Returns logits [n, vocab] for ``x[:, P:][need]`` in row-major order, in the model dtype
        (the official samplers take their confidences in the logits' dtype, so casting here
        would change which tokens win in bf16).
        """
        self._sync(x.device)
        t0 = time.perf_counter()
        if self._positions is None:
            self._setup(x)
        plan = self.plan(x)
        if plan.kind == "full":
            h, offset = self._full_pass(x), 0
        elif plan.kind == "tail":
            T = x.shape[1] - self.Pc
            hi = T if plan.hi is None else plan.hi
            h, offset = self._tail_pass(x, plan.lo, hi), self.Pc + plan.lo
        elif plan.kind == "partial":
            h, offset = self._partial_pass(x), self.Pc
        else:
            raise ValueError(f"plan.kind: expected 'full', 'tail' or 'partial', got {plan.kind!r}")
        logits = self.head_logits(h, need, offset)
        self._sync(x.device)
        self.stats.step_times.append(time.perf_counter() - t0)
        self.stats.step_kinds.append(plan.kind)
        self.stats.step_refresh.append(plan.refresh)
        self.stats.response_kv_bytes = max(self.stats.response_kv_bytes, self._response_bytes())
        self._block_step += 1
        return logits


class _OwnKV(KVSink):
    """A ``Denoiser``'s own storage of a full pass's caches (``caches``, ``tail_k`` / ``tail_v``,
    dLLM-Cache's features)."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.den = denoiser
        self.caches: list[mk.RaggedKV] = []

    def prompt(self, i, q, k, v, budget, lse) -> None:
        self.caches.append(self.den.select_prompt(q, k, v, budget, lse))

    def tail(self, i, k, v) -> None:
        self.den._store_tail(i, k, v)

    def features(self, i, attn_out, mlp_out) -> None:
        self.den._keep_features(i, attn_out, mlp_out)

    def finish(self) -> None:
        self.den._adopt_caches(self.caches)
