"""Logs, metrics and traces of each request: the only package that imports opentelemetry / prometheus_client.

The proxy fills one ``RequestRecord`` per request, calls ``request_started`` when it arrives,
``upstream_headers`` just before it goes upstream, and ``request_finished`` once at its end (whatever the
path: success, rejection, upstream failure, client gone). ``/metrics`` is ``await telemetry.metrics()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from gateway_guard.admission.gate import AdmissionGate
from gateway_guard.admission.policy import Policy
from gateway_guard.settings import Settings
from gateway_guard.telemetry.access_log import JsonLogFormatter, access_fields, access_log, log_access
from gateway_guard.telemetry.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway_guard.telemetry.metrics import GuardMetrics
from gateway_guard.telemetry.otel_env import client_trace_id, tracing_from_env
from gateway_guard.telemetry.record import RequestRecord
from gateway_guard.upstream.probe import Prober

if TYPE_CHECKING:
    from gateway_guard.telemetry.tracing import Tracing

__all__ = [
    "METRICS_CONTENT_TYPE",
    "JsonLogFormatter",
    "RequestRecord",
    "Telemetry",
    "access_fields",
    "access_log",
]


class Telemetry:
    def __init__(
        self,
        *,
        log_json: bool = False,
        gates: Mapping[str, AdmissionGate] | None = None,
        probers: Mapping[str, Prober] | None = None,
        profiles: Iterable[str] = (),
        tracing: Tracing | None = None,
    ) -> None:
        self._log_json = log_json
        self.metrics_registry = GuardMetrics(
            {} if gates is None else gates, {} if probers is None else probers, profiles
        )
        self.tracing = tracing
        self.on_finished: list[Callable[[RequestRecord], None]] = []  # e.g. the status page's history

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        gates: Mapping[str, AdmissionGate],
        probers: Mapping[str, Prober],
    ) -> Telemetry:
        """Tracing follows the ``OTEL_*`` environment (``otel_env.tracing_from_env``); off by default."""
        urls = {name: up.url for name, up in settings.upstreams.items()}
        tracing = tracing_from_env(urls)
        return cls(
            log_json=settings.server.log_json,
            gates=gates,
            probers=probers,
            profiles=settings.profiles,
            tracing=tracing,
        )

    def apply(self, policy: Policy) -> None:
        """A new policy (start or reload): profile labels follow the configured profiles."""
        self.metrics_registry.set_profiles(policy.profiles)

    def request_started(self, record: RequestRecord, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """``headers``: the ASGI scope's raw header pairs (for the client's ``traceparent``)."""
        if self.tracing is not None:
            self.tracing.start(record, headers)
        else:
            record.trace_id = client_trace_id(headers)

    def upstream_headers(self, record: RequestRecord, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The headers to send upstream: with the guard's ``traceparent`` when tracing, else unchanged."""
        if self.tracing is None:
            return headers
        return self.tracing.upstream_headers(record, headers)

    def request_finished(self, record: RequestRecord) -> None:
        if self.tracing is not None:
            self.tracing.finish(record)
        self.metrics_registry.observe(record)
        log_access(record, as_json=self._log_json)
        for hook in self.on_finished:
            hook(record)

    async def metrics(self) -> bytes:
        """Prometheus text exposition (content type ``METRICS_CONTENT_TYPE``)."""
        return await self.metrics_registry.render()

    async def aclose(self) -> None:
        """Flush and stop the span exporters (their threads); the guard's lifespan calls this at shutdown."""
        if self.tracing is not None:
            tracing, self.tracing = self.tracing, None
            await asyncio.to_thread(tracing.shutdown)
