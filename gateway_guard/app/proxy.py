"""The proxy: pure ASGI (no BaseHTTPMiddleware), one permit per generation request, held for the whole stream.

Flow: classify (key / path / headers) -> read the body under a size limit -> check it is JSON -> pick the
upstream -> enter admission (unless the call uses no GPU) -> forward -> relay bytes as they arrive. A client
that disconnects at any point cancels the wait or closes the upstream connection at once; the ticket
(``admission/ticket.py``) releases the slot once the server has let go of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from gateway_guard.admission.budget import estimate_prompt_tokens
from gateway_guard.admission.ticket import Ticket, Usage
from gateway_guard.app.asgi import (
    ClientDisconnected,
    DisconnectWatch,
    Receive,
    Scope,
    Send,
    header_list,
    is_admin,
    read_body,
    send_error,
)
from gateway_guard.app.state import GuardState
from gateway_guard.errors import (
    ClientError,
    Forbidden,
    GuardError,
    InvalidJSON,
    NotFound,
    Outcome,
)
from gateway_guard.telemetry import RequestRecord
from gateway_guard.upstream.client import Upstream
from gateway_guard.upstream.headers import client_response_headers
from gateway_guard.upstream.usage import UsageMeter

# POSTs that read metadata only: forwarded without a generation permit.
METADATA_POSTS = frozenset({"/api/show", "/api/tags", "/api/ps", "/api/version"})
# Ollama calls that change the server's models: only with the admin token.
ADMIN_ONLY = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"})
PROXIED_PREFIXES = ("/v1/", "/api/")


def needs_permit(method: str, path: str) -> bool:
    return method == "POST" and path not in METADATA_POSTS


class ProxyHandler:
    def __init__(self, state: GuardState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = RequestRecord(method=scope["method"], path=scope["path"])
        self.state.telemetry.request_started(record, scope["headers"])
        started = record.started
        sent = _SendTracker(send)
        try:
            await self._handle(scope, receive, sent, record)
        except ClientDisconnected:
            record.outcome = Outcome.CLIENT_GONE
            record.status = record.status or 499
        except GuardError as error:
            record.outcome, record.error = error.outcome, error.message
            if not sent.started:
                record.status = error.status
                await send_error(send, error, {"x-guard-lane": record.lane} if record.lane else None)
        finally:
            record.duration = time.perf_counter() - started
            self.state.telemetry.request_finished(record)

    async def _handle(self, scope: Scope, receive: Receive, send: _SendTracker, record: RequestRecord) -> None:
        state = self.state
        headers = header_list(scope)
        hmap = dict(headers)
        cls = state.classifier.classify(scope["path"], hmap)
        record.lane, record.profile, record.path = cls.lane, cls.profile, cls.path
        if not cls.path.startswith(PROXIED_PREFIXES):
            raise NotFound(f"no route for {cls.path!r}: the guard forwards /v1/* and /api/* only")
        if cls.path in ADMIN_ONLY and not is_admin(state.settings.server.admin_token, hmap):
            raise Forbidden(f"{cls.path} changes the upstream's models and needs the guard's admin token")
        body = await read_body(receive, state.settings.server.max_body_bytes, hmap.get("content-length"))
        record.model = _model_of(scope["method"], cls.path, body, hmap.get("content-type", ""))
        upstream = state.upstreams[state.classifier.upstream_for(cls.profile, record.model)]
        record.upstream = upstream.name
        with DisconnectWatch(receive):
            if not needs_permit(scope["method"], cls.path):
                await self._forward(scope, upstream, headers, body, send, record, None)
                return
            record.queue_entered = time.perf_counter()
            prompt = estimate_prompt_tokens(body)
            async with state.admission.enter(upstream.name, cls.lane, cls.profile, prompt_tokens=prompt) as ticket:
                record.queue_wait = ticket.queue_wait
                record.outcome = Outcome.ADMITTED
                await self._forward(scope, upstream, headers, body, send, record, ticket)

    async def _forward(
        self,
        scope: Scope,
        upstream: Upstream,
        headers: list[tuple[str, str]],
        body: bytes,
        send: _SendTracker,
        record: RequestRecord,
        ticket: Ticket | None,
    ) -> None:
        t0 = record.upstream_started = time.perf_counter()
        headers = self.state.telemetry.upstream_headers(record, headers)  # the guard's traceparent when tracing
        response = await upstream.send(scope["method"], record.path, scope["query_string"], headers, body)
        try:
            record.status = response.status
            record.streamed = "event-stream" in response.content_type or "ndjson" in response.content_type
            extra = [(b"x-guard-lane", (record.lane or "").encode()), (b"x-guard-upstream", upstream.name.encode())]
            await send.start(response.status, client_response_headers(response.raw_headers) + extra)
            meter = UsageMeter(response.content_type)
            try:
                await _relay(response.chunks(), send, meter, record, t0)
            finally:  # tokens seen so far count, even when the client left mid-stream
                meter.finish()
                record.prompt_tokens, record.completion_tokens = meter.prompt_tokens, meter.completion_tokens
                if ticket is not None:
                    ticket.usage = Usage(meter.prompt_tokens, meter.completion_tokens)
            await send.body(b"", more=False)
        finally:
            await response.aclose()  # closes the upstream connection if unfinished: the server frees its slot


async def _relay(
    chunks: AsyncIterator[bytes], send: _SendTracker, meter: UsageMeter, record: RequestRecord, t0: float
) -> None:
    async for chunk in chunks:
        if record.ttfb is None:
            record.ttfb = time.perf_counter() - t0
        record.bytes_out += len(chunk)
        meter.feed(chunk)
        await send.body(chunk, more=True)


class _SendTracker:
    """Knows whether the response has started (after that, an error can only end the stream)."""

    __slots__ = ("_send", "started")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool) -> None:
        try:
            await self._send({"type": "http.response.body", "body": data, "more_body": more})
        except OSError as exc:  # some servers raise when the peer is gone
            raise ClientDisconnected from exc


def _model_of(method: str, path: str, body: bytes, content_type: str) -> str | None:
    if method == "GET" and path.startswith("/v1/models/"):
        return path.removeprefix("/v1/models/") or None
    if method != "POST" or not body:
        return None
    if content_type and "json" not in content_type:
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc.msg} (line {exc.lineno} col {exc.colno})") from None
    if not isinstance(payload, dict):
        raise InvalidJSON("request body must be a JSON object")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise ClientError("'model' must be a string")
    return model
