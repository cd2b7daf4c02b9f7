"""Whether the environment asks for traces, and the SDK set up as it asks; nothing of OpenTelemetry is
imported here unless tracing is on.

On when ``OTEL_TRACES_EXPORTER`` names ``otlp`` (or ``console``), or when it is unset and
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set. ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none`` turn it off. Everything else (endpoint, headers, timeout, sampler, batch sizes,
resource) is the SDK's own ``OTEL_*`` configuration, read by the SDK itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from gateway_guard.errors import ConfigError

if TYPE_CHECKING:
    from gateway_guard.telemetry.tracing import Tracing

SERVICE_NAME = "gateway-guard"


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


def tracing_from_env(upstream_urls: Mapping[str, str] | None = None) -> Tracing | None:
    """``Tracing`` with a batch exporter per name in ``OTEL_TRACES_EXPORTER``, or None (tracing off).

    Reads ``os.environ``, as the SDK's exporter, sampler and resource do (one environment for all of them).
    """
    env = os.environ
    names = tracing_wanted(env)
    if not names:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SynchronousMultiSpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    from gateway_guard.telemetry.tracing import Tracing

    processor = SynchronousMultiSpanProcessor()  # type: ignore[no-untyped-call]
    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(  # resource and sampler read from OTEL_* by the SDK itself
        resource=Resource.create({} if named else {"service.name": SERVICE_NAME}),
        shutdown_on_exit=False,  # the guard's lifespan shuts it down (flushes, joins the exporter threads)
        active_span_processor=processor,
    )
    for name in names:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider, processor, upstream_urls)


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
