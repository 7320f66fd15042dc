"""The HTTP API (FastAPI): OpenAI-compatible completions and chat completions, models, health and metrics.

A request is validated and encoded by the Engine, becomes a Sequence and is submitted to the scheduler thread.
Its events come back through an asyncio queue (the scheduler calls `loop.call_soon_threadsafe`). A streamed
response relays them as server-sent events in OpenAI's chunk format and ends with `data: [DONE]`; when the client
goes away, Starlette cancels the stream and the sequence is cancelled, so the scheduler frees its slot before its
next step. A non-streamed request watches for the disconnect itself.

Every error is answered as {"error": {"message", "type", "param", "code"}}: malformed JSON and wrong types (400,
`param` names the field), unknown model (404), unknown path (404), bad credentials (401), a full queue (429), a
server that is shutting down (503).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from leapdecode.serve import protocol
from leapdecode.serve.engine import Engine
from leapdecode.serve.protocol import APIError, ChatRequest, CompletionRequest, error_body
from leapdecode.serve.scheduler import Overloaded, Unavailable
from leapdecode.serve.sequence import Delta, Failed, Finished


def create_app(engine: Engine) -> FastAPI:
    """The ASGI app for `engine`. Its lifespan starts the scheduler and, at shutdown, drains it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(engine.start)  # calibration runs torch: keep it off the event loop
        yield
        await run_in_threadpool(engine.stop)  # uvicorn has waited for open requests; finish what is queued

    app = FastAPI(title="leapdecode", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gatekeeper, api_key=engine.config.api_key, metrics=engine.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_body(exc.errors()), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, f"http_{exc.status_code}"),
                            status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        scheduler = engine.scheduler
        body = {"status": "ok" if scheduler.healthy else "unavailable", "model": engine.config.served_name,
                "running": scheduler.running_count, "waiting": scheduler.waiting_count}
        return JSONResponse(body, status_code=200 if scheduler.healthy else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=engine.metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.config.served_name, "object": "model", "created": 0,
                                            "owned_by": "leapdecode"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _generate(engine, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await _generate(engine, body, request)

    return app


async def _generate(engine: Engine, body: CompletionRequest | ChatRequest, request: Request):
    chat = isinstance(body, ChatRequest)
    # tokenising and building the drafter (some load or measure things) run off the event loop
    ids, config, drafter = await run_in_threadpool(engine.prepare, body)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def sink(event) -> None:  # called on the scheduler thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    seq = engine.sequence(ids, config, drafter, sink)
    try:
        engine.scheduler.submit(seq)
    except Overloaded as exc:
        raise APIError(429, str(exc), None, "rate_limit_exceeded", "rate_limit_error") from None
    except Unavailable as exc:
        raise APIError(503, str(exc), None, "unavailable", "server_error") from None
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    name = engine.config.served_name
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(engine, seq, queue, rid, name, chat, len(ids), include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    result = await _collect(engine, seq, queue, request)
    if result is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    build = protocol.chat_completion if chat else protocol.completion
    return build(rid, name, result.text, result.finish_reason, len(ids), result.stats)


async def _collect(engine: Engine, seq, queue: asyncio.Queue, request: Request) -> Finished | None:
    """Wait for the sequence's end; cancel it if the client disconnects first."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return None
            event = getter.result()
            if isinstance(event, Finished):
                return event
            if isinstance(event, Failed):
                raise APIError(event.status, event.message, None, "generation_failed", "server_error")
    finally:
        gone.cancel()
        if seq.state != "done":
            engine.scheduler.cancel(seq)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(engine: Engine, seq, queue: asyncio.Queue, rid: str, name: str, chat: bool, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    finished = False
    try:
        if chat:
            yield _sse(protocol.chunk(rid, name, True, "", first=True))
        while True:
            event = await queue.get()
            if isinstance(event, Delta):
                yield _sse(protocol.chunk(rid, name, chat, event.text))
            elif isinstance(event, Finished):
                final = protocol.chunk(rid, name, chat, None, event.finish_reason)
                final["usage"] = protocol.usage(prompt_tokens, event.stats.new_tokens)
                final["leapdecode"] = protocol.leapdecode_info(event.stats)
                yield _sse(final)
                if include_usage:
                    yield _sse({**final, "choices": []})
                finished = True
                break
            elif isinstance(event, Failed):
                finished = True
                yield _sse(error_body(event.message, "server_error", None, "generation_failed"))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client disconnected (Starlette cancelled us) or the stream was closed early
            engine.scheduler.cancel(seq)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _validation_body(errors: list[dict]) -> dict:
    """FastAPI's validation errors -> one OpenAI error naming the first offending field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return error_body(f"malformed JSON body: {first.get('msg')}", "invalid_request_error", None, "invalid_json")
    if not loc:  # the body itself is missing or not an object
        return error_body(f"request body: {first.get('msg')}", "invalid_request_error", None, "invalid_body")
    param = str(loc[0])
    where = ".".join(str(p) for p in loc)
    return error_body(f"{where}: {first.get('msg')}", "invalid_request_error", param, "invalid_" + (
        "value" if first.get("type") != "missing" else "missing"))


class Gatekeeper:
    """ASGI middleware: bearer-token auth (constant-time comparison) and request counts by status code."""

    def __init__(self, app, api_key: str | None, metrics) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.expected is not None and path != "/health" and not self._authorized(scope):
            self.metrics.on_response(path, 401)
            response = JSONResponse(error_body("missing or invalid API key (send Authorization: Bearer <key>)",
                                               "invalid_request_error", None, "invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.on_response(path, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)

    def _authorized(self, scope) -> bool:
        given = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
        return hmac.compare_digest(given, self.expected)
