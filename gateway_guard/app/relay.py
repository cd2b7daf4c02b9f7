"""Forward one request upstream and relay the answer to the client, byte for byte as it arrives.

* A non-streamed chat or text completion is asked of the server as a stream (``upstream/assemble.py``) and
  handed to the client as the non-streamed JSON it asked for: llama.cpp stops a streamed generation when the
  guard hangs up, not a non-streamed one, so a client that leaves frees the GPU for real (docs/upstream-client.md).
* A generation call answered ``503`` "Loading model" is not relayed: ``UpstreamLoading`` puts the request back
  in its lane until the server is ready (``app/proxy.py``).
* A stream cut by the upstream after it began ends with an SSE ``error`` event and a clean end of the body, so
  the OpenAI SDK raises a proper ``APIError`` instead of a broken read.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from gateway_guard.admission.ticket import Ticket, Usage
from gateway_guard.app.asgi import ClientDisconnected, Scope, Send
from gateway_guard.errors import GuardError, UpstreamError, UpstreamUnavailable
from gateway_guard.telemetry import RequestRecord, Telemetry
from gateway_guard.upstream.assemble import Assembler, to_stream_request
from gateway_guard.upstream.client import Upstream, UpstreamResponse
from gateway_guard.upstream.headers import client_response_headers
from gateway_guard.upstream.usage import UsageMeter

MAX_NOT_READY_BODY = 64 * 1024
LOADING_PHRASES = ("loading model", "model is loading", "loading the model")


class UpstreamLoading(UpstreamUnavailable):
    """The server answered that it is not ready (llama.cpp ``503 Loading model``): it did no work."""

    code = "upstream_loading"


class SendTracker:
    """Knows whether the response has started (after that, an error can only end the stream) and ended."""

    __slots__ = ("_prepared", "_send", "ended", "started")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.ended = False
        self._prepared: tuple[int, list[tuple[bytes, bytes]]] | None = None

    def prepare(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The status line and headers, sent with the first body bytes: until then the client has seen nothing,
        so an upstream that dies before its first chunk (llama.cpp sends its headers before the first token)
        leaves a request that can still go back to its line instead of a stream cut at once."""
        self._prepared = (status, headers)

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        self._prepared = None
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool) -> None:
        if self.ended:
            return
        if self._prepared is not None:
            await self.start(*self._prepared)
        self.ended = not more
        try:
            await self._send({"type": "http.response.body", "body": data, "more_body": more})
        except OSError as exc:  # some servers raise when the peer is gone
            raise ClientDisconnected from exc


async def forward(
    telemetry: Telemetry,
    scope: Scope,
    upstream: Upstream,
    headers: list[tuple[str, str]],
    body: bytes,
    send: SendTracker,
    record: RequestRecord,
    ticket: Ticket | None,
    payload: dict[str, Any] | None = None,
) -> None:
    """Send the request and relay the answer; ``ticket``: a generation call holding a slot (else metadata);
    ``payload``: the JSON body as the proxy parsed it (for a non-streamed completion asked as a stream)."""
    t0 = record.upstream_started = time.perf_counter()
    headers = telemetry.upstream_headers(record, headers)  # the guard's traceparent when tracing
    assembler: Assembler | None = None
    converted = None if ticket is None or payload is None else to_stream_request(record.path, payload)
    if converted is not None:
        body = json.dumps(converted, separators=(",", ":")).encode()
        assembler = Assembler(record.path, upstream=upstream.name)
    response = await upstream.send(scope["method"], record.path, scope["query_string"], headers, body)
    try:
        record.status = response.status
        if ticket is not None and response.status == 503:
            await _not_ready(response, upstream, send, record)
            return
        extra = [(b"x-guard-lane", (record.lane or "").encode()), (b"x-guard-upstream", upstream.name.encode())]
        meter = UsageMeter(response.content_type)
        try:
            if assembler is not None and 200 <= response.status < 300 and "event-stream" in response.content_type:
                assert ticket is not None  # only generation calls are assembled
                await _assemble(response, assembler, meter, send, record, t0, extra, ticket)
            else:
                record.streamed = "event-stream" in response.content_type or "ndjson" in response.content_type
                send.prepare(response.status, client_response_headers(response.raw_headers) + extra)
                await _relay(response.chunks(), send, meter, record, t0, ticket)
        finally:  # tokens seen so far count, even when the client left mid-stream
            meter.finish()
            record.prompt_tokens, record.completion_tokens = meter.prompt_tokens, meter.completion_tokens
            if ticket is not None:
                ticket.usage = Usage(meter.prompt_tokens, meter.completion_tokens)
        await send.body(b"", more=False)
    finally:
        await response.aclose()  # closes the upstream connection if unfinished: the server frees its slot


async def _not_ready(response: UpstreamResponse, upstream: Upstream, send: SendTracker, record: RequestRecord) -> None:
    """A 503: "Loading model" (or the like) goes back to the queue; any other 503 is relayed untouched."""
    data = bytearray()
    async for chunk in response.chunks():
        data += chunk
        if len(data) > MAX_NOT_READY_BODY:
            break
    text = bytes(data[:4096]).decode("utf-8", "replace").lower()
    if any(phrase in text for phrase in LOADING_PHRASES):
        raise UpstreamLoading(f"upstream {upstream.name!r} is loading its model (503)")
    await send.start(response.status, client_response_headers(response.raw_headers))
    await send.body(bytes(data), more=False)


async def _assemble(
    response: UpstreamResponse,
    assembler: Assembler,
    meter: UsageMeter,
    send: SendTracker,
    record: RequestRecord,
    t0: float,
    extra: list[tuple[bytes, bytes]],
    ticket: Ticket,
) -> None:
    async for chunk in response.chunks():
        now = time.perf_counter()
        if record.ttfb is None:
            record.ttfb = now - t0
        ticket.chunk_arrived()
        meter.feed(chunk)
        assembler.feed(chunk)
    status, data = assembler.finish()
    record.status, record.bytes_out = status, len(data)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]
    await send.start(status, headers)
    await send.body(data, more=False)


async def _relay(
    chunks: AsyncIterator[bytes],
    send: SendTracker,
    meter: UsageMeter,
    record: RequestRecord,
    t0: float,
    ticket: Ticket | None,
) -> None:
    try:
        async for chunk in chunks:
            now = time.perf_counter()
            if record.ttfb is None:
                record.ttfb = now - t0
            if ticket is not None:
                ticket.chunk_arrived()
            record.bytes_out += len(chunk)
            meter.feed(chunk)
            await send.body(chunk, more=True)
    except UpstreamError as exc:
        if record.streamed and send.started:  # end the stream cleanly: the SDK raises the error it reads
            await end_stream_with_error(send, exc)
        raise


async def end_stream_with_error(send: SendTracker, error: GuardError) -> None:
    event = json.loads(error.body())
    await send.body(b"\n\ndata: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n", more=True)
    await send.body(b"", more=False)
