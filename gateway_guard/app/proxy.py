"""The proxy: pure ASGI (no BaseHTTPMiddleware), one permit per generation request, held for the whole stream.

Flow: classify (key / path / headers) -> read the body under a size limit -> check it is JSON -> pick the
upstream -> enter admission (unless the call uses no GPU) -> forward -> relay bytes as they arrive. A client
that disconnects at any point cancels the wait or closes the upstream connection at once; the ticket
(``admission/ticket.py``) releases the slot once the server has let go of it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from gateway_guard.admission.budget import estimate_prompt_tokens
from gateway_guard.admission.ticket import Ticket, Usage
from gateway_guard.app.asgi import (
    BodyBudget,
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
from gateway_guard.app.body import model_of
from gateway_guard.app.paths import encoded, is_admin_only, is_proxied, needs_permit, request_path
from gateway_guard.app.state import GuardState
from gateway_guard.errors import (
    Forbidden,
    GuardError,
    NotFound,
    Outcome,
)
from gateway_guard.telemetry import RequestRecord
from gateway_guard.upstream.client import Upstream
from gateway_guard.upstream.headers import client_response_headers
from gateway_guard.upstream.usage import UsageMeter


class ProxyHandler:
    def __init__(self, state: GuardState) -> None:
        self.state = state
        self.bodies = BodyBudget(state.settings.server.body_budget_bytes)  # restart to change

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = RequestRecord(method=scope["method"], path=scope["path"])
        self.state.telemetry.request_started(record, scope["headers"])
        started = record.started
        sent = _SendTracker(send)
        metered = self.bodies.metered(receive)  # bodies read count against server.body_budget_bytes until the end
        try:
            await self._handle(scope, metered, sent, record)
        except ClientDisconnected:
            record.outcome = Outcome.CLIENT_GONE
            record.status = record.status or 499
        except GuardError as error:
            record.outcome, record.error = error.outcome, error.message
            if not sent.started:
                record.status = error.status
                await send_error(send, error, {"x-guard-lane": record.lane} if record.lane else None)
        finally:
            metered.release()
            record.duration = time.perf_counter() - started
            self.state.telemetry.request_finished(record)

    async def _handle(self, scope: Scope, receive: Receive, send: _SendTracker, record: RequestRecord) -> None:
        state = self.state
        headers = header_list(scope)
        hmap = dict(headers)
        cls = state.classifier.classify(request_path(scope), hmap)  # a strict path, else 400 (app/paths.py)
        record.lane, record.profile, record.path = cls.lane, cls.profile, encoded(cls.path)  # forwarded as checked
        if not is_proxied(cls.path):
            raise NotFound(f"no route for {cls.path!r}: the guard forwards /v1/* and /api/* only")
        if is_admin_only(cls.path) and not is_admin(state.settings.server.admin_token, hmap):
            raise Forbidden(f"{cls.path} changes the upstream's models and needs the guard's admin token")
        body = await read_body(receive, state.settings.server.max_body_bytes, hmap.get("content-length"))
        record.model = model_of(scope["method"], cls.path, body, hmap.get("content-type", ""))
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
