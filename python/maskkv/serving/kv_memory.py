"""KV memory: one preallocated pool of key/value rows, a range per request, exact accounting.

Because the engine's method, budget and cache policy are fixed, a request's KV footprint is
known the moment it arrives: layer l keeps ``Hkv * min(k_l, Pc)`` prompt rows (``k_l`` the
method's layer budget for this prompt length, ``Pc`` the cached prompt positions; FullCache
keeps ``Hkv * Pc``, NoCache nothing), and a policy that stores the response KV
(Prefix/DualCache) adds ``T * Hkv`` rows per layer (``T`` the tail: the response, plus Dream's
last prompt position). The engine reserves exactly that many rows, as one contiguous range of
the pool, before the request's prompt pass starts, and returns them the moment it finishes, is
cancelled or fails. "KV bytes in use" is the sum of the reserved ranges, to the byte.

Pool layout (rows of ``D`` values; keys and values in two tensors of the same shape, plus an
int32 position per row):

    request range = [layer 0 tail | ... | layer n-1 tail | layer 0 prompt | ... | layer n-1 prompt]

- a layer's prompt rows are the pruned cache of that layer in ``RaggedKV`` order (segment
  ``g`` = KV head ``g``, ascending positions): a slice of the pool *is* the request's
  ``RaggedKV`` (no copy), and all requests' caches of a layer are one ``RaggedKV`` over the whole
  pool with ``seg_starts`` (``maskkv_kernels``' pool views);
- a layer's tail rows are token-major, ``[T, Hkv, D]``, so that the whole pool read as
  ``[rows / Hkv, Hkv, D]`` is the packed-tail tensor of the varlen ``ragged_attention``, each
  request's tail starting at ``tail_starts[b]``.

FullCache costs no copy a serious engine would avoid: the prompt keys/values of a layer are
written once from the layer's projection into the request's rows (no intermediate gather).
Every range starts at a multiple of ``Hkv`` rows (all sizes above are multiples of it).

The pool is one ``torch.empty`` of the budget (on the CPU the operating system commits pages
only when they are written; on CUDA the memory is taken at once, as vLLM does), plus one scratch
token (``Hkv`` rows past the capacity, never allocated) where a padded batched step (CUDA-graph
buckets) writes the K/V of its padding rows. When the free rows are enough but split, the
allocator compacts the live ranges (a device copy, rare).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["KVFootprint", "KVPool", "PoolRange", "RequestTooLarge", "default_kv_budget"]


class RequestTooLarge(ValueError):
    """A request whose KV footprint exceeds the engine's whole KV budget: it can never run."""


@dataclass(frozen=True)
class KVFootprint:
    """The pool rows one request holds: its pruned prompt per layer and its stored response
    (every count a multiple of ``Hkv``: one row per kept token and KV head)."""

    prompt_rows: tuple[int, ...]  # per layer: Hkv * kept prompt tokens per head
    tail_len: int  # T stored response positions per layer (0: the policy stores none)
    num_kv_heads: int

    @property
    def tail_rows(self) -> int:
        return self.tail_len * self.num_kv_heads

    @property
    def rows(self) -> int:
        return sum(self.prompt_rows) + len(self.prompt_rows) * self.tail_rows

    def prompt_offset(self, layer: int) -> int:
        """First row of layer ``layer``'s prompt cache inside the request's range."""
        return len(self.prompt_rows) * self.tail_rows + sum(self.prompt_rows[:layer])

    def tail_offset(self, layer: int) -> int:
        return layer * self.tail_rows


class PoolRange:
    """A live allocation: ``rows`` rows from ``start`` (moved by compaction)."""

    __slots__ = ("rows", "start")

    def __init__(self, start: int, rows: int) -> None:
        self.start, self.rows = start, rows


def default_kv_budget(device: torch.device, share: float = 0.5) -> int:
    """A share of what is free: CUDA free memory after the model is loaded, or available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * share)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        free = info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return int(free * share)


class KVPool:
    """Key/value rows for every request of an engine, within ``budget_bytes``.

    Args:
        num_kv_heads, head_dim, dtype, device: the model's KV shape.
        budget_bytes: the pool's size; a row costs ``2 * head_dim * itemsize + 4`` bytes (key,
            value, int32 position). The capacity is rounded down to a multiple of ``Hkv`` rows.
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        budget_bytes: int,
    ) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
            raise ValueError(
                f"kv_budget: expected a positive number of bytes, got {budget_bytes!r}"
            )
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.row_bytes = 2 * head_dim * itemsize + 4
        self.capacity = budget_bytes // self.row_bytes // num_kv_heads * num_kv_heads
        self.budget_bytes = budget_bytes
        rows = self.capacity + num_kv_heads  # + the scratch token
        self.k = torch.empty(rows, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(rows, head_dim, dtype=dtype, device=device)
        self.positions = torch.empty(rows, dtype=torch.int32, device=device)
        #: index of the scratch token in the pool read as tokens ([rows / Hkv, Hkv, D])
        self.scratch_token = self.capacity // num_kv_heads
        self._live: list[PoolRange] = []  # sorted by start
        self.rows_in_use = 0
        self.compactions = 0
        self.generation = 0  # bumped when ranges move: views built before are stale

    @property
    def bytes_in_use(self) -> int:
        return self.rows_in_use * self.row_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.capacity * self.row_bytes

    def fits_ever(self, rows: int) -> bool:
        return rows <= self.capacity

    def can_allocate(self, rows: int) -> bool:
        return self.rows_in_use + rows <= self.capacity

    def allocate(self, rows: int) -> PoolRange | None:
        """A range of ``rows`` rows (a multiple of Hkv), or None when they are not free now."""
        if rows % self.num_kv_heads:
            raise ValueError(f"rows: expected a multiple of Hkv={self.num_kv_heads}, got {rows}")
        if not self.can_allocate(rows):
            return None
        start = self._first_fit(rows)
        if start is None:  # enough rows, but split: move the live ranges together
            self._compact()
            start = self._first_fit(rows)
        assert start is not None
        r = PoolRange(start, rows)
        i = next((j for j, x in enumerate(self._live) if x.start > start), len(self._live))
        self._live.insert(i, r)
        self.rows_in_use += rows
        return r

    def free(self, r: PoolRange) -> None:
        self._live.remove(r)
        self.rows_in_use -= r.rows

    def _first_fit(self, rows: int) -> int | None:
        end = 0
        for r in self._live:
            if r.start - end >= rows:
                return end
            end = r.start + r.rows
        return end if self.capacity - end >= rows else None

    def _compact(self) -> None:
        end = 0
        for r in self._live:
            if r.start != end:
                for t in (self.k, self.v, self.positions):
                    t[end : end + r.rows] = t[r.start : r.start + r.rows].clone()
                r.start = end
            end += r.rows
        self.compactions += 1
        self.generation += 1
