"""Serving: many requests, one engine (continuous batching over a KV memory budget), and an
OpenAI-compatible HTTP server (``maskkv serve``).

- ``Engine`` (``engine.py``): the scheduler loop and the offline batch API ``Engine.generate``.
- ``SamplingParams`` (``params.py``): what one request asks for.
- ``Request`` / ``RequestOutput`` (``request.py``): a request's state machine.
- ``Scheduler`` (``scheduler.py``): FIFO admission by KV memory, the per-iteration work.
- ``KVPool`` (``kv_memory.py``): the preallocated KV pool, a range per request, exact bytes.
- ``ModelRunner`` (``runner.py``): the batched, batch-invariant forward passes.
- ``server.py``, ``protocol.py``, ``metrics.py``: the HTTP face (FastAPI + uvicorn, the
  ``serve`` extra).
"""

from .engine import Engine, EngineOverloaded, RequestTooLarge
from .kv_memory import KVPool, default_kv_budget
from .params import SamplingParams
from .request import FinishReason, Request, RequestOutput

__all__ = [
    "Engine",
    "EngineOverloaded",
    "FinishReason",
    "KVPool",
    "Request",
    "RequestOutput",
    "RequestTooLarge",
    "SamplingParams",
    "default_kv_budget",
]
