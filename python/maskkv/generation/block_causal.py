"""Block-causal generation (LLaDA2.x): the sequence layout and the denoiser.

LLaDA2 attends block-causally: a token reads its own block and every earlier block, blocks being
``block_length`` positions from the first token. The prompt's last partial block shares its block
with the first masks. So the KV of every complete earlier block is exact once its tokens are
final, and caching them is exact:

- step 1 (the first generation block's first pass) runs [complete prompt blocks ‖ first block]
  layer by layer; right after a layer's attention its prompt KV (the complete prompt blocks) is
  kept whole (FullCache) or pruned by the method, from the votes of the first block's mask
  queries (MaskKV) or of the prompt's last W positions (the window methods), and the layer's full
  prompt KV is freed before the next layer;
- a later step runs the current block only; its queries read [pruned prompt ‖ committed blocks ‖
  current block] through one ``ragged_attention`` call, the committed blocks and the current
  block being its dense tail;
- when a block is final it is committed: one pass over its final tokens writes its exact KV
  behind the pruned prompt, where it stays (never evicted).

Batches: row b's blocks start at its first real token, so rows whose prompts differ in length
modulo ``block_length`` would have different block boundaries. ``BlockLayout`` left-pads every
row's complete prompt blocks by whole blocks and starts every row's generation region at the same
index: all rows then share one block grid (a padded row computes what it computes alone), at the
cost of up to one extra block for rows whose prompt tail is shorter than the longest.

Cache policies: NoCache recomputes the window [0, end of the current block) every step (the
official loop). With a caching method, ``DualCache()`` / ``PrefixCache()`` (the default for these
models; the two coincide, a block-causal step never reads later blocks) keep the committed blocks'
KV; ``refresh_prompt=True`` recomputes the window at each block start (re-selecting the prompt
from the new block's mask queries). ``PromptCache()`` keeps only the pruned prompt and recomputes
every committed block at every step. All three are exact for FullCache (FullCache == NoCache).
dLLM-Cache's partial recomputation is refused here: its feature reuse approximates a
bidirectional response, and the committed-block cache is exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import maskkv_kernels as mk

from ..methods import LayerProfile, Method
from ..models._common import block_causal_attention
from .engine import Denoiser, _chunked, _qkv_chunked
from .policies import CachePolicy, DLLMCache, DualCache, PromptCache

__all__ = ["BlockCausalDenoiser", "BlockLayout", "soft_block_attention"]


@dataclass
class BlockLayout:
    """The block-aligned sequence of a (left-padded) batch.

    Row b with ``p_b`` real prompt tokens has ``n_b = p_b // block_length`` complete prompt blocks
    and a prompt tail of ``r_b = p_b % block_length`` tokens. Its complete blocks end at index
    ``head`` (the longest ``n_b * block_length``), left-padded by whole blocks; its tail and then
    its masks start at ``head``. The generation region [head, head + blocks * block_length) holds
    ``blocks`` blocks for every row (the most any row needs).

    Attributes:
        block_length: positions per block.
        head: complete prompt blocks' length (the cached prompt region), a multiple of it.
        blocks: generation blocks.
        pad: int64 [B] (CPU) left padding of each row (whole blocks).
        prompt_tail: int64 [B] (CPU) r_b, prompt tokens inside the first generation block.
        prompt_lens: int64 [B] (CPU) p_b.
        gen_length: response tokens returned per row.
    """

    block_length: int
    head: int
    blocks: int
    pad: torch.Tensor
    prompt_tail: torch.Tensor
    prompt_lens: torch.Tensor
    gen_length: int

    @staticmethod
    def build(
        prompt: torch.Tensor,
        attention_mask: torch.Tensor | None,
        gen_length: int,
        block_length: int,
        mask_id: int,
    ) -> tuple[BlockLayout, torch.Tensor]:
        """(layout, x int64 [B, head + blocks * block_length]) for ``prompt`` [B, P] (left-padded
        when ``attention_mask`` [B, P] is given): prompt tokens in place, masks after them, the
        padding left of every row (token 0 there, never read)."""
        B, P = prompt.shape
        if attention_mask is None:
            lens = torch.full((B,), P, dtype=torch.long)
        else:
            lens = attention_mask.to("cpu", torch.long).sum(1)
        full_blocks = lens // block_length
        tail = lens % block_length
        head = int(full_blocks.max()) * block_length if B else 0
        blocks = int(((tail + gen_length + block_length - 1) // block_length).max()) if B else 0
        layout = BlockLayout(
            block_length, head, blocks, head - full_blocks * block_length, tail, lens, gen_length
        )
        x = torch.full((B, layout.length), mask_id, dtype=torch.long, device=prompt.device)
        for b in range(B):
            p = int(lens[b])
            start = layout.head - int(full_blocks[b]) * block_length
            x[b, :start] = 0
            x[b, start : start + p] = prompt[b, P - p :]
        return layout, x

    @property
    def length(self) -> int:
        return self.head + self.blocks * self.block_length

    @property
    def mask_start(self) -> int:
        """First index that is a mask in every row (MaskKV's voting queries start here)."""
        return self.head + int(self.prompt_tail.max()) if len(self.prompt_tail) else self.head

    def block(self, nb: int) -> tuple[int, int]:
        """Index range [lo, hi) of generation block ``nb``."""
        lo = self.head + nb * self.block_length
        return lo, lo + self.block_length

    def response_start(self, b: int) -> int:
        """Index of row b's first response token."""
        return self.head + int(self.prompt_tail[b])

    def positions(self, device: torch.device) -> torch.Tensor:
        """int64 [B, length]: RoPE positions counted from each row's first real token (0 on the
        padding, which nothing reads)."""
        idx = torch.arange(self.length, device=device)
        return (idx[None] - self.pad.to(device)[:, None]).clamp(min=0)

    def key_valid(self, device: torch.device) -> torch.Tensor | None:
        """bool [B, length] real tokens, or None without padding."""
        if not bool((self.pad > 0).any()):
            return None
        idx = torch.arange(self.length, device=device)
        return idx[None] >= self.pad.to(device)[:, None]

    def responses(self, x: torch.Tensor) -> torch.Tensor:
        """[B, gen_length]: each row's generated tokens from the internal sequence ``x``."""
        return torch.stack(
            [x[b, self.response_start(b) : self.response_start(b) + self.gen_length]
             for b in range(x.shape[0])]
        )  # fmt: skip


def soft_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_length: int,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LLaDA2.1 file's attention: its 0/1 block-causal pattern is added to the scores (so a
    position reads every position of the window, earlier blocks weighted e times more), padding
    keys excluded. Materialises the [L, L] mask: for NoCache exactness with that file only.

    q: [B, Hq, L, D]; k, v: [B, Hkv, L, D]; key_valid: bool [B, L] or None -> [B, Hq, L, D]."""
    hq, hkv, L = q.shape[1], k.shape[1], q.shape[2]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    blk = torch.arange(L, device=q.device) // block_length
    mask = (blk[None, :] <= blk[:, None]).to(q.dtype)[None, None]
    if key_valid is not None:
        mask = mask.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class BlockCausalDenoiser(Denoiser):
    """Logits of the current block, one call per denoising step, for a block-causal model.

    Args:
        model: a block-causal model (``LLaDA2MoeModelLM``: the layer protocol of ``_common``).
        method: a ``maskkv.methods.Method``.
        layout: the batch's ``BlockLayout``.
        profile, token_chunk, backend, cuda_graphs: as ``Denoiser``.
        cache: ``DualCache()`` (default), ``PrefixCache()`` (the same here) or ``PromptCache()``
            (see the module docstring); ignored by NoCache.
        soft_mask: NoCache only: attend as the LLaDA2.1 file does (``soft_block_attention``).
    """

    def __init__(
        self,
        model,
        method: Method,
        layout: BlockLayout,
        *,
        profile: LayerProfile | None = None,
        token_chunk: int = 4096,
        backend: str = "auto",
        cuda_graphs: bool = True,
        cache: CachePolicy | None = None,
        soft_mask: bool = False,
    ) -> None:
        cache = DualCache() if cache is None else cache
        if isinstance(cache, DLLMCache):
            raise ValueError(
                "cache: DLLMCache is not supported for block-causal models (its feature reuse "
                "approximates a bidirectional response); DualCache() is exact here"
            )
        if soft_mask and method.caches_prompt:
            raise ValueError(
                "block_mask: 'additive' (the LLaDA2.1 file's attention) reads later blocks, so "
                "no cache is exact with it; use method='nocache'"
            )
        super().__init__(
            model, method, layout.mask_start, None, profile=profile, token_chunk=token_chunk,
            backend=backend, cuda_graphs=cuda_graphs, step1_lse=False, cache=cache,
        )  # fmt: skip
        self.layout = layout
        self.Pc = layout.head  # the cached region: the complete prompt blocks
        self.soft_mask = soft_mask
        self._stored = method.caches_prompt and not isinstance(cache, PromptCache)
        self._refresh_next = False

    # -- setup ------------------------------------------------------------------------------------

    def _setup(self, x: torch.Tensor) -> None:
        lay = self.layout
        self._backend = mk.resolve_backend(self.backend, x.device)
        self._positions = lay.positions(x.device)
        self._key_valid = lay.key_valid(x.device)
        self._lens_cpu = lay.prompt_lens - lay.prompt_tail  # real tokens of the cached region

    def _rotary(self, lo: int, hi: int):
        return self.model.rotary(self._positions[:, lo:hi])

    # -- passes -----------------------------------------------------------------------------------

    def _window_pass(self, x: torch.Tensor, nb: int, build: bool) -> torch.Tensor:
        """[0, end of block nb) through every layer, block-causally; with ``build`` the prompt
        caches are (re)built (pruned by the method) and, with stored response KV, the committed
        blocks' KV written. Returns hidden states [B, block_length, d] of block nb."""
        model, Pc, chunk, lay = self.model, self.Pc, self.token_chunk, self.layout
        lo, hi = lay.block(nb)
        cos, sin = self._rotary(0, hi)
        h = model.embed(x[:, :hi])
        caches: list[mk.RaggedKV] = []
        budgets = None
        if build:
            # MaskKV's voters: the current block's mask queries (``_prune`` reads q[:, :, P:]):
            # at step 1 the first block's masks, at a refresh the new block (all masks).
            self.P = lay.mask_start if nb == 0 else lo
            self.stats.prompt_kv_bytes_full = 0
            if self.method.evicts:
                budgets = self.method.layer_budgets(len(model.layers), Pc, self.profile)
                self.stats.layer_budgets = list(budgets)
        valid = None if self._key_valid is None else self._key_valid[:, :hi]
        for i, layer in enumerate(model.layers):
            q, k, v = _qkv_chunked(layer, h, cos, sin, chunk)
            if self.soft_mask:
                attn = soft_block_attention(q, k, v, lay.block_length, valid)
            else:
                attn = block_causal_attention(q, k, v, lay.block_length, valid)
            if build:
                self.stats.prompt_kv_bytes_full += 2 * k[:, :, :Pc].numel() * k.element_size()
                caches.append(self._prune(q, k, v, None if budgets is None else budgets[i]))
                if self._stored:
                    self._tail_buffer(i, k)[:, :, : lo - Pc] = k[:, :, Pc:lo]
                    self._tail_buffer(i, v, values=True)[:, :, : lo - Pc] = v[:, :, Pc:lo]
            del q, k, v  # the layer's full KV dies before the next layer runs
            h = layer.attn_output(h, attn)
            del attn
            h = _chunked(layer.mlp_block, h, chunk)
        if build:
            self.caches = caches
            self._graphs.clear()  # captured steps read the old caches' addresses
            self.stats.kept_lengths = torch.stack([c.lengths().cpu() for c in caches])
            if self.stats.first_kept_positions is None and self.method.evicts:
                self.stats.first_kept_positions = [c.positions.cpu() for c in caches]
            self.stats.prompt_kv_bytes_kept = sum(c.k.nbytes + c.v.nbytes for c in caches)
        return h[:, lo:hi]

    def _tail_buffer(self, i: int, like: torch.Tensor, values: bool = False) -> torch.Tensor:
        """Layer i's committed-block K (or V) buffer [B, Hkv, blocks * block_length, D]."""
        if self.tail_k is None:
            n = len(self.model.layers)
            self.tail_k, self.tail_v = [None] * n, [None] * n
        store = self.tail_v if values else self.tail_k
        if store[i] is None:
            B, H, _, D = like.shape
            L = self.layout.blocks * self.layout.block_length
            store[i] = torch.zeros(B, H, L, D, dtype=like.dtype, device=like.device)
        return store[i]

    def _block_layers(self, ids: torch.Tensor, nb: int, cos, sin) -> torch.Tensor:
        """Block nb's tokens ``ids`` [B, block_length] through every layer against [prompt cache
        ‖ committed blocks ‖ themselves]; their K/V overwrite slot nb of the committed buffer.
        Returns logits [B, block_length, vocab]."""
        bl = self.layout.block_length
        lo, hi = nb * bl, (nb + 1) * bl
        h = self.model.embed(ids)
        for i, (layer, cache) in enumerate(zip(self.model.layers, self.caches)):
            q, k, v = layer.qkv(h, cos, sin)
            k_tail, v_tail = self._tail_buffer(i, k), self._tail_buffer(i, v, values=True)
            k_tail[:, :, lo:hi] = k
            v_tail[:, :, lo:hi] = v
            attn = mk.ragged_attention(
                q, cache, k_tail[:, :, :hi], v_tail[:, :, :hi], backend=self._backend,
                check_inputs=False,
            )  # fmt: skip
            h = layer.attn_output(h, attn)
            h = layer.mlp_block(h)
        return self.model.head(h)

    def _block_pass(self, x: torch.Tensor, nb: int) -> torch.Tensor:
        """Block nb against the stored caches (a later step, or a commit); on CUDA captured once
        per block as one CUDA graph and replayed."""
        lo, hi = self.layout.block(nb)
        ids = x[:, lo:hi]
        graph = self._graphs.get(nb)
        if graph is not None:
            graph["ids"].copy_(ids)
            graph["graph"].replay()
            return graph["logits"]
        cos, sin = self._rotary(lo, hi)
        safe = getattr(self.model, "supports_cuda_graphs", True)
        if not (self.cuda_graphs and x.is_cuda and safe):
            return self._block_layers(ids, nb, cos, sin)
        static_ids = ids.clone()
        stream = torch.cuda.Stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):  # warm-up outside the capture (Triton compiles here)
            self._block_layers(static_ids, nb, cos, sin)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            logits = self._block_layers(static_ids, nb, cos, sin)
        self._graphs[nb] = dict(graph=g, ids=static_ids, logits=logits, cos=cos, sin=sin)
        g.replay()
        return logits

    def _recompute_pass(self, x: torch.Tensor, nb: int) -> torch.Tensor:
        """PromptCache: generation blocks 0..nb recomputed against the prompt cache, block j's
        queries reading [prompt cache ‖ blocks 0..j]. Returns logits of block nb."""
        lay, model, chunk = self.layout, self.model, self.token_chunk
        bl, lo = lay.block_length, lay.head
        hi = lay.block(nb)[1]
        cos, sin = self._rotary(lo, hi)
        h = model.embed(x[:, lo:hi])
        for layer, cache in zip(model.layers, self.caches):
            q, k, v = _qkv_chunked(layer, h, cos, sin, chunk)
            attn = torch.cat(
                [
                    mk.ragged_attention(
                        q[:, :, j * bl : (j + 1) * bl],
                        cache,
                        k[:, :, : (j + 1) * bl],
                        v[:, :, : (j + 1) * bl],
                        backend=self._backend,
                        check_inputs=False,
                    )  # fmt: skip
                    for j in range(nb + 1)
                ],
                2,
            )
            h = layer.attn_output(h, attn)
            h = _chunked(layer.mlp_block, h, chunk)
        return model.head(h[:, nb * bl :])

    # -- the public calls -------------------------------------------------------------------------

    @torch.no_grad()
    def start_block(self, x: torch.Tensor, nb: int) -> None:
        """The sampler starts generation block ``nb`` of ``x``; blocks before it are final. With
        stored block KV, block nb - 1 is committed here (one pass over its final tokens), or
        the next step recomputes the window (``refresh_prompt``)."""
        self._block_step = 0
        if nb == 0 or self.caches is None or not self._stored:
            return
        if self.policy.refresh_prompt:
            self._refresh_next = True
            return
        self._timed(lambda: self._block_pass(x, nb - 1), "tail", True, x.device)

    @torch.no_grad()
    def block_logits(self, x: torch.Tensor, nb: int) -> torch.Tensor:
        """x: [B, layout.length] token ids; nb: the current block.
        Returns fp32 logits [B, block_length, vocab] of block nb."""
        if self._positions is None:
            self._setup(x)
        caching = self.method.caches_prompt
        if not caching or self.caches is None or self._refresh_next:
            # NoCache every step; a caching method at step 1 and at a prompt refresh.
            self._refresh_next = False
            logits = self._timed(
                lambda: self.model.head(self._window_pass(x, nb, build=caching)), "full", True,
                x.device,
            )  # fmt: skip
        elif self._stored:
            logits = self._timed(lambda: self._block_pass(x, nb), "tail", False, x.device)
        else:
            logits = self._timed(lambda: self._recompute_pass(x, nb), "tail", False, x.device)
        self._block_step += 1
        return logits.float()

    def _timed(self, run, kind: str, refresh: bool, device: torch.device) -> torch.Tensor:
        self._sync(device)
        t0 = time.perf_counter()
        out = run()
        self._sync(device)
        self.stats.step_times.append(time.perf_counter() - t0)
        self.stats.step_kinds.append(kind)
        self.stats.step_refresh.append(refresh)
        self.stats.response_kv_bytes = max(self.stats.response_kv_bytes, self._response_bytes())
        return out
