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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import maskkv_kernels as mk

from ..methods import LayerProfile, Method
from ..models._common import block_causal_attention
from .engine import Denoiser
from .passes import FullPass, KVSink, chunked, run_layers
from .policies import CachePolicy, DLLMCache, DualCache, PromptCache, StepPlan

__all__ = [
    "BlockCausalDenoiser",
    "BlockLayout",
    "BlockProgress",
    "WindowPass",
    "soft_block_attention",
]


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


@dataclass
class BlockProgress:
    """Where a block-causal generation stands between two forward passes, and what the next
    pass computes (``plan``). ``BlockCausalDenoiser`` keeps one for ``maskkv.generate``; every
    LLaDA2 request of the serving engine keeps its own, so both schedule the same passes.

    Args:
        block_length: positions per block.
        caching: the method caches the prompt (NoCache: a window pass every step).
        stored: the committed blocks' KV are kept (``DualCache`` / ``PrefixCache``).
        refresh_prompt: each block start recomputes the window (re-selecting the prompt).
    """

    block_length: int
    caching: bool
    stored: bool
    refresh_prompt: bool
    block: int = 0  # the current generation block
    built: bool = False  # the prompt cache exists
    refresh: bool = False  # the next pass recomputes the window
    commits: list[int] = field(default_factory=list)  # blocks whose final KV is still to write

    def begin_block(self, nb: int) -> None:
        """Block ``nb`` starts; blocks before it are final. With stored block KV, block nb - 1
        is committed by the next pass (one pass over its final tokens), or the window is
        recomputed (``refresh_prompt``)."""
        self.block = nb
        if nb == 0 or not self.built or not self.stored:
            return
        if self.refresh_prompt:
            self.refresh = True
        else:
            self.commits.append(nb - 1)

    def plan(self) -> StepPlan:
        """The next pass, in tail coordinates (the tail is everything after the complete prompt
        blocks): ``"full"`` the window [0, end of the current block) (building the prompt cache
        for a caching method); ``"commit"`` block [lo, hi)'s final tokens, to store their KV (no
        logits); ``"tail"`` positions [lo, hi) against the pruned prompt (stored: the current
        block over the committed ones; PromptCache: every generation block up to the current
        one, block j reading blocks 0..j)."""
        bl = self.block_length
        if not self.caching or not self.built or self.refresh:
            return StepPlan("full", refresh=True)
        if self.commits:
            c = self.commits[0]
            return StepPlan("commit", c * bl, (c + 1) * bl, refresh=True)
        nb = self.block
        return StepPlan("tail", nb * bl if self.stored else 0, (nb + 1) * bl)

    def ran(self, plan: StepPlan) -> None:
        """``plan``'s pass ran."""
        if plan.kind == "full":
            self.built, self.refresh = self.caching, False
        elif plan.kind == "commit":
            self.commits.pop(0)


class WindowPass(FullPass):
    """A block-causal model's full pass: [0, end of block ``nb``) through every layer (block-causal
    attention, or the LLaDA2.1 file's additive mask with ``soft_mask``), the prompt cache built
    (pruned by the method) and, with stored block KV, the committed blocks' KV [head, block nb's
    start) handed to the sink. ``hidden`` covers positions [0, end of block nb)."""

    def __init__(self, denoiser: BlockCausalDenoiser, x, nb: int, *, build_cache: bool, sink):
        lay = denoiser.layout
        lo, hi = lay.block(nb)
        if build_cache:
            # MaskKV's voters: the current block's mask queries (``select_prompt`` reads
            # q[:, :, P:]): at step 1 the first block's masks, at a refresh the new block.
            denoiser.P = lay.mask_start if nb == 0 else lo
        super().__init__(denoiser, x[:, :hi], build_cache=build_cache, sink=sink, tail_end=lo)
        valid = denoiser._key_valid
        self.valid = None if valid is None else valid[:, :hi]

    def _attend(self, layer, q, k, v):
        den = self.den
        if den.soft_mask:
            attn = soft_block_attention(q, k, v, den.layout.block_length, self.valid)
        else:
            attn = block_causal_attention(q, k, v, den.layout.block_length, self.valid)
        self.hidden = layer.attn_output(self.hidden, attn)
        return None

    def _mlp(self, layer) -> None:
        self.hidden = chunked(layer.mlp_block, self.hidden, self.den.token_chunk)


class BlockCausalDenoiser(Denoiser):
    """Logits of the current block, one call per denoising step, for a block-causal model.

    The sampler (``llada2_steps``) speaks the ``Denoiser`` protocol in tail coordinates (the
    tail is ``x[:, layout.head:]``): ``begin_block(lo, hi)`` at each block start, then
    ``denoiser(x, need)`` -> logits of the block positions ``need`` (bool [B, T]). What each
    call runs is ``BlockProgress.plan``'s.

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
        self.progress = BlockProgress(
            layout.block_length,
            caching=method.caches_prompt,
            stored=method.caches_prompt and not isinstance(cache, PromptCache),
            refresh_prompt=getattr(cache, "refresh_prompt", False),
        )
        self._block = (0, layout.block_length)

    # -- setup ------------------------------------------------------------------------------------

    def _setup(self, x: torch.Tensor) -> None:
        lay = self.layout
        self._backend = mk.resolve_backend(self.backend, x.device)
        self._positions = lay.positions(x.device)
        self._key_valid = lay.key_valid(x.device)
        self._lens_cpu = lay.prompt_lens - lay.prompt_tail  # real tokens of the cached region

    def _rotary(self, lo: int, hi: int):
        return self.model.rotary(self._positions[:, lo:hi])

    def head_logits(self, h: torch.Tensor, need: torch.Tensor, offset: int) -> torch.Tensor:
        """Logits [n, vocab] of tail positions ``need`` (bool [B, T], tail coordinates),
        row-major, from hidden states ``h`` whose first column is absolute position ``offset``."""
        rows, cols = need.nonzero(as_tuple=True)
        return self.model.head(h[rows, cols + (self.Pc - offset)][None])[0]

    # -- passes -----------------------------------------------------------------------------------

    def start_window_pass(self, x: torch.Tensor, nb: int, sink: KVSink | None = None) -> WindowPass:
        """The window pass of block ``nb`` over ``x`` [B, layout.length], not yet run: a caching
        method builds its prompt cache (and, with stored block KV, the committed blocks' KV)
        into ``sink`` (default: this denoiser's own). Its ``hidden`` feeds
        ``head_logits(pass.hidden, need, 0)``."""
        build, sink = self._pass_sink(x, sink)
        return WindowPass(self, x, nb, build_cache=build, sink=sink)

    def _store_tail(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        self._tail_buffer(i, k)[:, :, :n] = k
        self._tail_buffer(i, v, values=True)[:, :, :n] = v

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

        def attend(i, q, k, v):
            k_tail, v_tail = self._tail_buffer(i, k), self._tail_buffer(i, v, values=True)
            k_tail[:, :, lo:hi] = k
            v_tail[:, :, lo:hi] = v
            return mk.ragged_attention(
                q, self.caches[i], k_tail[:, :, :hi], v_tail[:, :, :hi], backend=self._backend,
                check_inputs=False,
            )  # fmt: skip

        h = run_layers(self.model, self.model.embed(ids), cos, sin, attend, self.token_chunk)
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
        lay = self.layout
        bl, lo = lay.block_length, lay.head
        hi = lay.block(nb)[1]
        cos, sin = self._rotary(lo, hi)

        def attend(i, q, k, v):
            return recompute_attention(q, self.caches[i], k, v, bl, self._backend)

        h = run_layers(self.model, self.model.embed(x[:, lo:hi]), cos, sin, attend,
                       self.token_chunk)  # fmt: skip
        return self.model.head(h[:, nb * bl :])

    # -- the public calls -------------------------------------------------------------------------

    def begin_block(self, lo: int, hi: int) -> None:
        """The sampler starts the block at tail positions [lo, hi); blocks before it are final."""
        self._block = (lo, hi)
        self._block_step = 0
        self.progress.begin_block(lo // self.layout.block_length)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        """x: [B, layout.length]; need: bool [B, T] positions of the current block (tail
        coordinates). Returns fp32 logits [n, vocab] of ``need``, row-major. Commits a finished
        block first where one is pending."""
        if self._positions is None:
            self._setup(x)
        self._commit(x)
        plan = self.progress.plan()
        nb = self.progress.block
        if plan.kind == "full":
            run = lambda: self.head_logits(self._window_hidden(x, nb), need, 0)  # noqa: E731
        else:
            lo, hi = self._block
            pass_ = self._block_pass if self.progress.stored else self._recompute_pass
            run = lambda: pass_(x, nb)[need[:, lo:hi]]  # noqa: E731
        logits = self._timed(run, "full" if plan.kind == "full" else "tail", plan.kind == "full",
                             x.device)  # fmt: skip
        self.progress.ran(plan)
        self._block_step += 1
        return logits.float()

    def _window_hidden(self, x: torch.Tensor, nb: int) -> torch.Tensor:
        full = self.start_window_pass(x, nb)
        full.run()
        return full.hidden

    def _commit(self, x: torch.Tensor) -> None:
        """Run the pending commit passes (final blocks' KV into the committed buffer)."""
        while (plan := self.progress.plan()).kind == "commit":
            nb = plan.lo // self.layout.block_length
            self._timed(lambda nb=nb: self._block_pass(x, nb), "tail", True, x.device)
            self.progress.ran(plan)

    @torch.no_grad()
    def start_block(self, x: torch.Tensor, nb: int) -> None:
        """``begin_block`` for block ``nb`` of ``x``, committing block nb - 1 at once (benchmarks
        and tests drive the denoiser with it and ``block_logits``)."""
        bl = self.layout.block_length
        self.begin_block(nb * bl, (nb + 1) * bl)
        if self._positions is None:
            self._setup(x)
        self._commit(x)

    def block_logits(self, x: torch.Tensor, nb: int) -> torch.Tensor:
        """x: [B, layout.length]; nb: the current block (as set by ``start_block``; block 0 when
        never set). Returns fp32 logits [B, block_length, vocab] of block nb."""
        bl = self.layout.block_length
        need = torch.zeros(x.shape[0], x.shape[1] - self.Pc, dtype=torch.bool, device=x.device)
        need[:, nb * bl : (nb + 1) * bl] = True
        return self(x, need).view(x.shape[0], bl, -1)

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


def recompute_attention(q, cache, k, v, block_length: int, backend: str) -> torch.Tensor:
    """PromptCache's attention of generation blocks 0..nb computed together: q [B, Hq, n * bl, D],
    k, v [B, Hkv, n * bl, D]; block j's queries read [cache ‖ blocks 0..j] (one
    ``ragged_attention`` per block). Returns [B, Hq, n * bl, D]."""
    bl = block_length
    return torch.cat(
        [
            mk.ragged_attention(
                q[:, :, j * bl : (j + 1) * bl],
                cache,
                k[:, :, : (j + 1) * bl],
                v[:, :, : (j + 1) * bl],
                backend=backend,
                check_inputs=False,
            )  # fmt: skip
            for j in range(q.shape[2] // bl)
        ],
        2,
    )
