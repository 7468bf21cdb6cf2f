"""The forward passes that ``maskkv.generate`` and the serving engine share, written once.

- ``FullPass``: every token of [prompt ‖ response] through every layer, *resumable between
  layers*. ``Denoiser`` runs it to the end in one call (step 1, a NoCache step, a refresh);
  the serving engine runs a few layers of it per iteration, so that a 32k prompt never stalls
  the running requests. Right after each layer's attention the layer's prompt cache (kept whole,
  or pruned by the eviction method) and the response KV go to a ``KVSink``: the ``Denoiser``
  keeps them as tensors of its own, the engine writes them into its KV pool. Both run the very
  same kernels in the same order, so a request's bits are the same in both.
- ``run_layers``: the layer stack of a later step (embedded tokens through every layer with
  the caller's attention), eager or with the fused bodies of ``maskkv.models.fused``.
- the attention of full passes (``attend_chunks``: query chunks with the residual added in place,
  the mask rows' LSE from the fused forward) and the token-chunk helpers (QKV and MLP in chunks
  for long prompts), and ``FirstPassMemo`` (step 1 recorded once, replayed by later generations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batch_invariant import plain_linears

__all__ = [
    "FirstPassMemo",
    "FullPass",
    "KVSink",
    "attend_chunks",
    "chunked",
    "chunked_inplace",
    "dense_attention",
    "position_ids_from_mask",
    "qkv_chunked",
    "run_layers",
]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions for left-padded rows: cumsum(mask) - 1, clamped at 0 on the padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


# Fused attention forwards that also return the fp32 natural-log LSE, by name. On an H200
# (torch 2.11, LLaDA-8B step 1 at 32k, benchmarks/results/NVIDIA-H200) the flash one made step 1
# slower than SDPA's own choice plus select_and_gather's LSE pass (2.80 vs 2.09 s): only a
# forward as fast as SDPA's pick is worth taking the LSE from.
_LSE_OPS = {
    "cudnn": lambda q, k, v: torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False
    )[:2],
    "flash": lambda q, k, v: torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, False, False
    )[:2],
}
_lse_probes: dict[tuple, bool] = {}


def _lse_op_usable(name: str, q: torch.Tensor, key_valid: torch.Tensor | None) -> bool:
    """Whether fused forward ``name`` applies here (CUDA, fp16/bf16, head dim <= 128, no key mask:
    these kernels take none, padded batches fall back) and, probed once per (op, device, dtype,
    head dim) on a small call, returns the true natural-log LSE and output in this torch build."""
    if not (
        q.is_cuda
        and key_valid is None
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 128
    ):
        return False
    key = (name, q.device, q.dtype, q.shape[-1])
    if key not in _lse_probes:
        gen = torch.Generator(q.device).manual_seed(0)
        pq, pk, pv = (
            torch.randn(1, 2, 96, q.shape[-1], device=q.device, dtype=q.dtype, generator=gen)
            for _ in range(3)
        )
        try:
            out, lse = _LSE_OPS[name](pq, pk, pv)
            logits = pq.float() @ pk.float().transpose(-1, -2) * q.shape[-1] ** -0.5
            ok = torch.allclose(
                lse.float().reshape(1, 2, 96), torch.logsumexp(logits, -1), atol=2e-3, rtol=0
            ) and torch.allclose(
                out.float(), torch.softmax(logits, -1) @ pv.float(), atol=2e-2, rtol=0
            )
        except (RuntimeError, AttributeError, TypeError):  # op missing or refused
            ok = False
        _lse_probes[key] = bool(ok)
    return _lse_probes[key]


def attend_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    query_chunk: int,
    consume,
    lse_from: int | None = None,
    lse_op: str = "cudnn",
) -> torch.Tensor | None:
    """Bidirectional attention in query chunks, each chunk's output handed to ``consume``.

    q: [B, Hq, T, D], k, v: [B, Hkv, L, D], key_valid: bool [B, L] or None.
    ``consume(s, out)`` receives out [B, Hq, n, D] of query rows [s, s + n) and must not keep
    it: a full pass adds each chunk into the residual stream at once, so no [B, Hq, T, D]
    attention output is ever held, and no [Hq, T, L] score matrix either (SDPA's math fallback
    on CPU would materialise it).

    Returns lse: with ``lse_from`` set and the fused forward ``lse_op`` ("cudnn" or "flash")
    usable (``_lse_op_usable``), the fp32 natural-log log-sum-exp [B, Hq, T - lse_from] of query
    rows ``lse_from:`` that the forward computes anyway (``select_and_gather`` then skips its own
    pass over K); otherwise None.
    """
    G = q.shape[1] // k.shape[1]
    if G > 1:  # expand once per layer; `enable_gqa` is missing from older torch releases
        k = k.repeat_interleave(G, 1)
        v = v.repeat_interleave(G, 1)
    T = q.shape[2]
    fused = lse_from is not None and _lse_op_usable(lse_op, q, key_valid)
    lses: list[torch.Tensor] | None = [] if fused else None
    mask = None if key_valid is None else key_valid[:, None, None, :]
    for s in range(0, T, query_chunk):
        q_chunk = q[:, :, s : s + query_chunk]
        out = None
        if lses is not None:
            try:
                out, lse = _LSE_OPS[lse_op](q_chunk, k, v)
                if s + query_chunk > lse_from:
                    lses.append(lse.reshape(q_chunk.shape[:3])[:, :, max(lse_from - s, 0) :])
            except RuntimeError:  # a shape this build's fused kernel refuses: SDPA from here on
                lses = None
        if out is None:
            out = F.scaled_dot_product_attention(q_chunk, k, v, attn_mask=mask)
        consume(s, out)
        del out
    if not lses:
        return None
    return (lses[0] if len(lses) == 1 else torch.cat(lses, 2)).float().contiguous()


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    query_chunk: int,
    lse_from: int | None = None,
    lse_op: str = "cudnn",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``attend_chunks`` with the outputs gathered: returns (out [B, Hq, T, D], lse or None)."""
    out = q.new_empty(q.shape)

    def keep(s: int, chunk: torch.Tensor) -> None:
        out[:, :, s : s + chunk.shape[2]] = chunk

    return out, attend_chunks(q, k, v, key_valid, query_chunk, keep, lse_from, lse_op)


def chunked(fn, h: torch.Tensor, chunk: int) -> torch.Tensor:
    """Apply a token-wise block (MLP) in token chunks: bounds the [T, ffn] activations."""
    if h.shape[1] <= chunk:
        return fn(h)
    return torch.cat([fn(h[:, s : s + chunk]) for s in range(0, h.shape[1], chunk)], 1)


def chunked_inplace(fn, h: torch.Tensor, chunk: int) -> None:
    """h[:, s:e] = fn(h[:, s:e]) chunk by chunk for a token-wise block: no second [B, T, d]."""
    for s in range(0, h.shape[1], chunk):
        h[:, s : s + chunk] = fn(h[:, s : s + chunk])


def qkv_chunked(layer, h, cos, sin, chunk):
    """The layer's q, k, v of every token, projected chunk by chunk into one buffer each
    (contiguous [B, H, T, D]): no second copy of q, k, v while they are assembled."""
    T = h.shape[1]
    if T <= chunk:
        return layer.qkv(h, cos, sin)
    bufs = None
    for s in range(0, T, chunk):
        parts = layer.qkv(h[:, s : s + chunk], cos[:, s : s + chunk], sin[:, s : s + chunk])
        if bufs is None:
            bufs = tuple(p.new_empty(*p.shape[:2], T, p.shape[3]) for p in parts)
        for buf, part in zip(bufs, parts):
            buf[:, :, s : s + part.shape[2]] = part
        del parts
    return bufs


class FirstPassMemo:
    """Step 1's full pass, computed once and replayed by later generations of the same batch.

    Every method's first step runs the same forward over [prompt ‖ masks]: the methods differ
    only in which prompt KV each layer keeps afterwards (``Denoiser._prune``), and the next
    layer's input never depends on that choice. An evaluation of many methods and budgets on
    one batch (``maskkv eval``) hands one memo to each ``generate`` call: the first records
    each layer's q, k, v (and mask-row LSE) and the final hidden states, the others replay them
    and only run their own selection. Replay is exact: the recorded tensors are the ones a fresh
    pass would compute (same inputs, same kernels).

    A pass is replayed only for the same model, token ids and attention mask (compared element
    by element) and when it would run the same attention kernel (the fused LSE forward a mask-
    scored method may ask for on CUDA rounds differently from SDPA); anything else recomputes
    and records anew. Not for big models: it holds every layer's q, k, v of the batch
    (``nbytes``).
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._lse_from: int | None = None
        self.layers: list[tuple[torch.Tensor, ...]] = []  # per layer (q, k, v, lse or None)
        self.hidden: torch.Tensor | None = None  # [B, L, d] after the last layer
        self.replays = 0  # passes served from the record

    def matches(self, model, x, attention_mask) -> bool:
        """Whether the record is of this model's pass over ``x`` with ``attention_mask``."""
        if self._key is None:
            return False
        k_model, k_x, k_mask = self._key
        if (k_mask is None) != (attention_mask is None):
            return False
        same_mask = k_mask is None or torch.equal(k_mask, attention_mask)
        return k_model is model and same_mask and torch.equal(k_x, x)

    @property
    def fused_lse_from(self) -> int | None:
        """The recorded attention's ``lse_from`` when it ran the fused LSE forward, else None."""
        return self._lse_from if self.layers and self.layers[0][3] is not None else None

    def record(self, model, x, attention_mask, lse_from, layers, hidden) -> None:
        mask = None if attention_mask is None else attention_mask.clone()
        self._key = (model, x.clone(), mask)
        self._lse_from = lse_from
        self.layers, self.hidden = layers, hidden

    @property
    def nbytes(self) -> int:
        held = [t for layer in self.layers for t in layer if t is not None]
        return sum(t.nbytes for t in held + ([self.hidden] if self.hidden is not None else []))


def run_layers(model, h, cos, sin, attend, token_chunk: int, fused=None) -> torch.Tensor:
    """A later step's layer stack: h [B, T, d] (the embedded tokens), cos / sin their RoPE
    tables, through every layer; ``attend(i, q, k, v)`` -> [B, Hq, T, D] is layer i's attention
    (the caller's cache reads). ``fused``: a ``maskkv.models.fused.FusedLayers`` (elementwise
    work fused), else the model's layer protocol. Returns the hidden states [B, T, d]."""
    if fused is not None:
        return fused(h, cos, sin, attend)
    for i, layer in enumerate(model.layers):
        q, k, v = qkv_chunked(layer, h, cos, sin, token_chunk)
        attn = attend(i, q, k, v)
        h = layer.attn_output(h, attn)
        h = chunked(layer.mlp_block, h, token_chunk)
    return h


class KVSink:
    """Where a ``FullPass`` leaves each layer's cache, right after the layer's attention (the
    layer's full K/V die before the next layer runs). The ``Denoiser`` keeps them as tensors of
    its own; the serving engine writes them into its KV pool (``maskkv.serving.runner``)."""

    def prompt(self, i: int, q, k, v, budget: int | None, lse) -> None:
        """Layer i's prompt cache from q [B, Hq, L, D], k, v [B, Hkv, L, D] (after RoPE): the
        first ``Pc`` positions kept whole (``budget`` None or >= Pc) or selected by the method
        (``Denoiser.select_prompt(q, k, v, budget, lse)``); lse: the mask rows' LSE or None."""
        raise NotImplementedError

    def tail(self, i: int, k, v) -> None:
        """Layer i's response K/V [B, Hkv, T, D]: views into the layer's K/V (copy what is kept)."""
        raise NotImplementedError

    def features(self, i: int, attn_out, mlp_out) -> None:
        """dLLM-Cache: layer i's attention and MLP block outputs of the tail [B, T, d]."""
        raise NotImplementedError

    def finish(self) -> None:
        """After the last layer."""


class FullPass:
    """Every token of ``x`` through every layer of ``denoiser.model``, resumable between layers.

    Built by ``Denoiser.start_full_pass``; ``run(max_layers)`` runs up to ``max_layers`` more
    layers (all when None) and returns True once the last one ran, after which ``hidden``
    [B, L, d] holds the final hidden states. With ``build_cache`` each layer's prompt KV (and,
    when the policy keeps them, the tail's KV up to ``tail_end`` and dLLM-Cache's features) go to
    ``sink``. Linear layers run the plain kernels (``plain_linears``): a full pass runs one request
    alone in the serving engine too, so its rows have the same neighbours everywhere.

    The attention is bidirectional over the whole sequence (padding keys excluded), in query
    chunks with each chunk's output added into the residual stream at once, and, for MaskKV,
    returns the mask rows' LSE (``attend_chunks``). ``BlockCausalDenoiser``'s pass overrides
    ``_attend`` and ``_mlp`` (block-causal attention).
    """

    def __init__(
        self, denoiser, x: torch.Tensor, *, build_cache: bool, sink: KVSink | None,
        tail_end: int | None = None,
    ) -> None:  # fmt: skip
        den, model = denoiser, denoiser.model
        self.den, self.x, self.sink = den, x, sink
        self.build_cache = build_cache
        self.tail_end = tail_end
        if build_cache and sink is None:
            raise ValueError("sink: a pass that builds the cache needs a KVSink")
        self.keep_kv = build_cache and den.policy.keeps_response_kv
        self.keep_feat = build_cache and den.policy.keeps_response_features
        self.cos, self.sin = model.rotary(den._positions[:, : x.shape[1]])
        self.hidden = model.embed(x)
        self.budgets = None
        if build_cache:
            den.stats.prompt_kv_bytes_full = 0
            if den.method.evicts:
                self.budgets = den.method.layer_budgets(len(model.layers), den.Pc, den.profile)
                den.stats.layer_budgets = list(self.budgets)
        # MaskKV scores with the mask rows' LSE, which the step-1 attention returns for free.
        mask_lse = build_cache and den.step1_lse and den._mask_scored()
        self.lse_from = den._first_voter() if mask_lse else None
        # A memo serves step 1 only, and not a policy that keeps the tail's block outputs (they
        # are not recorded).
        memo = den.first_pass if not den.stats.step_times and not self.keep_feat else None
        self.memo = memo
        self.replay = memo is not None and den._can_replay(memo, x, self.lse_from)
        self.recorded = [] if memo is not None and not self.replay else None
        self.layer = 0  # the next layer to run
        self.done = False

    def run(self, max_layers: int | None = None) -> bool:
        """Run up to ``max_layers`` more layers (all when None); True once the pass is done."""
        n = len(self.den.model.layers)
        stop = n if max_layers is None else min(n, self.layer + max_layers)
        with plain_linears():
            while self.layer < stop:
                self._run_layer(self.layer)
                self.layer += 1
        if self.layer == n and not self.done:
            self._finish()
        return self.done

    def _run_layer(self, i: int) -> None:
        den, Pc, chunk = self.den, self.den.Pc, self.den.token_chunk
        layer = den.model.layers[i]
        if self.replay:
            q, k, v, lse = self.memo.layers[i]
        else:
            q, k, v = qkv_chunked(layer, self.hidden, self.cos, self.sin, chunk)
            if self.keep_feat:
                h_in = self.hidden[:, Pc:].clone()
            lse = self._attend(layer, q, k, v)
            if self.recorded is not None:
                self.recorded.append((q, k, v, lse))
        if self.build_cache:
            den.stats.prompt_kv_bytes_full += 2 * k[:, :, :Pc].numel() * k.element_size()
            budget = None if self.budgets is None else self.budgets[i]
            self.sink.prompt(i, q, k, v, budget, lse)
        if self.keep_kv:
            self.sink.tail(i, k[:, :, Pc : self.tail_end], v[:, :, Pc : self.tail_end])
        del q, k, v  # the layer's full KV dies here, before the next layer (without a memo)
        if self.replay:
            return
        if self.keep_feat:
            h_attn = self.hidden[:, Pc:].clone()
        self._mlp(layer)
        if self.keep_feat:
            self.sink.features(i, h_attn - h_in, self.hidden[:, Pc:] - h_attn)

    def _attend(self, layer, q, k, v) -> torch.Tensor | None:
        """Layer attention with its output added into ``hidden``; returns the LSE or None."""
        h = self.hidden

        def add_attention(s, out):  # residual add, in place, per query chunk
            h[:, s : s + out.shape[2]] = layer.attn_output(h[:, s : s + out.shape[2]], out)

        den = self.den
        return attend_chunks(
            q, k, v, den._key_valid, den.token_chunk, add_attention, self.lse_from,
            lse_op="flash" if den.step1_lse == "flash" else "cudnn",
        )  # fmt: skip

    def _mlp(self, layer) -> None:
        chunked_inplace(layer.mlp_block, self.hidden, self.den.token_chunk)

    def _finish(self) -> None:
        den, memo = self.den, self.memo
        if self.replay:
            self.hidden = memo.hidden
            memo.replays += 1
        elif self.recorded is not None:
            memo.record(den.model, self.x, den.attention_mask, self.lse_from, self.recorded,
                        self.hidden)  # fmt: skip
        if self.build_cache:
            self.sink.finish()
        self.done = True
