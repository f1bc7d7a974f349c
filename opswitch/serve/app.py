"""The HTTP side: Starlette routes over the scheduler, OpenAI's shapes on the wire.

Everything here runs on the event loop and never touches the model: a
request is checked (protocol.py), queued (scheduler.py), and its output
read from an asyncio queue, either whole or as server-sent events.  Every
error, ours or the framework's, is OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
from sse_starlette.sse import EventSourceResponse, SendTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse as StarletteJSON
from starlette.responses import Response
from starlette.routing import Route

from opswitch.generation import DEFAULT_PREFILL_CHUNK
from opswitch.serve.metrics import Metrics
from opswitch.serve.protocol import (
    APIError,
    CompletionRequest,
    bad,
    completion_id,
    completion_json,
    error_body,
    logprobs_json,
    parse_completion,
    usage_json,
)
from opswitch.serve.scheduler import STREAM_BUFFER, Delta, NotServing, QueueFull, Scheduler, Ticket

if TYPE_CHECKING:
    from opswitch.api import LanguageModel

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a full-context prompt as token ids is a few kB
NO_CHAT = ("{model} has no chat template: GPT-2 models are plain text continuers, not chat models,"
           " and opswitch does not invent a template for them. Use POST /v1/completions with a prompt.")


class JSONResponse(StarletteJSON):
    """JSON with every non-ASCII character escaped: a lone surrogate a client sent (and an
    error message quotes back) cannot be UTF-8 encoded, but it can be escaped."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class ClientTooSlow(Exception):
    """A send waited longer than the send timeout: the client is not reading."""


class SendTimeout:
    """ASGI wrapper: every send of a response (whole or streamed) must finish within
    ``seconds``, or the response is abandoned and uvicorn closes the connection.

    Without it a client that never reads holds its connection, and the response
    waiting for it, for as long as it likes."""

    def __init__(self, app, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def timed_send(message) -> None:
            with anyio.move_on_after(self.seconds) as waited:
                await send(message)
            if waited.cancelled_caught:
                raise ClientTooSlow(f"a send waited over {self.seconds:g} s (--send-timeout)")

        with contextlib.suppress(ClientTooSlow):  # nobody to tell: the connection is closed
            await self.app(scope, receive, timed_send)


class _EventStream(EventSourceResponse):
    """Server-sent events that end quietly when the client stops reading: its request is
    cancelled (the generator's ``finally``) and uvicorn closes the connection."""

    async def __call__(self, scope, receive, send) -> None:
        with contextlib.suppress(SendTimeoutError, ClientTooSlow):
            await super().__call__(scope, receive, send)


class ServeApp:
    """The app's state: the model, its scheduler, the metrics, the settings."""

    def __init__(self, lm: LanguageModel, model_name: str, *, max_batch: int = 16, max_queue: int = 256,
                 cache_bytes: int = 1 << 30, api_key: str | None = None,
                 max_body: int = MAX_BODY_BYTES, body_timeout: float = 30.0, send_timeout: float = 30.0,
                 stream_buffer: int = STREAM_BUFFER, grace: float = 5.0,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, prefix_cache: bool = True) -> None:
        self.lm, self.model_name, self.max_body = lm, model_name, max_body
        # the key as bytes (surrogateescape: as the command line or environment gave it)
        self.api_key = None if api_key is None else api_key.encode("utf-8", "surrogateescape")
        self.body_timeout, self.send_timeout, self.stream_buffer = body_timeout, send_timeout, stream_buffer
        self.grace = grace
        self.metrics = Metrics()
        self.scheduler = Scheduler(lm, max_batch, max_queue, cache_bytes, self.metrics,
                                   prefill_chunk=prefill_chunk, prefix_cache=prefix_cache)
        self.created = int(time.time())

    def begin_shutdown(self) -> None:
        """A signal asked the server to stop: end running streams and answer waiting requests
        (503) now, while uvicorn still holds their connections open."""
        self.scheduler.begin_stop()

    # -- plumbing ------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").encode("latin-1")  # the header's raw bytes
        token = given[7:] if given[:7].lower() == b"bearer " else b""
        if not hmac.compare_digest(token, self.api_key):
            raise APIError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, refusing bodies over the size limit before reading them whole,
        and bodies that take longer than body_timeout to arrive."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise APIError(413, f"the request body is {declared} bytes; the limit is {self.max_body}",
                           code="request_too_large")
        try:
            raw = await asyncio.wait_for(self._read_body(request), self.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s"
                           " (--body-timeout)", code="request_timeout") from None
        try:
            return json.loads(raw)
        except RecursionError:
            raise bad("the request body is nested too deeply", code="invalid_json") from None
        except ValueError as exc:  # not JSON, not UTF-8, or an integer past Python's digit limit
            raise bad(f"the request body is not valid JSON: {exc}"[:300], code="invalid_json") from None

    async def _read_body(self, request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise APIError(413, f"the request body is over the limit of {self.max_body} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- routes ----------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        started = time.perf_counter()
        self.check_key(request)
        body = await self.read_json(request)
        # off the event loop: encoding a prompt is bounded (by the context) but not free, and
        # streams of other requests keep flowing meanwhile
        req = await asyncio.get_running_loop().run_in_executor(
            None, parse_completion, body, self.lm, self.model_name, self.scheduler)
        ticket = Ticket(req.sequences, req.stream, self.stream_buffer)
        ticket.arrived = started
        try:
            self.scheduler.submit(ticket)
        except QueueFull as exc:
            raise APIError(429, str(exc), code="queue_full", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except NotServing as exc:
            raise APIError(503, str(exc), code="not_serving", kind="server_error") from None
        cid = completion_id()
        if req.stream:
            return _EventStream(self._stream(ticket, req, cid), sep="\n", ping=15,
                                headers={"Cache-Control": "no-cache"}, shutdown_grace_period=self.grace)
        return await self._whole(request, ticket, req, cid)

    async def _whole(self, request: Request, ticket: Ticket, req: CompletionRequest, cid: str) -> Response:
        collect = asyncio.ensure_future(self._collect(ticket, len(req.sequences)))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not collect.done():  # the client left: free its batch slots and cache
            collect.cancel()
            self.scheduler.cancel(ticket)
            self.metrics.request_done(499)
            return Response(status_code=499)
        deltas = collect.result()
        failed = next((d for d in deltas if d.error), None)
        if failed is not None:
            self.scheduler.cancel(ticket)  # its other choices, if any, are of no use now
            code = "not_serving" if failed.status == 503 else "generation_failed"
            raise APIError(failed.status, failed.error, code=code, kind="server_error")  # type: ignore[arg-type]
        tok = self.scheduler.tokenizer
        choices = [{"text": d.text, "index": d.index, "logprobs": logprobs_json(d, tok, 0)
                    if req.logprobs is not None else None, "finish_reason": d.finish_reason}
                   for d in sorted(deltas, key=lambda d: d.index)]
        self.metrics.request_done(200, time.perf_counter() - ticket.arrived)
        usage = usage_json(req.prompt_tokens, ticket.completion_tokens)
        return JSONResponse(completion_json(cid, req.model, choices, usage))

    @staticmethod
    async def _collect(ticket: Ticket, n: int) -> list[Delta]:
        finished: list[Delta] = []
        while len(finished) < n:
            for delta in await ticket.get():
                if delta.error:
                    return [delta]
                finished.append(delta)
        return finished

    async def _stream(self, ticket: Ticket, req: CompletionRequest, cid: str) -> AsyncIterator[dict]:
        """Server-sent events: one chunk per choice with new text, then usage (if asked), then [DONE].
        A failure (generation, shutdown) is one error chunk in OpenAI's shape, then [DONE]."""
        open_choices, offsets = len(req.sequences), [0] * len(req.sequences)
        tok, status = self.scheduler.tokenizer, 499
        try:
            while open_choices:
                for delta in await ticket.get():
                    try:
                        if delta.error:
                            raise _Failed(delta.error, delta.status)
                        logprobs = None
                        if req.logprobs is not None:
                            logprobs = logprobs_json(delta, tok, offsets[delta.index])
                            offsets[delta.index] += sum(len(t) for t in (logprobs or {}).get("tokens", []))
                        choice = {"text": delta.text, "index": delta.index, "logprobs": logprobs,
                                  "finish_reason": delta.finish_reason}
                        chunk = completion_json(cid, req.model, [choice], None)
                        if not req.include_usage:
                            del chunk["usage"]
                        data = json.dumps(chunk, allow_nan=False)
                    except Exception as exc:  # this request's output cannot be shown: it alone fails
                        failed = exc if isinstance(exc, _Failed) else _Failed(
                            f"generation failed: {type(exc).__name__}: {exc}", 500)
                        status = failed.status
                        code = "not_serving" if failed.status == 503 else "generation_failed"
                        yield {"data": json.dumps(error_body(failed.message, "server_error", code=code))}
                        yield {"data": "[DONE]"}
                        return
                    open_choices -= delta.finish_reason is not None
                    yield {"data": data}
            if req.include_usage:
                usage = usage_json(req.prompt_tokens, ticket.completion_tokens)
                yield {"data": json.dumps(completion_json(cid, req.model, [], usage))}
            yield {"data": "[DONE]"}
            status = 200
        finally:
            if status != 200:
                self.scheduler.cancel(ticket)  # the client left, or generation failed
            self.metrics.request_done(status, time.perf_counter() - ticket.arrived if status == 200 else None)

    async def chat(self, request: Request) -> Response:
        self.check_key(request)
        raise APIError(404, NO_CHAT.format(model=self.model_name), "messages", "chat_template_missing")

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "opswitch",
             "max_model_len": self.lm.config.n_positions}]})

    async def health(self, request: Request) -> Response:
        if self.scheduler.alive:
            return JSONResponse({"status": "ok", "model": self.model_name, "backend": self.lm.backend.spec,
                                 "queue": self.scheduler.queue_length, "running": self.scheduler.running})
        return JSONResponse({"status": "unavailable", "reason": self.scheduler.failure or "not started"},
                            status_code=503)

    async def prometheus(self, request: Request) -> Response:
        self.check_key(request)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- the app -----------------------------------------------------------------------
    def build(self) -> SendTimeout:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette):
            self.scheduler.start()
            try:
                yield
            finally:
                await asyncio.get_running_loop().run_in_executor(None, self.scheduler.stop)

        routes = [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        handlers = {APIError: self._api_error, HTTPException: _http_error, Exception: self._crash}
        return SendTimeout(Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan),
                           self.send_timeout)

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        if request.url.path.startswith("/v1/"):
            self.metrics.request_done(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def _crash(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, ClientTooSlow):  # not an error of ours; the answer cannot be sent anyway
            self.metrics.request_done(499)
            return Response(status_code=499)
        self.metrics.request_done(500)
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)


class _Failed(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message, self.status = message, status


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 etc., in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    message = {404: f"no route {request.method} {request.url.path}: see /v1/completions, /v1/models,"
                    " /health, /metrics",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                         str(exc.detail))
    return JSONResponse(error_body(message, "invalid_request_error", code=str(exc.status_code)),
                        status_code=exc.status_code, headers=exc.headers)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(lm: LanguageModel, model_name: str, **settings: Any) -> SendTimeout:
    """The ASGI app serving ``lm`` (a LanguageModel) as ``model_name``."""
    return ServeApp(lm, model_name, **settings).build()
