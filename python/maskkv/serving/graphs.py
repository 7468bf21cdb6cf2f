"""The engine's batched step as data (``StepBatch``), and its replay as CUDA graphs by bucket.

A batched step (``ModelRunner.tail_forward``) is one forward over the packed tokens of every
running request. Everything it needs besides the model and the KV pool is a handful of index
tensors: the tokens and their positions, the query offsets per request, per layer where each
request's pruned prompt sits in the pool (``seg_starts``) and where its stored response KV sits
(``tail_starts``) and goes (``dest``), and which rows' logits are wanted. ``StepBatch`` holds
them; ``ModelRunner.forward(batch)`` computes the step from them alone, so the very same code
runs a batch as it is or padded to a bucket.

``StepGraphs`` replays the step as one CUDA graph per bucket of shapes: the packed rows, the
number of requests and the logit rows round up to powers of two, and so do the host bounds the
kernels are launched with (longest query run, kept prompt segment, stored tail). Padding is inert:
padding requests own no query row, no key and no tail row; padding rows belong to no request
(``ragged_attention`` returns 0 for them), run through the row-wise layers on token 0 and write
their K/V to the pool's scratch token; padding logit rows read row 0 and are dropped. A graph
reads its inputs from static buffers, filled before each replay with one copy per tensor; nothing
inside it reads a value on the host. Bits: every op of the step is row-wise and batch-invariant
(``maskkv.generation.batch_invariant``), and the runner uses the varlen attention only where the
start-up probe found it exact, padded bounds included; ``tests/test_serving_graphs.py`` checks a
padded step against the unpadded one bit for bit (on the CPU without capture: ``mode="padded"``).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["StepBatch", "StepGraphs", "bucket"]

# Smallest bucket per shape: below these a graph saves nothing and more shapes cost captures.
_LEAST = {"rows": 16, "requests": 1, "logits": 16, "q": 1, "kv": 16, "tail": 16}


def bucket(n: int, least: int = 1) -> int:
    """The power of two >= max(n, least)."""
    n = max(n, least, 1)
    return 1 << (n - 1).bit_length()


@dataclass
class StepBatch:
    """One batched step: N packed rows of B requests over L layers (Hkv KV heads).

    ``ids`` lives on the model's device; every other tensor is built on the host and moved by
    ``to`` (the graph path copies it into static buffers instead). Request b owns rows
    ``cu_q[b]:cu_q[b+1]``; its layer-l prompt cache is segments ``b*Hkv .. b*Hkv+Hkv-1`` of
    ``cache_cu[l]`` starting at pool rows ``cache_starts[l]``; with stored response KV its tail is
    ``cu_t[b+1]-cu_t[b]`` tokens from pool token ``tail_starts[l, b]`` and row t's K/V go to pool
    token ``dest[l, t]``. ``max_*`` are host bounds (``max_kv`` per layer).
    """

    ids: torch.Tensor  # int64 [N], device
    positions: torch.Tensor  # int64 [N]
    cu_q: torch.Tensor  # int32 [B + 1]
    max_q: int
    cache_cu: torch.Tensor  # int32 [L, B * Hkv + 1]
    cache_starts: torch.Tensor  # int64 [L, B * Hkv]
    max_kv: list[int]
    logit_rows: torch.Tensor  # int64 [n]
    cu_t: torch.Tensor | None = None  # int32 [B + 1] (stored response KV only)
    tail_starts: torch.Tensor | None = None  # int64 [L, B]
    dest: torch.Tensor | None = None  # int64 [L, N]
    max_t: int = 0

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    @property
    def requests(self) -> int:
        return self.cu_q.shape[0] - 1

    @property
    def num_logits(self) -> int:
        return self.logit_rows.shape[0]

    def key(self) -> tuple[int, ...]:
        """The bucket: (rows, requests, logit rows, longest query run, kept segment, tail)."""
        return (
            bucket(self.rows, _LEAST["rows"]),
            bucket(self.requests, _LEAST["requests"]),
            bucket(self.num_logits, _LEAST["logits"]),
            bucket(self.max_q, _LEAST["q"]),
            bucket(max(self.max_kv), _LEAST["kv"]),
            bucket(self.max_t, _LEAST["tail"]) if self.cu_t is not None else 0,
        )

    def padded(self, key: tuple[int, ...], scratch_token: int) -> StepBatch:
        """This batch padded to bucket ``key`` (see the module docstring), on the host."""
        N, B = self.rows, self.requests
        Nb, Bb, nb, q, kv, t = key
        H = (self.cache_starts.shape[1] // B) if B else 0
        L = self.cache_cu.shape[0]

        def tail(values: torch.Tensor, size: int, fill) -> torch.Tensor:
            out = values.new_full((*values.shape[:-1], size), fill)
            out[..., : values.shape[-1]] = values
            return out

        ids = self.ids.new_zeros(Nb)
        ids[:N] = self.ids
        out = StepBatch(
            ids=ids,
            positions=tail(self.positions, Nb, 0),
            cu_q=tail(self.cu_q, Bb + 1, N),
            max_q=q,
            cache_cu=torch.cat([self.cache_cu, self.cache_cu[:, -1:].expand(L, (Bb - B) * H)], 1),
            cache_starts=tail(self.cache_starts, Bb * H, 0),
            max_kv=[kv] * L,
            logit_rows=tail(self.logit_rows, nb, 0),
            max_t=t,
        )
        if self.cu_t is not None:
            out.cu_t = tail(self.cu_t, Bb + 1, int(self.cu_t[-1]))
            out.tail_starts = tail(self.tail_starts, Bb, 0)
            out.dest = tail(self.dest, Nb, scratch_token)
        return out

    def to(self, device: torch.device) -> StepBatch:
        """Every tensor on ``device`` (host ints unchanged)."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def copy_into(self, static: StepBatch) -> None:
        """Fill ``static`` (the same bucket, on the device) with this batch's values."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                getattr(static, f.name).copy_(value, non_blocking=True)


class StepGraphs:
    """Batched steps by bucket: captured once per bucket as a CUDA graph and replayed
    (``mode="cuda"``), or, with ``mode="padded"``, run eagerly on the same padded static
    buffers (any device: what the graphs compute, without a capture).

    Args:
        forward: ``forward(batch) -> logits [batch.num_logits, V]`` on a device batch.
        scratch_token: the pool's scratch token (padding rows' K/V go there).
        device: the model's device.
        mode: "cuda" or "padded".
        max_graphs: buckets kept (least recently used dropped first).
    """

    def __init__(
        self,
        forward: Callable[[StepBatch], torch.Tensor],
        scratch_token: int,
        device: torch.device,
        mode: str = "cuda",
        max_graphs: int = 64,
    ) -> None:
        if mode not in ("cuda", "padded"):
            raise ValueError(f"mode: expected 'cuda' or 'padded', got {mode!r}")
        self.forward, self.scratch_token = forward, scratch_token
        self.device, self.mode, self.max_graphs = device, mode, max_graphs
        self._entries: OrderedDict[tuple[int, ...], dict] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if mode == "cuda" else None
        self.captures = 0  # graphs captured so far (benchmarks and tests read it)

    def __len__(self) -> int:
        return len(self._entries)

    def run(self, batch: StepBatch) -> torch.Tensor:
        """logits [batch.num_logits, V] of ``batch`` (host tensors, ``ids`` on the device): valid
        until the next ``run`` (a view of the bucket's static output)."""
        key = batch.key()
        padded = batch.padded(key, self.scratch_token)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._new_entry(key, padded)
        else:
            self._entries.move_to_end(key)
            padded.copy_into(entry["batch"])
            if entry["graph"] is not None:
                entry["graph"].replay()
            else:
                entry["logits"] = self.forward(entry["batch"])
        return entry["logits"][: batch.num_logits]

    def _new_entry(self, key: tuple[int, ...], padded: StepBatch) -> dict:
        static = padded.to(self.device)
        entry = dict(batch=static, graph=None)
        if self.mode == "padded":
            entry["logits"] = self.forward(static)
        else:
            # Warm up on a side stream (Triton compiles and autotunes, MoE stacks its experts)
            # outside the capture; it writes the same K/V the replay writes.
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.forward(static)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                entry["logits"] = self.forward(static)
            entry["graph"] = graph
            self.captures += 1
            graph.replay()
        self._entries[key] = entry
        while len(self._entries) > self.max_graphs:
            self._entries.popitem(last=False)
        return entry
