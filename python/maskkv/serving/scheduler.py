"""The scheduler: who waits, who runs, and how much prompt work one iteration may do.

- **Admission by memory, FIFO.** A waiting request is admitted when its whole KV footprint
  (``KVFootprint.rows``) can be reserved in the pool. Only the head of the queue is ever
  considered, so a large request is never overtaken by smaller ones behind it (no starvation);
  it waits until enough running requests finish. A request whose footprint exceeds the whole
  pool is refused when it arrives (``RequestTooLarge``), never queued.
- **One iteration** = admit; one batched tail pass over every running request whose next pass is
  a tail pass; then full passes (prompt passes) of the others, oldest first, layer by layer,
  until ``prefill_tokens`` token-layers were spent (at least one layer). A 32k-token prompt
  therefore runs a few layers per iteration, between the running requests' steps.
"""

from __future__ import annotations

from collections import deque

from .kv_memory import KVPool
from .request import Request

__all__ = ["EngineOverloaded", "Scheduler"]


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: retry later (HTTP 429)."""


class Scheduler:
    """Queues and admission for one engine.

    Args:
        pool: the engine's ``KVPool``.
        max_running: most requests admitted at once (memory decides first).
        max_waiting: most requests waiting; one more raises ``EngineOverloaded``.
        prefill_tokens: token-layers of full passes per iteration (a pass over L tokens costs
            L per layer); at least one layer runs per iteration when a full pass is pending.
    """

    def __init__(self, pool: KVPool, max_running: int, max_waiting: int, prefill_tokens: int):
        for name, value in (
            ("max_running", max_running),
            ("max_waiting", max_waiting),
            ("prefill_tokens", prefill_tokens),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.pool = pool
        self.max_running, self.max_waiting = max_running, max_waiting
        self.prefill_tokens = prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise EngineOverloaded(
                f"the waiting queue is full ({self.max_waiting} requests); retry later"
            )
        self.waiting.append(req)

    def admit(self) -> list[Request]:
        """Move waiting requests to running while the head's footprint fits (FIFO)."""
        admitted = []
        while self.waiting and len(self.running) < self.max_running:
            head = self.waiting[0]
            rows = self.pool.allocate(head.footprint.rows)
            if rows is None:
                break
            head.pool_range = rows
            self.waiting.popleft()
            self.running.append(head)
            admitted.append(head)
        return admitted

    def tail_batch(self) -> list[Request]:
        """Running requests whose next pass is a tail pass, or a block commit (batched
        together)."""
        return [r for r in self.running if r.plan is not None and r.plan.kind in ("tail", "commit")]

    def full_passes(self) -> list[Request]:
        """Running requests whose next pass is a full pass, oldest first."""
        return [r for r in self.running if r.plan is not None and r.plan.kind == "full"]

    def remove(self, req: Request) -> None:
        """Take a finished request out and return its KV rows to the pool at once."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.pool_range is not None:
            self.pool.free(req.pool_range)
            req.pool_range = None

    def find(self, request_id: str) -> Request | None:
        for r in (*self.running, *self.waiting):
            if r.request_id == request_id:
                return r
        return None
