"""OpenTelemetry traces of proxied requests, exported over OTLP/HTTP; off unless the environment asks.

On (see ``provider_from_env``) when ``OTEL_TRACES_EXPORTER`` names ``otlp`` (or ``console``), or when it is
unset and ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set; ``OTEL_SDK_DISABLED=true``
or ``OTEL_TRACES_EXPORTER=none`` turn it off. Everything else (endpoint, headers, timeout, sampler, batch
sizes, resource) is the SDK's own ``OTEL_*`` configuration. When off, the SDK is not even imported.

Per request, only two spans are live while it runs: the SERVER span (continuing the client's W3C
``traceparent``, made current for the handler's task) and the CLIENT span of the upstream call (its context
is what the upstream receives as ``traceparent``). The other children are drawn from the record's timestamps
when the request ends, with their true start and end times::

    POST /v1/chat/completions      SERVER  guard.lane, guard.profile, guard.upstream, guard.outcome,
    |                                      guard.queue.wait_seconds, gen_ai.*, http.*
    +- classify                    reading the body, lane/profile/upstream/model
    +- queue.wait                  from asking the gate to the permit (or to the refusal)
    +- upstream                    CLIENT  the call, to the end of the response; gen_ai.*
       +- stream                   streamed responses: first chunk to last
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, format_trace_id, set_span_in_context

from gateway_guard.errors import ConfigError, Outcome
from gateway_guard.telemetry.record import RequestRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

PROPAGATION_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})
SERVICE_NAME = "gateway-guard"
ERROR_OUTCOMES = frozenset({Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_TIMEOUT})
GEN_AI_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/api/chat": "chat",
    "/api/generate": "text_completion",
    "/api/embed": "embeddings",
    "/api/embeddings": "embeddings",
}


def tracing_wanted(environ: Mapping[str, str]) -> list[str]:
    """The span exporters the environment asks for; empty = tracing off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    if names == ["none"]:
        return []
    for name in names:
        if name not in {"otlp", "console"}:
            raise ConfigError("OTEL_TRACES_EXPORTER", "must be otlp, console or none (comma-separated)", name)
    if "otlp" in names:
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
        if protocol not in {"", "http/protobuf"}:
            raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL", "only http/protobuf is supported", protocol)
    return names


def provider_from_env(environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A TracerProvider with a batch exporter per name in ``OTEL_TRACES_EXPORTER``, or None (tracing off)."""
    env = os.environ if environ is None else environ
    names = tracing_wanted(env)
    if not names:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(
        resource=Resource.create({} if named else {"service.name": SERVICE_NAME}), shutdown_on_exit=False
    )
    for name in names:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def client_trace_id(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The trace id of the client's ``traceparent`` (for the access log when the guard does not trace)."""
    for name, value in headers:
        if name == b"traceparent":
            parts = value.split(b"-")
            if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != b"0" * 32:
                try:
                    int(parts[1], 16)
                except ValueError:
                    return None
                return parts[1].decode("ascii")
            return None
    return None


class _Live:
    """The spans of one running request, and the clock offset to turn ``perf_counter`` marks into epoch ns."""

    __slots__ = ("client", "context", "perf0", "server", "token", "wall0")

    def __init__(
        self, server: Span, context: otel_context.Context, token: Token[otel_context.Context], wall0: int, perf0: float
    ) -> None:
        self.server = server
        self.context = context
        self.token = token
        self.wall0 = wall0
        self.perf0 = perf0
        self.client: Span | None = None

    def ns(self, perf: float) -> int:
        return self.wall0 + int((perf - self.perf0) * 1e9)


class Tracing:
    def __init__(self, provider: TracerProvider, upstream_urls: Mapping[str, str] | None = None) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("gateway_guard")
        self._addresses: dict[str, dict[str, Any]] = {}
        for name, url in (upstream_urls or {}).items():
            parts = urlsplit(url)  # host and port only: a URL from config may carry credentials
            address: dict[str, Any] = {"server.address": parts.hostname or ""}
            if parts.port is not None:
                address["server.port"] = parts.port
            self._addresses[name] = address

    def start(self, record: RequestRecord, headers: Iterable[tuple[bytes, bytes]]) -> None:
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in PROPAGATION_HEADERS}
        parent = propagate.extract(carrier)
        wall0, perf0 = time.time_ns(), time.perf_counter()
        span = self._tracer.start_span(
            f"{record.method} {record.path}",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=wall0 - int((perf0 - record.started) * 1e9),
            attributes={"http.request.method": record.method, "url.path": record.path},
        )
        context = set_span_in_context(span, parent)
        token = otel_context.attach(context)  # current for this task: the pure-ASGI handler runs in it
        record.trace = _Live(span, context, token, wall0, perf0)
        record.trace_id = format_trace_id(span.get_span_context().trace_id)

    def upstream_headers(self, record: RequestRecord, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Open the upstream CLIENT span and put its ``traceparent`` (not the client's) on the way up."""
        live: _Live | None = record.trace
        if live is None:
            return headers
        at = record.upstream_started if record.upstream_started is not None else time.perf_counter()
        span = self._tracer.start_span("upstream", context=live.context, kind=SpanKind.CLIENT, start_time=live.ns(at))
        live.client = span
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=set_span_in_context(span, live.context))
        drop = {"traceparent", "tracestate", *carrier}
        return [(k, v) for k, v in headers if k not in drop] + list(carrier.items())

    def finish(self, record: RequestRecord) -> None:
        live: _Live | None = record.trace
        if live is None:
            return
        record.trace = None
        try:
            self._draw(record, live)
        finally:
            otel_context.detach(live.token)

    def _draw(self, record: RequestRecord, live: _Live) -> None:
        end_perf = record.started + record.duration
        end = live.ns(end_perf)
        outcome = record.outcome.value
        guard: dict[str, Any] = {"guard.outcome": outcome, "guard.queue.wait_seconds": record.queue_wait}
        for key, value in (("guard.lane", record.lane), ("guard.profile", record.profile)):
            if value is not None:
                guard[key] = value
        if record.upstream is not None:
            guard["guard.upstream"] = record.upstream
        gen_ai = _gen_ai_attributes(record)
        failed = record.status >= 500 or record.outcome in ERROR_OUTCOMES

        phase_end = next((t for t in (record.queue_entered, record.upstream_started) if t is not None), end_perf)
        self._child(
            live,
            live.context,
            "classify",
            record.started,
            phase_end,
            {k: v for k, v in guard.items() if k in {"guard.lane", "guard.profile", "guard.upstream"}}
            | ({"gen_ai.request.model": record.model} if record.model else {}),
        )
        if record.queue_entered is not None:
            admitted = record.upstream_started is not None
            waited_to = record.upstream_started if admitted else end_perf
            assert waited_to is not None
            attrs: dict[str, Any] = {
                "guard.queue.wait_seconds": record.queue_wait if admitted else waited_to - record.queue_entered,
                "guard.queue.admitted": admitted,
            }
            attrs.update({k: v for k, v in guard.items() if k in {"guard.lane", "guard.profile", "guard.upstream"}})
            if not admitted:
                attrs["guard.outcome"] = outcome
            self._child(live, live.context, "queue.wait", record.queue_entered, waited_to, attrs)

        client = live.client
        if client is not None:
            client.set_attributes(
                {"http.request.method": record.method, "url.path": record.path, **gen_ai}
                | self._addresses.get(record.upstream or "", {})
            )
            if record.status:
                client.set_attribute("http.response.status_code", record.status)
            if record.streamed and record.ttfb is not None and record.upstream_started is not None:
                stream_attrs: dict[str, Any] = {"guard.bytes_out": record.bytes_out}
                if record.completion_tokens is not None:
                    stream_attrs["gen_ai.usage.output_tokens"] = record.completion_tokens
                ctx = set_span_in_context(client, live.context)
                self._child(live, ctx, "stream", record.upstream_started + record.ttfb, end_perf, stream_attrs)
            if failed:
                client.set_status(Status(StatusCode.ERROR, record.error or outcome))
            client.end(end_time=end)

        server = live.server
        server.update_name(f"{record.method} {record.path}")
        server.set_attributes({"url.path": record.path, **guard, **gen_ai})
        if record.status:
            server.set_attribute("http.response.status_code", record.status)
        if failed:
            server.set_status(Status(StatusCode.ERROR, record.error or outcome))
        server.end(end_time=end)

    def _child(
        self,
        live: _Live,
        parent: otel_context.Context,
        name: str,
        start: float,
        end: float,
        attributes: dict[str, Any],
    ) -> None:
        span = self._tracer.start_span(name, context=parent, start_time=live.ns(start), attributes=attributes)
        span.end(end_time=live.ns(max(start, end)))

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes the batch processors and joins their threads

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.provider.force_flush(timeout_millis)


def _gen_ai_attributes(record: RequestRecord) -> dict[str, Any]:
    """OpenTelemetry GenAI semantic-convention attributes that the guard can know."""
    attrs: dict[str, Any] = {}
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
