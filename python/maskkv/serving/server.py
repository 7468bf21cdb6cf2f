"""The OpenAI-compatible HTTP server (FastAPI on uvicorn).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template;
``stream: true`` sends server-sent events, one chunk per committed block, then ``[DONE]``),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Errors are OpenAI's JSON error object with ``param`` naming the field: HTTP 400 for malformed
JSON, wrong types, an unknown model, a generation length over the limit, a prompt over the
model's context or a request whose KV cache could never fit the budget; 429 with
``Retry-After`` when the waiting queue is full; 503 with ``Retry-After`` while shutting down or
after an engine failure. A client that disconnects cancels its request, and its KV rows return
to the pool at once.

``max_tokens`` becomes the generation length rounded up to a whole number of blocks
(``block_length``, default ``ServerConfig.block_length``); the text returned stops at
``max_tokens`` tokens, at EOS or at a ``stop`` string, whichever comes first. A block-causal
LLaDA2 model counts its blocks from the first prompt token: its generation length is
``max_tokens`` and ``steps`` are per block (LLaDA2's default, 32).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .async_engine import AsyncEngine, EngineStopped
from .engine import EngineOverloaded, RequestTooLarge
from .metrics import PrometheusCollector
from .params import SamplingParams
from .protocol import ChatRequest, CompletionRequest, error_body

__all__ = ["ServerConfig", "build_app"]

# Engine argument names -> the API field a client sets.
_PARAM_NAMES = {"gen_length": "max_tokens", "tau": "threshold", "f": "factor"}


@dataclass
class ServerConfig:
    """What the server adds to the engine.

    Args:
        model_name: the ``model`` clients must name (``/v1/models`` lists it).
        default_max_tokens: ``max_tokens`` when a request gives none.
        block_length: default semi-autoregressive block (clamped to the generation length).
        tokens_per_step: default tokens revealed per step with fixed steps (steps =
            gen_length / tokens_per_step).
        retry_after: seconds suggested to clients in ``Retry-After`` (429 / 503).
    """

    model_name: str
    default_max_tokens: int = 64
    block_length: int = 32
    tokens_per_step: int = 1
    retry_after: int = 1


class _ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def build_app(async_engine: AsyncEngine, tokenizer, config: ServerConfig) -> FastAPI:
    """The FastAPI application around a started ``AsyncEngine``."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    engine = async_engine.engine
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(engine.stats))
    app = FastAPI(title="maskkv", docs_url=None, redoc_url=None)
    app.state.async_engine = async_engine

    def error(status: int, message: str, param: str | None, code=None, headers=None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        if status == 429:
            kind = "rate_limit_error"
        return JSONResponse(
            error_body(message, param, code, kind), status_code=status, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error(400, f"body: malformed JSON ({first.get('msg')})", "body")
        # the field, then list indices and message fields; not pydantic's union-member tags
        loc = loc[:1] + [x for x in loc[1:] if x.isdigit() or x in ("role", "content")]
        param = ".".join(loc) if loc else None
        return error(400, f"{param or 'body'}: {first.get('msg')}", param)

    @app.exception_handler(_ApiError)
    async def _api_error(request: Request, exc: _ApiError):
        headers = {"Retry-After": str(config.retry_after)} if exc.status in (429, 503) else None
        return error(exc.status, exc.message, exc.param, exc.code, headers)

    @app.get("/health")
    async def health():
        if not async_engine.healthy:
            return error(503, f"engine failed: {async_engine.failure}", None, "engine_failed")
        if not async_engine.accepting:
            return error(503, "shutting down", None, "shutting_down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": config.model_name, "object": "model", "created": 0, "owned_by": "maskkv"}
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await _serve(body, body.prompt, "prompt", raw, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, raw: Request):
        if getattr(tokenizer, "chat_template", None) is None:
            raise _ApiError(400, "messages: the model's tokenizer has no chat template", "messages")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as err:
            raise _ApiError(400, str(err), "messages") from None
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # BatchEncoding in newer transformers
            ids = list(ids["input_ids"])
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        return await _serve(body, ids, "messages", raw, chat=True)

    def _params(body) -> tuple[SamplingParams, int]:
        """(engine params, max_tokens): the generation length is max_tokens rounded up to
        whole blocks."""
        max_tokens = body.max_tokens or config.default_max_tokens
        if getattr(engine.model, "dllm_kind", "llada") == "llada2":
            block, gen_length, steps = (
                body.block_length or config.block_length,
                max_tokens,
                body.steps,
            )
        else:
            block = body.block_length or min(config.block_length, max_tokens)
            gen_length = -(-max_tokens // block) * block
            steps = body.steps or max(gen_length // config.tokens_per_step, gen_length // block)
        decoding = None
        if body.threshold is not None and body.factor is not None:
            raise _ApiError(400, "threshold, factor: give one decoding rule", "threshold")
        from ..generation import Factor, Threshold

        try:
            if body.threshold is not None:
                decoding = Threshold(float(body.threshold))
            elif body.factor is not None:
                decoding = Factor(float(body.factor))
            options = dict(
                gen_length=gen_length, block_length=block, steps=steps, decoding=decoding,
                temperature=float(body.temperature or 0.0), seed=body.seed,
                top_p=None if body.top_p is None else float(body.top_p), top_k=body.top_k,
                stop_at_eos=True,
            )  # fmt: skip
            if body.remasking is not None:
                options["remasking"] = body.remasking
            if body.alg is not None:
                options["alg"] = body.alg
            if body.alg_temp is not None:
                options["alg_temp"] = float(body.alg_temp)
            return SamplingParams(**options).resolved(engine.model), max_tokens
        except ValueError as err:
            raise _value_error(err, "max_tokens") from None

    async def _serve(body, prompt, prompt_field: str, raw: Request, chat: bool):
        if body.model != config.model_name:
            raise _ApiError(
                400,
                f"model: unknown model {body.model!r}; this server serves {config.model_name!r}",
                "model",
                "model_not_found",
            )
        params, max_tokens = _params(body)
        loop = asyncio.get_running_loop()
        try:
            req, events = async_engine.submit(prompt, params, loop)
        except EngineStopped as err:
            raise _ApiError(503, str(err), None, "unavailable") from None
        except EngineOverloaded as err:
            raise _ApiError(429, str(err), None, "overloaded") from None
        except RequestTooLarge as err:
            raise _ApiError(400, str(err), prompt_field, "kv_budget_exceeded") from None
        except ValueError as err:
            raise _value_error(err, prompt_field, prompt_field) from None
        reply = _Reply(
            body, req, tokenizer, engine.model.config.eos_token_id, max_tokens, config, chat
        )
        if body.stream:
            return StreamingResponse(
                _stream(reply, events, raw), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )  # fmt: skip
        return await _collect(reply, events, raw)

    async def _collect(reply: _Reply, events: asyncio.Queue, raw: Request):
        gone = asyncio.ensure_future(_disconnected(raw))
        try:
            while True:
                get = asyncio.ensure_future(events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the client went away: free its cache now
                    get.cancel()
                    async_engine.abort(reply.req.request_id)
                    return Response(status_code=499)
                kind, item = get.result()
                if kind == "block":
                    if reply.add(item) and not reply.req.finished:
                        async_engine.abort(reply.req.request_id)  # a stop string: done early
                else:
                    return _finish_or_raise(reply, item)
        except asyncio.CancelledError:
            async_engine.abort(reply.req.request_id)
            raise
        finally:
            gone.cancel()

    def _finish_or_raise(reply: _Reply, output):
        if output.finish_reason.value == "error" and not reply.stopped:
            raise _ApiError(500, f"generation failed: {output.error}", None, "generation_error")
        if output.finish_reason.value == "abort" and not reply.stopped:
            raise _ApiError(503, "the request was cancelled (shutdown)", None, "cancelled")
        return reply.final(output)

    async def _stream(reply: _Reply, events: asyncio.Queue, raw: Request):
        done = False
        try:
            if reply.chat:
                yield _sse(reply.chunk({"role": "assistant", "content": ""}, None))
            while True:
                kind, item = await events.get()
                if kind == "block":
                    delta = reply.delta(item)
                    if reply.stopped and not reply.req.finished:
                        async_engine.abort(reply.req.request_id)
                    if delta:
                        yield _sse(reply.chunk(delta, None))
                    continue
                if item.finish_reason.value in ("error", "abort") and not reply.stopped:
                    msg = item.error or "the request was cancelled"
                    yield _sse(
                        error_body(f"generation failed: {msg}", None, item.finish_reason.value)
                    )
                else:
                    yield _sse(reply.chunk("", reply.finish_reason(item)))
                    if reply.include_usage:
                        yield _sse(reply.usage_chunk(item))
                yield "data: [DONE]\n\n"
                done = True
                return
        finally:
            if not done:  # the client went away (or the server stops): free the cache now
                async_engine.abort(reply.req.request_id)

    return app


async def _disconnected(raw: Request) -> None:
    """Returns when the client disconnects (the body is read: the next ASGI message is the
    disconnect)."""
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _value_error(err: ValueError, default_param: str, prompt_field: str = "prompt") -> _ApiError:
    """A ``ValueError`` whose message starts with ``<arg>:`` as a 400 naming the API field."""
    message = str(err)
    arg = message.split(":", 1)[0].strip() if ":" in message else default_param
    param = _PARAM_NAMES.get(arg, arg)
    if param == "prompt":
        param = prompt_field
    if " " in param:
        param = default_param
    elif arg != param:
        message = param + message[len(arg) :]
    return _ApiError(400, message, param)


class _Reply:
    """Text and OpenAI objects of one request as its blocks arrive."""

    def __init__(self, body, req, tokenizer, eos_id, max_tokens, config, chat):
        self.body, self.req, self.tokenizer, self.eos_id = body, req, tokenizer, eos_id
        self.max_tokens, self.config, self.chat = max_tokens, config, chat
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters already streamed
        self.stopped = False  # EOS, a stop string or max_tokens reached
        self.hit_stop = False
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        options = body.stream_options or {}
        self.include_usage = bool(options.get("include_usage"))

    def add(self, tokens: list[int]) -> bool:
        """Take a committed block; returns True once the answer is complete."""
        if self.stopped:
            return True
        for t in tokens:
            if t == self.eos_id:
                self.stopped = self.hit_stop = True
                break
            if len(self.tokens) >= self.max_tokens:
                self.stopped = True
                break
            self.tokens.append(t)
        if len(self.tokens) >= self.max_tokens:
            self.stopped = True
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.body.stops() if s in text]
        if cuts:
            text = text[: min(cuts)]
            self.stopped = self.hit_stop = True
        self.text = text
        return self.stopped

    def delta(self, tokens: list[int]) -> str:
        self.add(tokens)
        # hold back a possible start of a stop string until it is decided
        hold = 0
        if not self.stopped:
            for s in self.body.stops():
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
        out = self.text[self.sent : len(self.text) - hold]
        self.sent += len(out)
        return out

    def finish_reason(self, output) -> str:
        if self.hit_stop or output.finish_reason.value == "stop":
            return "stop"
        return "length"

    def usage(self, output) -> dict:
        prompt = len(output.prompt_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": len(self.tokens),
            "total_tokens": prompt + len(self.tokens),
        }

    def final(self, output) -> dict:
        reason = self.finish_reason(output)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": self.text},
                "finish_reason": reason,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": self.text, "finish_reason": reason, "logprobs": None}
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.config.model_name,
            "choices": [choice],
            "usage": self.usage(output),
        }

    def chunk(self, delta, reason: str | None) -> dict:
        if self.chat:
            content = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": content, "finish_reason": reason, "logprobs": None}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}
            kind = "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.config.model_name,
            "choices": [choice],
        }

    def usage_chunk(self, output) -> dict:
        chunk = self.chunk("", None)
        chunk["choices"] = []
        chunk["usage"] = self.usage(output)
        return chunk
