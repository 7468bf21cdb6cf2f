"""``AsyncEngine``: an ``Engine`` stepped by its own thread, fed from asyncio.

The model runs in one background thread (``step`` after ``step`` while there is work, asleep
otherwise). A coroutine submits a request and reads its events from an ``asyncio.Queue``:
``("block", tokens)`` for each committed block, then ``("finish", RequestOutput)``. The engine
thread hands events over with ``loop.call_soon_threadsafe``, so nothing in asyncio blocks on
the model.

A failure of the loop itself (a bug, not one request's error, which the engine isolates)
finishes every request with an error and marks the engine unhealthy (``/health`` answers 503);
``stop`` drains (waits for the running requests up to a timeout), cancels the rest and joins
the thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import torch

from .engine import Engine
from .params import SamplingParams
from .request import Request

__all__ = ["AsyncEngine", "EngineStopped"]

log = logging.getLogger("maskkv.serving")


class EngineStopped(RuntimeError):
    """The engine is shutting down or has failed: no new requests (HTTP 503)."""


class AsyncEngine:
    def __init__(self, engine: Engine, num_threads: int | None = None) -> None:
        self.engine = engine
        self.num_threads = num_threads or torch.get_num_threads()
        self.accepting = False
        self.healthy = True
        self.failure: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="maskkv-engine", daemon=True)
        self._thread.start()
        self.accepting = True

    def _loop(self) -> None:
        # Intra-op thread counts are per thread: take the server's (batch invariance on the CPU
        # also depends on it, see ``batch_invariant``).
        torch.set_num_threads(self.num_threads)
        while not self._stop.is_set():
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as err:  # noqa: BLE001 - keep serving /health with the reason
                log.exception("engine loop failed")
                self.healthy = False
                self.failure = f"{type(err).__name__}: {err}"
                self.accepting = False
                for req in self.engine.cancel_all():
                    req.error = self.failure
                return
        self.engine.cancel_all()

    def submit(
        self, prompt, params: SamplingParams, loop: asyncio.AbstractEventLoop
    ) -> tuple[Request, asyncio.Queue]:
        """Queue a request; returns it and the queue its events arrive on. Raises
        ``EngineStopped`` when not accepting, else what ``Engine.add_request`` raises."""
        if not self.accepting:
            raise EngineStopped(self.failure or "the server is shutting down")
        events: asyncio.Queue = asyncio.Queue()

        def on_block(req: Request, tokens: list[int]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("block", tokens))

        def on_finish(req: Request) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("finish", req.output()))

        req = self.engine.add_request(prompt, params, on_block=on_block, on_finish=on_finish)
        self._wake.set()
        return req, events

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting; let running requests finish for up to ``drain_timeout`` seconds;
        cancel what is left and join the thread."""
        self.accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.engine.has_unfinished() and time.monotonic() < deadline and self.healthy:
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
