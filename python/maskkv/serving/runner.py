"""The model runner: the forward passes of many requests, each bit for bit ``maskkv.generate``'s.

Two kinds of pass (the request's plan says which, ``Request.plan``):

- **full** (a prompt pass with eviction, a block-start refresh with ``refresh_prompt``, every
  NoCache step): one request at a time, through the request's own one-row ``Denoiser``: its
  ``FullPass`` (LLaDA2: ``WindowPass``), the very code ``maskkv.generate`` runs, resumable by
  layers, so the engine runs a few layers per iteration (a token budget) and a long prompt never
  stalls the running requests. Each layer's pruned prompt KV (and stored response KV) goes
  straight into the request's rows of the pool (``_PoolKV``; FullCache: written from the layer's
  keys, no gather) and the layer's full KV is freed.
- **tail** (every other step; LLaDA2's block commits too): every such request's computed tokens
  packed into one sequence, one batched pass through every layer (``run_layers``, the layer
  stack of ``maskkv.generate``'s later steps, fused where it fuses; embedding, norms,
  projections, MLP / experts, head all row-wise and batch-invariant,
  ``maskkv.generation.batch_invariant``); attention reads each request's pruned prompt from the
  pool and its tail (the computed tokens, or the stored response KV with the computed ones
  written into their slots; block-causal: the committed blocks up to the current one) in one
  varlen ``ragged_attention`` call, or one call per request where the backend's varlen form does
  not round exactly like its dense form (``attention="auto"`` probes it once). The batch is data
  (``StepBatch``): on CUDA it is padded to a bucket and replayed as a CUDA graph (``graphs``).

Only the head's rows that a sampler asked for are computed (``need``), as in the ``Denoiser``.
"""

from __future__ import annotations

import torch

import maskkv_kernels as mk

from ..generation.block_causal import BlockCausalDenoiser, BlockLayout, recompute_attention
from ..generation.engine import Denoiser
from ..generation.passes import KVSink, run_layers
from ..generation.policies import CachePolicy, PromptCache
from ..methods import LayerProfile, Method
from ..models.fused import FusedLayers, resolve_fusion
from .graphs import StepBatch, StepGraphs
from .kv_memory import KVFootprint, KVPool
from .params import SamplingParams
from .request import Request

__all__ = ["ModelRunner"]


class _PoolKV(KVSink):
    """A full pass's caches written into one request's rows of the pool."""

    def __init__(self, runner: ModelRunner, req: Request) -> None:
        self.runner, self.req = runner, req

    def prompt(self, i, q, k, v, budget, lse) -> None:
        runner, req = self.runner, self.req
        Pc, H, D = req.cached_prompt_len, runner.num_kv_heads, runner.head_dim
        start = req.pool_range.start + req.footprint.prompt_offset(i)
        n = req.footprint.prompt_rows[i]
        pool = runner.pool
        if budget is None or budget >= Pc:  # keep everything: one copy, from the projection
            pool.k[start : start + n].view(H, Pc, D).copy_(k[0, :, :Pc])
            pool.v[start : start + n].view(H, Pc, D).copy_(v[0, :, :Pc])
            pool.positions[start : start + n] = torch.arange(Pc, device=k.device).repeat(H)
            seg_lens = [Pc] * H
        else:
            cache = req.denoiser.select_prompt(q, k, v, budget, lse)
            if cache.k.shape[0] != n:
                raise RuntimeError(
                    f"layer {i}: the selection kept {cache.k.shape[0]} rows, {n} were reserved"
                )
            pool.k[start : start + n] = cache.k
            pool.v[start : start + n] = cache.v
            pool.positions[start : start + n] = cache.positions
            seg_lens = cache.lengths().view(-1).tolist()
        cu = torch.zeros(H + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seg_lens).cumsum(0)
        entry = (cu.to(k.device), seg_lens, max(seg_lens, default=0))
        if len(req.cu_seqlens) <= i:
            req.cu_seqlens.append(entry[0]), req.seg_lens.append(entry[1])
            req.max_seqlen.append(entry[2])
        else:
            req.cu_seqlens[i], req.seg_lens[i], req.max_seqlen[i] = entry

    def tail(self, i, k, v) -> None:
        n = k.shape[2]  # the first n tail positions (LLaDA2: the committed blocks)
        self.runner.tail_view(self.req, i)[:n].copy_(k[0].transpose(0, 1))
        self.runner.tail_view(self.req, i, values=True)[:n].copy_(v[0].transpose(0, 1))

    def features(self, i, attn_out, mlp_out) -> None:
        raise RuntimeError("the serving engine keeps no dLLM-Cache features")


class ModelRunner:
    """Runs the forward passes of the engine's requests on one model.

    Args:
        model: a ``LLaDAModelLM`` / ``DreamModelLM`` / ``LLaDAMoEModelLM`` /
            ``LLaDA2MoeModelLM`` (any model of the layer protocol).
        method, policy, profile: the engine's eviction method, cache policy, layer profile.
        pool: the engine's ``KVPool``.
        backend: ``maskkv_kernels`` backend.
        token_chunk: tokens per chunk of QKV / attention queries / MLP in full passes.
        step1_lse, fusion: as ``Denoiser(step1_lse=..., fusion=...)``.
        attention: "varlen" (one call per layer for the whole batch), "per_request" (one dense
            call per request) or "auto" (varlen when it rounds exactly like the dense form on
            this backend, padded bounds included, probed once; always per request for LLaDA2
            with ``PromptCache``, whose blocks share one prompt cache).
        cuda_graphs: True: on CUDA, batched steps replay CUDA graphs by bucket (varlen
            attention and a graph-safe model only; elsewhere eager); False: eager;
            "padded": the bucketed, padded steps run eagerly on any device (what the graphs
            compute, without a capture: for tests).
    """

    def __init__(
        self,
        model,
        method: Method,
        policy: CachePolicy,
        pool: KVPool,
        *,
        profile: LayerProfile | None = None,
        backend: str = "auto",
        token_chunk: int = 4096,
        step1_lse: bool | str = True,
        fusion: str = "auto",
        attention: str = "auto",
        cuda_graphs: bool | str = True,
    ) -> None:
        if attention not in ("auto", "varlen", "per_request"):
            raise ValueError(
                f"attention: expected 'auto', 'varlen' or 'per_request', got {attention!r}"
            )
        if cuda_graphs not in (True, False, "padded"):
            raise ValueError(f"cuda_graphs: expected True, False or 'padded', got {cuda_graphs!r}")
        self.model, self.method, self.policy, self.pool = model, method, policy, pool
        self.profile, self.token_chunk, self.step1_lse = profile, token_chunk, step1_lse
        self.backend, self.fusion = backend, fusion
        self.device = next(model.parameters()).device
        self._backend = mk.resolve_backend(backend, self.device)
        kind = getattr(model, "dllm_kind", "llada")
        self.block_causal = kind == "llada2"
        self.shift = 1 if kind == "dream" else 0
        self.num_layers = len(model.layers)
        self.num_kv_heads = pool.num_kv_heads
        self.head_dim = pool.head_dim
        # Stored response KV: the policy keeps it (LLaDA2: the committed blocks).
        self.stored = policy.keeps_response_kv and method.caches_prompt
        fused = resolve_fusion(fusion, model, self.device)
        self.fused = None if fused == "none" else FusedLayers(model, fused)
        # LLaDA2 + PromptCache recomputes every block, each against the same prompt rows: not
        # one segment per request, so not one varlen call.
        shared = self.block_causal and method.caches_prompt and isinstance(policy, PromptCache)
        if attention == "auto":
            attention = "per_request" if shared or not self._varlen_is_exact() else "varlen"
        self.attention = attention
        self.graphs: StepGraphs | None = None
        graph_safe = getattr(model, "supports_cuda_graphs", True)
        if attention == "varlen" and cuda_graphs == "padded":
            self.graphs = StepGraphs(self.forward, pool.scratch_token, self.device, "padded")
        elif attention == "varlen" and cuda_graphs and self.device.type == "cuda" and graph_safe:
            self.graphs = StepGraphs(self.forward, pool.scratch_token, self.device, "cuda")

    # -- shapes and footprints ----------------------------------------------------------------

    def layout(self, prompt_len: int, params: SamplingParams) -> tuple[int, int]:
        """(Pc, T) of a request: the cached prompt positions and the tail after them (the
        response, plus Dream's last prompt position; LLaDA2: whole generation blocks after the
        complete prompt blocks)."""
        G = params.gen_length
        if self.block_causal:
            bl = params.block_length
            Pc = prompt_len // bl * bl
            return Pc, -(-(prompt_len - Pc + G) // bl) * bl
        Pc = max(prompt_len - self.shift, 0)
        return Pc, prompt_len + G - Pc

    def footprint(self, prompt_len: int, params: SamplingParams) -> KVFootprint:
        """The pool rows a request of this shape holds (see ``kv_memory``); ``params``
        resolved (``SamplingParams.resolved``)."""
        Pc, T = self.layout(prompt_len, params)
        H = self.num_kv_heads
        if not self.method.caches_prompt:
            prompt_rows = (0,) * self.num_layers
        else:
            budgets = self.method.layer_budgets(self.num_layers, Pc, self.profile)
            prompt_rows = tuple(H * min(b, Pc) for b in budgets)
        return KVFootprint(prompt_rows, T if self.stored else 0, H)

    def denoiser(self, req: Request) -> Denoiser:
        """The request's one-row denoiser (its full passes and selection): ``maskkv.generate``'s
        for the same request."""
        kw = dict(profile=self.profile, backend=self.backend, token_chunk=self.token_chunk,
                  cache=self.policy)  # fmt: skip
        if self.block_causal:
            p = req.params
            layout, _ = BlockLayout.build(
                req.prompt, None, p.gen_length, p.block_length, self.model.config.mask_token_id
            )
            return BlockCausalDenoiser(
                self.model, self.method, layout, soft_mask=p.block_mask == "additive", **kw
            )
        # Its later steps never run (the batched step does): no fused layer bodies to build.
        return Denoiser(
            self.model, self.method, req.prompt_len, step1_lse=self.step1_lse, fusion="none",
            **kw,
        )  # fmt: skip

    # -- full passes --------------------------------------------------------------------------

    def begin_full_pass(self, req: Request) -> None:
        """Set up the pending full pass of ``req`` (its layers run in ``full_pass_step``)."""
        if req.denoiser is None:
            req.denoiser = self.denoiser(req)
        sink = _PoolKV(self, req) if self.method.caches_prompt else None
        x = req.event.x
        if self.block_causal:
            req.full_pass = req.denoiser.start_window_pass(x, req.progress.block, sink)
        else:
            req.full_pass = req.denoiser.start_full_pass(x, sink)

    def full_pass_step(self, req: Request, max_layers: int) -> torch.Tensor | None:
        """Run up to ``max_layers`` layers of ``req``'s full pass; returns the logits of the
        pending ``need`` once the last layer ran, else None."""
        if not req.full_pass.run(max_layers):
            return None
        hidden = req.full_pass.hidden
        req.full_pass = None
        return req.denoiser.head_logits(hidden, req.event.need, 0)

    # -- pool views ---------------------------------------------------------------------------

    def tail_view(self, req: Request, i: int, values: bool = False) -> torch.Tensor:
        """[T, Hkv, D] stored response keys (values) of layer ``i``: a view of the pool."""
        T, H, D = req.tail_len, self.num_kv_heads, self.head_dim
        start = req.pool_range.start + req.footprint.tail_offset(i)
        pool = self.pool.v if values else self.pool.k
        return pool[start : start + T * H].view(T, H, D)

    def _request_cache(self, req: Request, i: int) -> mk.RaggedKV:
        """Layer ``i``'s pruned prompt of one request: a packed ``RaggedKV`` over its pool rows."""
        start = req.pool_range.start + req.footprint.prompt_offset(i)
        n = req.footprint.prompt_rows[i]
        pool = self.pool
        return mk.RaggedKV(
            pool.k[start : start + n], pool.v[start : start + n], req.cu_seqlens[i],
            pool.positions[start : start + n], req.max_seqlen[i], self.num_kv_heads,
        )  # fmt: skip

    # -- tail passes --------------------------------------------------------------------------

    def tail_forward(self, reqs: list[Request]) -> list[torch.Tensor]:
        """One batched pass over every request's planned tail positions; per request the logits
        of its pending ``need`` (as ``Denoiser`` returns them; none for a commit pass)."""
        batch, spans, counts = self._pack(reqs)
        if self.graphs is not None:
            logits = self.graphs.run(batch)
        else:
            batch = batch.to(self.device)
            attend = None
            if self.attention == "per_request":
                attend = self._attend_per_request(reqs, spans, batch)
            logits = self.forward(batch, attend)
        return list(logits.split(counts))

    def _pack(self, reqs: list[Request]):
        """The ``StepBatch`` of ``reqs`` (host index tensors) and the host spans
        (offset, lo, hi) of each request's rows."""
        H, L = self.num_kv_heads, self.num_layers
        ids, positions, spans, rows, counts = [], [], [], [], []
        q_lens, tails = [], []
        offset = 0
        for r in reqs:
            Pc, plan = r.cached_prompt_len, r.plan
            lo, hi = plan.lo, r.tail_len if plan.hi is None else plan.hi
            ids.append(r.x[0, Pc + lo : Pc + hi])
            positions.append(torch.arange(Pc + lo, Pc + hi))
            spans.append((offset, lo, hi))
            if plan.kind != "commit":
                need = r.event.need[0].nonzero()[:, 0].cpu()
                rows.append(need + (offset - lo))
                counts.append(need.numel())
            else:
                counts.append(0)
            q_lens.append(hi - lo)
            # Stored tail visible to the queries: the whole response (bidirectional), the blocks
            # up to the current one (block-causal).
            tails.append(hi if self.block_causal else r.tail_len)
            offset += hi - lo
        cu_q = torch.zeros(len(reqs) + 1, dtype=torch.int32)
        cu_q[1:] = torch.tensor(q_lens).cumsum(0)
        # Layer i's segments, request-major: request b's head g at b * H + g, its rows at the
        # request's prompt rows of the layer plus the heads before g.
        seg_lens = torch.tensor([[r.seg_lens[i] for r in reqs] for i in range(L)])  # [L, B, H]
        cache_cu = torch.zeros(L, len(reqs) * H + 1, dtype=torch.int32)
        cache_cu[:, 1:] = seg_lens.view(L, -1).cumsum(1)
        prompt_at = torch.tensor(
            [[r.pool_range.start + r.footprint.prompt_offset(i) for r in reqs] for i in range(L)]
        )
        cache_starts = (prompt_at[:, :, None] + seg_lens.cumsum(2) - seg_lens).view(L, -1)
        batch = StepBatch(
            ids=torch.cat(ids),
            positions=torch.cat(positions),
            cu_q=cu_q,
            max_q=max(q_lens),
            cache_cu=cache_cu,
            cache_starts=cache_starts,
            max_kv=[max(r.max_seqlen[i] for r in reqs) for i in range(L)],
            logit_rows=torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long),
        )
        if self.stored:
            cu_t = torch.zeros(len(reqs) + 1, dtype=torch.int32)
            cu_t[1:] = torch.tensor(tails).cumsum(0)
            tail_at = torch.tensor(
                [[(r.pool_range.start + r.footprint.tail_offset(i)) // H for r in reqs]
                 for i in range(L)]
            )  # fmt: skip
            slots = torch.cat([torch.arange(lo, hi) for _, lo, hi in spans])
            owner = torch.repeat_interleave(torch.arange(len(reqs)), torch.tensor(q_lens))
            batch.cu_t, batch.tail_starts, batch.max_t = cu_t, tail_at, max(tails)
            batch.dest = tail_at[:, owner] + slots
        return batch, spans, counts

    @torch.no_grad()
    def forward(self, batch: StepBatch, attend=None) -> torch.Tensor:
        """The batched step of ``batch`` (on the device): logits [batch.num_logits, V].
        ``attend``: layer attention (default: one varlen call per layer over the pool)."""
        model = self.model
        h = model.embed(batch.ids[None])
        cos, sin = model.rotary(batch.positions[None])
        if attend is None:
            attend = self._attend_varlen(batch)
        h = run_layers(model, h, cos, sin, attend, self.token_chunk, self.fused)
        return model.head(h[0, batch.logit_rows][None])[0]

    def _store(self, batch: StepBatch, i: int, k, v) -> None:
        """The computed tokens' K/V [1, Hkv, N, D] of layer ``i`` into their pool slots."""
        H, D = self.num_kv_heads, self.head_dim
        self.pool.k.view(-1, H, D).index_copy_(0, batch.dest[i], k[0].transpose(0, 1))
        self.pool.v.view(-1, H, D).index_copy_(0, batch.dest[i], v[0].transpose(0, 1))

    def _attend_varlen(self, batch: StepBatch):
        """attend(i, q, k, v): every request in one varlen ``ragged_attention`` over the pool."""
        H, D, pool = self.num_kv_heads, self.head_dim, self.pool

        def attend(i, q, k, v):
            if self.stored:
                self._store(batch, i, k, v)
                k_tail, v_tail = pool.k.view(-1, H, D), pool.v.view(-1, H, D)
                extra = dict(
                    cu_seqlens_tail=batch.cu_t, max_seqlen_tail=batch.max_t,
                    tail_starts=batch.tail_starts[i],
                )  # fmt: skip
            else:
                k_tail, v_tail = k[0].transpose(0, 1), v[0].transpose(0, 1)
                extra = dict(cu_seqlens_tail=batch.cu_q, max_seqlen_tail=batch.max_q)
            cache = mk.RaggedKV(
                pool.k, pool.v, batch.cache_cu[i], pool.positions, batch.max_kv[i], H,
                seg_starts=batch.cache_starts[i],
            )  # fmt: skip
            out = mk.ragged_attention(
                q[0].transpose(0, 1), cache, k_tail, v_tail, cu_seqlens_q=batch.cu_q,
                max_seqlen_q=batch.max_q, backend=self._backend, check_inputs=False, **extra,
            )  # fmt: skip
            return out.transpose(0, 1)[None]

        return attend

    def _attend_per_request(self, reqs: list[Request], spans, batch: StepBatch):
        """attend(i, q, k, v): one dense ``ragged_attention`` per request, as its ``Denoiser``
        calls it (LLaDA2 with PromptCache: one per block, ``recompute_attention``)."""

        def attend(i, q, k, v):
            if self.stored:
                self._store(batch, i, k, v)
            outs = []
            for r, (o, lo, hi) in zip(reqs, spans):
                n = hi - lo
                cache = self._request_cache(r, i)
                q_r, k_r, v_r = q[:, :, o : o + n], k[:, :, o : o + n], v[:, :, o : o + n]
                if self.block_causal and not self.stored:  # blocks 0..nb, each over 0..j
                    bl = r.params.block_length
                    outs.append(recompute_attention(q_r, cache, k_r, v_r, bl, self._backend))
                    continue
                whole = lo == 0 and hi == r.tail_len
                if self.stored and not whole:  # [cached ‖ computed ‖ cached] from the pool
                    visible = hi if self.block_causal else r.tail_len
                    k_r = self.tail_view(r, i)[:visible].permute(1, 0, 2)[None]
                    v_r = self.tail_view(r, i, values=True)[:visible].permute(1, 0, 2)[None]
                outs.append(
                    mk.ragged_attention(
                        q_r, cache, k_r, v_r, backend=self._backend, check_inputs=False
                    )
                )
            return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

        return attend

    # -- the probe ------------------------------------------------------------------------------

    def _varlen_is_exact(self) -> bool:
        """Whether this backend's varlen ``ragged_attention`` over pool views gives exactly the
        dense per-request calls' bits (then one call serves the batch), also when the batch is
        padded to a bucket (more query rows, empty requests, looser host bounds: the CUDA-graph
        path). Probed on two small requests with ragged heads, the second cache placed before
        the first in the pool."""
        H, D, dev = self.num_kv_heads, self.head_dim, self.device
        Hq = self.model.config.num_attention_heads
        g = torch.Generator().manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(dev, self.pool.dtype)

        lens_q = [3, 17]
        seg_lens = [[3 + (5 * h) % 7 for h in range(H)], [1 + (3 * h) % 11 for h in range(H)]]
        rows = [sum(x) for x in seg_lens]
        first = [rows[1] + 5, 2]  # request 0 after request 1, holes around both
        pool_k, pool_v = rand(sum(rows) + 9, D), rand(sum(rows) + 9, D)
        pos = torch.zeros(pool_k.shape[0], dtype=torch.int32, device=dev)
        dense, qs, ks, vs, starts = [], [], [], [], []
        for b, n in enumerate(lens_q):
            cu = torch.zeros(H + 1, dtype=torch.int32)
            cu[1:] = torch.tensor(seg_lens[b]).cumsum(0)
            s0 = first[b]
            starts.append(cu[:-1].long() + s0)
            cache = mk.RaggedKV(
                pool_k[s0 : s0 + rows[b]], pool_v[s0 : s0 + rows[b]], cu.to(dev),
                pos[s0 : s0 + rows[b]], max(seg_lens[b]), H,
            )  # fmt: skip
            q, k, v = rand(1, Hq, n, D), rand(1, H, n, D), rand(1, H, n, D)
            qs.append(q), ks.append(k), vs.append(v)
            dense.append(mk.ragged_attention(q, cache, k, v, backend=self._backend))

        def packed(ts, pad=0):
            rows = torch.cat([t[0].transpose(0, 1) for t in ts])
            return torch.cat([rows, rows.new_zeros(pad, *rows.shape[1:])]) if pad else rows

        want = packed(dense)
        n_q, max_kv = sum(lens_q), max(max(x) for x in seg_lens)
        for pad_rows, pad_reqs, loose in ((0, 0, 1), (13, 2, 4)):  # exact, then bucket-padded
            cu = torch.zeros(2 * H + 1, dtype=torch.int32)
            cu[1:] = torch.tensor(seg_lens[0] + seg_lens[1]).cumsum(0)
            cu = torch.cat([cu, cu[-1:].repeat(pad_reqs * H)])
            seg_starts = torch.cat([*starts, torch.zeros(pad_reqs * H, dtype=torch.long)])
            cache = mk.RaggedKV(
                pool_k, pool_v, cu.to(dev), pos, max_kv * loose, H, seg_starts=seg_starts.to(dev),
            )  # fmt: skip
            cu_q = torch.tensor([0, lens_q[0], n_q] + [n_q] * pad_reqs, dtype=torch.int32)
            out = mk.ragged_attention(
                packed(qs, pad_rows), cache, packed(ks, pad_rows), packed(vs, pad_rows),
                cu_seqlens_q=cu_q.to(dev), max_seqlen_q=max(lens_q) * loose,
                cu_seqlens_tail=cu_q.to(dev), max_seqlen_tail=max(lens_q) * loose,
                backend=self._backend,
            )  # fmt: skip
            if not torch.equal(out[:n_q], want):
                return False
        return True
