"""The OpenAI-compatible request bodies (pydantic) and error bodies.

Types are strict: ``"max_tokens": "16"`` is a wrong type, not 16, and the 400 error names the
field. Fields OpenAI defines that a diffusion model cannot honour (``logprobs``, ``echo``,
``n`` > 1, penalties) are refused when set to anything but their neutral value; unknown fields
are ignored, as OpenAI's API does. maskkv extensions: ``block_length``, ``steps``,
``threshold`` / ``factor`` (decoding rule), ``remasking`` (LLaDA), ``alg`` / ``alg_temp`` (Dream),
``top_k``.

Defaults differ from OpenAI's in one place: ``temperature`` defaults to 0 (greedy), the
diffusion samplers' default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

__all__ = ["ChatRequest", "CompletionRequest", "Message", "error_body"]

Number = StrictFloat | StrictInt
NonNegInt = Annotated[StrictInt, Field(ge=0)]


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _SamplingFields(_Base):
    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: NonNegInt | None = None
    user: StrictStr | None = None
    frequency_penalty: Annotated[Number, Field(ge=0, le=0)] | None = None
    presence_penalty: Annotated[Number, Field(ge=0, le=0)] | None = None
    # maskkv extensions
    block_length: Annotated[StrictInt, Field(ge=1)] | None = None
    steps: Annotated[StrictInt, Field(ge=1)] | None = None
    threshold: Annotated[Number, Field(gt=0, le=1)] | None = None
    factor: Annotated[Number, Field(gt=0)] | None = None
    remasking: Literal["low_confidence", "random"] | None = None
    alg: Literal["origin", "maskgit_plus", "topk_margin", "entropy"] | None = None
    alg_temp: Annotated[Number, Field(ge=0)] | None = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a string or a list of token ids."""

    prompt: StrictStr | Annotated[list[NonNegInt], Field(min_length=1)]
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None


class Message(_Base):
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[dict[str, Any]]

    def text(self) -> str:
        """The message's text (content parts of type "text" joined)."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for i, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages: content part {i}: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_SamplingFields):
    """``POST /v1/chat/completions``: rendered with the tokenizer's chat template."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: Literal[False] | None = None


def error_body(message: str, param: str | None, code: str | None = None, kind: str = "") -> dict:
    """OpenAI's error object."""
    return {
        "error": {
            "message": message,
            "type": kind or "invalid_request_error",
            "param": param,
            "code": code,
        }
    }
