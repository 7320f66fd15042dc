"""The OpenAI-compatible wire format: request bodies (validated by pydantic) and response / chunk / error objects.

Types are strict: "5" is not a number and 1 is not a boolean, so a client bug surfaces as a 400 naming the field
instead of being guessed at. Parameters leapdecode does not implement (penalties, logprobs, n > 1, echo) are
refused when set to anything but their neutral value, rather than silently ignored. Extensions: `top_k`,
`drafter` (a registry name, e.g. "none" for plain decoding) and `ignore_eos` (fixed-length benchmarks).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from leapdecode.stats import Stats


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")  # clients send fields like `user`; they do not change the output

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1)] = 0  # 0 or -1 = off
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None
    stop: StrictStr | Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(max_length=16)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    drafter: StrictStr | None = None
    ignore_eos: StrictBool = False
    # not implemented: accepted only at their neutral values
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    logprobs: Literal[False, None] = None
    logit_bias: Annotated[dict, Field(max_length=0)] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None or self.stop == "":
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)] \
        | Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
    echo: Literal[False] = False
    best_of: Literal[1, None] = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None


# ------------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def leapdecode_info(stats: Stats) -> dict[str, Any]:
    """The per-request speculation facts every response carries."""
    return {"drafter": stats.drafter, "steps": stats.steps, "mat": round(stats.mat, 4),
            "draft_tokens": stats.draft_tokens, "accepted_tokens": stats.accepted_tokens,
            "acceptance_per_depth": [round(a, 4) for a in stats.acceptance_per_depth],
            "prefill_seconds": round(stats.prefill_seconds, 4), "total_seconds": round(stats.total_seconds, 4)}


def completion(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, stats: Stats) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, stats.new_tokens), "leapdecode": leapdecode_info(stats)}


def chat_completion(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, stats: Stats) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, stats.new_tokens), "leapdecode": leapdecode_info(stats)}


def chunk(rid: str, model: str, chat: bool, text: str | None, finish_reason: str | None = None,
          first: bool = False) -> dict:
    """One streamed piece: text (None for a pure finish / role chunk)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [choice]}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]}
