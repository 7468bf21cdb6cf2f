"""The model runner: the forward passes of many requests, each bit for bit ``maskkv.generate``'s.

Two kinds of pass (the request's cache policy says which, ``Request.plan``):

- **full** (a prompt pass with eviction, a block-start refresh with ``refresh_prompt``, every
  NoCache step): one request at a time, [prompt ‖ response] through every layer exactly as the
  ``Denoiser``'s full pass runs it for one row (the same helpers: chunked QKV and MLP, the dense
  attention with the mask rows' LSE, ``Denoiser._prune``), but *resumable by layers*: the engine
  runs a few layers per iteration (a token budget), so a long prompt never stalls the running
  requests for a whole pass. Right after a layer's attention its pruned prompt KV goes into the
  request's rows of the pool (FullCache: written straight from the layer's keys, no gather) and
  the layer's full KV is freed.
- **tail** (every other step): every such request's tail tokens packed into one sequence, one
  batched pass through every layer (embedding, norms, projections, MLP, head all row-wise and
  batch-invariant, ``maskkv.generation.batch_invariant``); attention reads each request's
  pruned prompt from the pool and its tail (the computed tokens, or the stored response KV with
  the computed ones written into their slots) in one varlen ``ragged_attention`` call, or one
  call per request where the backend's varlen form does not round exactly like its dense form
  (``attention="auto"`` probes it once).

Only the head's rows that a sampler asked for are computed (``need``), as in the ``Denoiser``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import maskkv_kernels as mk

from ..generation.batch_invariant import plain_linears
from ..generation.engine import Denoiser, _chunked, _qkv_chunked, dense_attention
from ..generation.policies import CachePolicy
from ..methods import LayerProfile, Method
from .kv_memory import KVFootprint, KVPool
from .request import Request

__all__ = ["ModelRunner"]


@dataclass
class _FullPass:
    """A full pass in progress (one request): the hidden states between two layers."""

    x: torch.Tensor  # [1, L]
    need: torch.Tensor  # bool [1, R]
    h: torch.Tensor  # [1, L, d] input of layer ``layer``
    cos: torch.Tensor
    sin: torch.Tensor
    layer: int
    budgets: list[int] | None
    lse_from: int | None
    build_cache: bool
    keep_kv: bool
    helper: Denoiser  # the one-row Denoiser whose selection (``_prune``) runs here


class ModelRunner:
    """Runs the forward passes of the engine's requests on one model.

    Args:
        model: a ``LLaDAModelLM`` / ``DreamModelLM`` (any model of the layer protocol).
        method, policy, profile: the engine's eviction method, cache policy, layer profile.
        pool: the engine's ``KVPool``.
        backend: ``maskkv_kernels`` backend.
        token_chunk: tokens per chunk of QKV / attention queries / MLP in full passes.
        step1_lse: as ``Denoiser(step1_lse=...)``.
        attention: "varlen" (one call per layer for the whole batch), "per_request" (one dense
            call per request) or "auto" (varlen when it rounds exactly like the dense form on
            this backend, probed once).
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
        attention: str = "auto",
    ) -> None:
        if attention not in ("auto", "varlen", "per_request"):
            raise ValueError(
                f"attention: expected 'auto', 'varlen' or 'per_request', got {attention!r}"
            )
        self.model, self.method, self.policy, self.pool = model, method, policy, pool
        self.profile, self.token_chunk, self.step1_lse = profile, token_chunk, step1_lse
        self.backend = backend
        self.device = next(model.parameters()).device
        self._backend = mk.resolve_backend(backend, self.device)
        self.shift = 1 if getattr(model, "dllm_kind", "llada") == "dream" else 0
        self.num_layers = len(model.layers)
        self.num_kv_heads = pool.num_kv_heads
        self.head_dim = pool.head_dim
        if attention == "auto":
            attention = "varlen" if self._varlen_is_exact() else "per_request"
        self.attention = attention

    # -- footprints ---------------------------------------------------------------------------

    def footprint(self, prompt_len: int, gen_length: int) -> KVFootprint:
        """The pool rows a request of this shape holds (see ``kv_memory``)."""
        Pc = max(prompt_len - self.shift, 0)
        H = self.num_kv_heads
        if not self.method.caches_prompt:
            prompt_rows = (0,) * self.num_layers
        else:
            budgets = self.method.layer_budgets(self.num_layers, Pc, self.profile)
            prompt_rows = tuple(H * min(b, Pc) for b in budgets)
        tail = prompt_len + gen_length - Pc if self.policy.keeps_response_kv else 0
        if not self.method.caches_prompt:
            tail = 0
        return KVFootprint(prompt_rows, tail, H)

    # -- full passes --------------------------------------------------------------------------

    def begin_full_pass(self, req: Request) -> None:
        """Set up the pending full pass of ``req`` (its first layer runs in ``full_pass_step``)."""
        x, need = req.event.x, req.event.need
        model = self.model
        helper = Denoiser(
            model, self.method, req.prompt_len, profile=self.profile, backend=self.backend,
            token_chunk=self.token_chunk, step1_lse=self.step1_lse, cache=self.policy,
        )  # fmt: skip
        helper._setup(x)
        build = self.method.caches_prompt
        budgets = None
        if build and self.method.evicts:
            budgets = list(
                self.method.layer_budgets(self.num_layers, req.cached_prompt_len, self.profile)
            )
        lse_from = (
            helper._first_voter() if build and self.step1_lse and helper._mask_scored() else None
        )
        cos, sin = model.rotary(helper._positions)
        req.full_pass = _FullPass(
            x=x, need=need, h=model.embed(x), cos=cos, sin=sin, layer=0, budgets=budgets,
            lse_from=lse_from, build_cache=build,
            keep_kv=build and self.policy.keeps_response_kv, helper=helper,
        )  # fmt: skip

    @plain_linears()
    def full_pass_step(self, req: Request, max_layers: int) -> torch.Tensor | None:
        """Run up to ``max_layers`` layers of ``req``'s full pass; returns the logits of the
        pending ``need`` once the last layer ran, else None. Plain linear kernels, as
        ``Denoiser._full_pass`` (``maskkv.generation.batch_invariant``)."""
        fp: _FullPass = req.full_pass
        model, chunk = self.model, self.token_chunk
        Pc = req.cached_prompt_len
        op = "flash" if self.step1_lse == "flash" else "cudnn"
        stop = min(fp.layer + max_layers, self.num_layers)
        while fp.layer < stop:
            i = fp.layer
            layer = model.layers[i]
            q, k, v = _qkv_chunked(layer, fp.h, fp.cos, fp.sin, chunk)
            attn, lse = dense_attention(q, k, v, None, chunk, fp.lse_from, lse_op=op)
            if fp.build_cache:
                budget = None if fp.budgets is None else fp.budgets[i]
                self._store_prompt(req, i, q, k, v, budget, lse, fp.helper)
            if fp.keep_kv:
                self._tail_view(req, i).copy_(k[0, :, Pc:].transpose(0, 1))
                self._tail_view(req, i, values=True).copy_(v[0, :, Pc:].transpose(0, 1))
            del q, k, v
            h = layer.attn_output(fp.h, attn)
            del attn
            fp.h = _chunked(layer.mlp_block, h, chunk)
            fp.layer += 1
        if fp.layer < self.num_layers:
            return None
        rows, cols = fp.need.nonzero(as_tuple=True)
        logits = model.head(fp.h[rows, cols + req.prompt_len - self.shift][None])[0]
        req.full_pass = None
        return logits

    def _store_prompt(self, req, i, q, k, v, budget, lse, helper) -> None:
        """Layer ``i``'s pruned prompt KV into the request's pool rows."""
        Pc, H, D = req.cached_prompt_len, self.num_kv_heads, self.head_dim
        start = req.pool_range.start + req.footprint.prompt_offset(i)
        n = req.footprint.prompt_rows[i]
        pool = self.pool
        if budget is None or budget >= Pc:  # keep everything: one copy, from the projection
            pool.k[start : start + n].view(H, Pc, D).copy_(k[0, :, :Pc])
            pool.v[start : start + n].view(H, Pc, D).copy_(v[0, :, :Pc])
            pool.positions[start : start + n] = torch.arange(Pc, device=k.device).repeat(H)
            cu = torch.arange(H + 1, dtype=torch.int32, device=k.device) * Pc
            max_seqlen = Pc
        else:
            cache = helper._prune(q, k, v, budget, lse)
            if cache.k.shape[0] != n:
                raise RuntimeError(
                    f"layer {i}: the selection kept {cache.k.shape[0]} rows, {n} were reserved"
                )
            pool.k[start : start + n] = cache.k
            pool.v[start : start + n] = cache.v
            pool.positions[start : start + n] = cache.positions
            cu, max_seqlen = cache.cu_seqlens, cache.max_seqlen
        if len(req.cu_seqlens) <= i:
            req.cu_seqlens.append(cu)
            req.max_seqlen.append(max_seqlen)
        else:
            req.cu_seqlens[i], req.max_seqlen[i] = cu, max_seqlen

    # -- pool views ---------------------------------------------------------------------------

    def _tail_view(self, req: Request, i: int, values: bool = False) -> torch.Tensor:
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

    def _batch_cache(self, reqs: list[Request], i: int) -> mk.RaggedKV:
        """Layer ``i``'s pruned prompts of ``reqs``: one ``RaggedKV`` over the pool
        (``seg_starts``)."""
        H = self.num_kv_heads
        lengths, starts = [], []
        for r in reqs:
            cu = r.cu_seqlens[i].long()
            lengths.append(cu[1:] - cu[:-1])
            starts.append(cu[:-1] + (r.pool_range.start + r.footprint.prompt_offset(i)))
        lengths = torch.cat(lengths)
        cu = torch.zeros(len(reqs) * H + 1, dtype=torch.int32, device=self.device)
        cu[1:] = lengths.cumsum(0)
        pool = self.pool
        return mk.RaggedKV(
            pool.k, pool.v, cu, pool.positions, max(r.max_seqlen[i] for r in reqs), H,
            seg_starts=torch.cat(starts),
        )  # fmt: skip

    # -- tail passes --------------------------------------------------------------------------

    def tail_forward(self, reqs: list[Request]) -> list[torch.Tensor]:
        """One batched pass over every request's planned tail positions; per request the logits
        of its pending ``need`` (as ``Denoiser`` returns them)."""
        model, chunk = self.model, self.token_chunk
        ids, positions, spans = [], [], []
        offset = 0
        for r in reqs:
            Pc, lo = r.cached_prompt_len, r.plan.lo
            hi = r.tail_len if r.plan.hi is None else r.plan.hi
            ids.append(r.event.x[0, Pc + lo : Pc + hi])
            positions.append(torch.arange(Pc + lo, Pc + hi, device=self.device))
            spans.append((offset, lo, hi))
            offset += hi - lo
        ids = torch.cat(ids)[None]
        cos, sin = model.rotary(torch.cat(positions)[None])
        stored = self.policy.keeps_response_kv
        h = model.embed(ids)
        for i, layer in enumerate(model.layers):
            q, k, v = _qkv_chunked(layer, h, cos, sin, chunk)
            if stored:
                for r, (o, lo, hi) in zip(reqs, spans):
                    self._tail_view(r, i)[lo:hi] = k[0, :, o : o + hi - lo].transpose(0, 1)
                    self._tail_view(r, i, values=True)[lo:hi] = v[0, :, o : o + hi - lo].transpose(
                        0, 1
                    )
            if self.attention == "varlen":
                attn = self._attend_varlen(reqs, spans, i, q, k, v, stored)
            else:
                attn = self._attend_per_request(reqs, spans, i, q, k, v, stored)
            h = layer.attn_output(h, attn)
            h = _chunked(layer.mlp_block, h, chunk)
        rows, counts = [], []
        for r, (o, lo, _) in zip(reqs, spans):
            cols = r.event.need[0].nonzero()[:, 0]
            rows.append(cols + (o - lo))
            counts.append(cols.numel())
        logits = model.head(h[0, torch.cat(rows)][None])[0]
        return list(logits.split(counts))

    def _attend_per_request(self, reqs, spans, i, q, k, v, stored) -> torch.Tensor:
        """One dense ``ragged_attention`` per request, as the ``Denoiser`` calls it."""
        outs = []
        for r, (o, lo, hi) in zip(reqs, spans):
            n = hi - lo
            whole = lo == 0 and hi == r.tail_len
            if stored and not whole:  # [cached ‖ computed ‖ cached] from the pool
                k_tail = self._tail_view(r, i).permute(1, 0, 2)[None]
                v_tail = self._tail_view(r, i, values=True).permute(1, 0, 2)[None]
            else:  # the computed tokens are the whole tail
                k_tail, v_tail = k[:, :, o : o + n], v[:, :, o : o + n]
            outs.append(
                mk.ragged_attention(
                    q[:, :, o : o + n],
                    self._request_cache(r, i),
                    k_tail,
                    v_tail,
                    backend=self._backend,
                    check_inputs=False,
                )  # fmt: skip
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    def _attend_varlen(self, reqs, spans, i, q, k, v, stored) -> torch.Tensor:
        """Every request in one varlen ``ragged_attention`` call over the pool."""
        dev, H, D = self.device, self.num_kv_heads, self.head_dim
        lens = [hi - lo for _, lo, hi in spans]
        cu_q = torch.zeros(len(reqs) + 1, dtype=torch.int32)
        cu_q[1:] = torch.tensor(lens).cumsum(0)
        cu_q = cu_q.to(dev)
        q_rows = q[0].transpose(0, 1)  # [N, Hq, D]
        if stored:
            tails = [r.tail_len for r in reqs]
            cu_t = torch.zeros(len(reqs) + 1, dtype=torch.int32)
            cu_t[1:] = torch.tensor(tails).cumsum(0)
            starts = torch.tensor(
                [(r.pool_range.start + r.footprint.tail_offset(i)) // H for r in reqs],
                dtype=torch.int64,
            )
            k_tail = self.pool.k.view(-1, H, D)
            v_tail = self.pool.v.view(-1, H, D)
            extra = dict(
                cu_seqlens_tail=cu_t.to(dev), max_seqlen_tail=max(tails),
                tail_starts=starts.to(dev),
            )  # fmt: skip
        else:
            k_tail, v_tail = k[0].transpose(0, 1), v[0].transpose(0, 1)
            extra = dict(cu_seqlens_tail=cu_q, max_seqlen_tail=max(lens))
        out = mk.ragged_attention(
            q_rows, self._batch_cache(reqs, i), k_tail, v_tail, cu_seqlens_q=cu_q,
            max_seqlen_q=max(lens), backend=self._backend, check_inputs=False, **extra,
        )  # fmt: skip
        return out.transpose(0, 1)[None]

    # -- the probe ------------------------------------------------------------------------------

    def _varlen_is_exact(self) -> bool:
        """Whether this backend's varlen ``ragged_attention`` over pool views gives exactly the
        dense per-request calls' bits (then one call serves the batch). Probed on two small
        requests with ragged heads, the second cache placed before the first in the pool."""
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
        cu = torch.zeros(2 * H + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seg_lens[0] + seg_lens[1]).cumsum(0)
        cache = mk.RaggedKV(
            pool_k, pool_v, cu.to(dev), pos, max(max(x) for x in seg_lens), H,
            seg_starts=torch.cat(starts).to(dev),
        )  # fmt: skip
        cu_q = torch.tensor([0, lens_q[0], sum(lens_q)], dtype=torch.int32, device=dev)

        def packed(ts):
            return torch.cat([t[0].transpose(0, 1) for t in ts])

        out = mk.ragged_attention(
            packed(qs), cache, packed(ks), packed(vs), cu_seqlens_q=cu_q,
            max_seqlen_q=max(lens_q), cu_seqlens_tail=cu_q, backend=self._backend,
        )  # fmt: skip
        return torch.equal(out, packed(dense))
