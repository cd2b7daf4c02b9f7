"""OpenTelemetry traces of proxied requests, exported over OTLP/HTTP; off unless the environment asks.

Imported only when tracing is on (``otel_env.tracing_from_env``): when off, no OpenTelemetry module is loaded.

Per request, only the SERVER span (continuing the client's W3C ``traceparent``, made current for the
handler's task) and the CLIENT span of the upstream call (its context is what the upstream receives as
``traceparent``) are live while it runs; the rest is drawn from the record's timestamps when it ends, with
true times, as finished spans handed straight to the span processor (see ``Tracing``). Few spans and few
attributes: the exporter's thread encodes each one in Python, and that competes for the GIL::

    POST /v1/chat/completions   SERVER  guard.lane, guard.profile, guard.upstream, guard.outcome,
    |                                   guard.queue.wait_seconds, gen_ai.request.model, http.*
    |                                   event guard.classified (body read, lane/profile/upstream chosen)
    +- queue.wait                       from asking the gate to the permit, or to the refusal; only when the
    |                                   request waited (>= 1 ms) or was refused there
    +- upstream                 CLIENT  the call to the end of the response (the whole stream): gen_ai.*
                                        (model, input/output tokens, time to first token), server.address,
                                        http.response.status_code; event gen_ai.first_token when streamed
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from contextvars import Token
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    format_trace_id,
    get_current_span,
    set_span_in_context,
)

from gateway_guard.errors import Outcome
from gateway_guard.telemetry.record import RequestRecord

PROPAGATION_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})
QUEUED_SECONDS = 0.001  # a permit granted sooner was granted at once: no queue.wait span for it
UNSET = Status(StatusCode.UNSET)
# Not served: the upstream failed it, or the guard refused it for want of room (a 429 now, a 503 before; the
# caller's own limits -- profile queue, rate -- are the caller's doing and stay unset, as 4xx do).
ERROR_OUTCOMES = frozenset(
    {Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_TIMEOUT, Outcome.REJECTED_QUEUE_FULL, Outcome.EXPIRED_DEADLINE}
)
GEN_AI_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/api/chat": "chat",
    "/api/generate": "text_completion",
    "/api/embed": "embeddings",
    "/api/embeddings": "embeddings",
}


class _Pending:
    """One request's trace before its spans exist: ids, the parent, the clock offset (perf_counter -> epoch ns)."""

    __slots__ = (
        "client_id",
        "flags",
        "parent",
        "perf0",
        "remote",
        "server",
        "server_id",
        "token",
        "trace_id",
        "wall0",
    )

    def __init__(self, parent: otel_context.Context, trace_id: int, server_id: int, wall0: int, perf0: float) -> None:
        self.parent = parent
        self.remote: SpanContext | None = None  # the client's span, when it sent a traceparent
        self.trace_id = trace_id
        self.server_id = server_id
        self.client_id: int | None = None
        self.wall0 = wall0
        self.perf0 = perf0
        self.server: SpanContext | None = None
        self.token: Token[otel_context.Context] | None = None
        self.flags = TraceFlags(TraceFlags.SAMPLED)

    def ns(self, perf: float) -> int:
        return self.wall0 + int((perf - self.perf0) * 1e9)


class Tracing:
    r"""Draws each request's spans when it ends, as finished ``ReadableSpan``\ s handed to ``processor``.

    Not through a ``Tracer``: a tracer starts spans now and times them live; these spans are over when they
    are made, with ids chosen when the request arrived. A tenth of the CPU of ``start_span`` / ``end``.
    ``provider`` holds the resource and the sampler (both from the ``OTEL_*`` environment) and owns
    ``processor`` (it flushes and shuts it down); its tracers, if anyone asks for one, export alike.
    """

    def __init__(
        self, provider: TracerProvider, processor: SpanProcessor, upstream_urls: Mapping[str, str] | None = None
    ) -> None:
        self.provider = provider
        self._processor = processor
        self._resource = provider.resource
        self._sampler = provider.sampler
        self._scope = InstrumentationScope("gateway_guard")
        self._random = RandomIdGenerator()
        self._addresses: dict[str, dict[str, Any]] = {}
        for name, url in (upstream_urls or {}).items():
            parts = urlsplit(url)  # host and port only: a URL from config may carry credentials
            address: dict[str, Any] = {"server.address": parts.hostname or ""}
            if parts.port is not None:
                address["server.port"] = parts.port
            self._addresses[name] = address

    def start(self, record: RequestRecord, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Choose the ids, decide sampling as the SDK will, make the server span's context current."""
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in PROPAGATION_HEADERS}
        parent = propagate.extract(carrier) if carrier else otel_context.Context()
        remote = get_current_span(parent).get_span_context()
        trace_id = remote.trace_id if remote.is_valid else self._random.generate_trace_id()
        pending = _Pending(parent, trace_id, self._random.generate_span_id(), time.time_ns(), time.perf_counter())
        decision = self._sampler.should_sample(parent, trace_id, record.method, SpanKind.SERVER).decision
        sampled = decision is Decision.RECORD_AND_SAMPLE
        if not sampled:
            pending.flags = TraceFlags(TraceFlags.DEFAULT)
        trace_state = remote.trace_state if remote.is_valid else None
        pending.remote = remote if remote.is_valid else None
        pending.server = SpanContext(trace_id, pending.server_id, False, pending.flags, trace_state)
        pending.token = otel_context.attach(set_span_in_context(NonRecordingSpan(pending.server), parent))
        record.trace = pending
        record.trace_id = format_trace_id(trace_id)

    def upstream_headers(self, record: RequestRecord, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The upstream call's ``traceparent`` (its span is drawn at the end, with this id) replaces the client's."""
        pending: _Pending | None = record.trace
        if pending is None or pending.server is None:
            return headers
        pending.client_id = self._random.generate_span_id()
        client = SpanContext(pending.trace_id, pending.client_id, False, pending.flags, pending.server.trace_state)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=set_span_in_context(NonRecordingSpan(client), pending.parent))
        drop = {"traceparent", "tracestate", *carrier}
        return [(k, v) for k, v in headers if k not in drop] + list(carrier.items())

    def finish(self, record: RequestRecord) -> None:
        pending: _Pending | None = record.trace
        if pending is None:
            return
        record.trace = None
        try:
            if pending.flags.sampled:
                self._draw(record, pending)
        finally:
            if pending.token is not None:
                otel_context.detach(pending.token)

    def _draw(self, record: RequestRecord, pending: _Pending) -> None:
        assert pending.server is not None
        end_perf = record.started + record.duration
        end = pending.ns(end_perf)
        outcome = record.outcome.value
        failed = record.status >= 500 or record.outcome in ERROR_OUTCOMES
        status = Status(StatusCode.ERROR, record.error or outcome) if failed else UNSET
        attrs: dict[str, Any] = {
            "http.request.method": record.method,
            "url.path": record.path,
            "guard.outcome": outcome,
            "guard.queue.wait_seconds": record.queue_wait,
        }
        for key, value in (
            ("guard.lane", record.lane),
            ("guard.profile", record.profile),
            ("guard.upstream", record.upstream),
            ("gen_ai.request.model", record.model),
        ):
            if value is not None:
                attrs[key] = value
        if record.status:
            attrs["http.response.status_code"] = record.status
        classified = next((t for t in (record.queue_entered, record.upstream_started) if t is not None), None)
        events = () if classified is None else (Event("guard.classified", None, pending.ns(classified)),)
        server = pending.server
        spans = [
            self._span(
                f"{record.method} {record.path}",
                server,
                pending.remote,
                SpanKind.SERVER,
                pending.ns(record.started),
                end,
                attrs,
                events,
                status,
            )
        ]

        if record.queue_entered is not None:
            admitted = record.upstream_started is not None
            waited_to = record.upstream_started if record.upstream_started is not None else end_perf
            waited = waited_to - record.queue_entered
            if not admitted or waited >= QUEUED_SECONDS:
                wait_attrs: dict[str, Any] = {"guard.queue.wait_seconds": waited, "guard.queue.admitted": admitted}
                if not admitted:
                    wait_attrs["guard.outcome"] = outcome
                context = SpanContext(pending.trace_id, self._random.generate_span_id(), False, pending.flags)
                start, stop = pending.ns(record.queue_entered), pending.ns(waited_to)
                spans.append(
                    self._span("queue.wait", context, server, SpanKind.INTERNAL, start, stop, wait_attrs, (), UNSET)
                )

        if pending.client_id is not None and record.upstream_started is not None:
            client_attrs = _upstream_attributes(record) | self._addresses.get(record.upstream or "", {})
            first_token: tuple[Event, ...] = ()
            if record.streamed and record.ttfb is not None:
                first_token = (Event("gen_ai.first_token", None, pending.ns(record.upstream_started + record.ttfb)),)
            context = SpanContext(pending.trace_id, pending.client_id, False, pending.flags, server.trace_state)
            start = pending.ns(record.upstream_started)
            spans.append(
                self._span("upstream", context, server, SpanKind.CLIENT, start, end, client_attrs, first_token, status)
            )
        for span in spans:
            self._processor.on_end(span)

    def _span(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        start: int,
        end: int,
        attributes: dict[str, Any],
        events: tuple[Event, ...],
        status: Status,
    ) -> ReadableSpan:
        return ReadableSpan(
            name,
            context=context,
            parent=parent,
            resource=self._resource,
            attributes=attributes,
            events=events,
            kind=kind,
            status=status,
            start_time=start,
            end_time=max(start, end),
            instrumentation_scope=self._scope,
        )

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes the batch processors and joins their threads

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.provider.force_flush(timeout_millis)


def _upstream_attributes(record: RequestRecord) -> dict[str, Any]:
    """HTTP client and OpenTelemetry GenAI semantic-convention attributes of the upstream call."""
    attrs: dict[str, Any] = {"http.request.method": record.method}
    if record.status:
        attrs["http.response.status_code"] = record.status
    operation = GEN_AI_OPERATIONS.get(record.path)
    if operation is not None:
        attrs["gen_ai.operation.name"] = operation
    if record.model:
        attrs["gen_ai.request.model"] = record.model
    if record.prompt_tokens is not None:
        attrs["gen_ai.usage.input_tokens"] = record.prompt_tokens
    if record.completion_tokens is not None:
        attrs["gen_ai.usage.output_tokens"] = record.completion_tokens
    if record.streamed and record.ttfb is not None:
        attrs["gen_ai.server.time_to_first_token"] = record.ttfb
    return attrs
