"""A guard served on 127.0.0.1 in front of the simulated upstream (also on 127.0.0.1), with tracing as asked."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway_guard.app.factory import build_app
from gateway_guard.app.state import GuardState
from gateway_guard.settings import parse_settings
from gateway_guard.sim import SimConfig, build_sim_app
from tests.support.inprocess import serve_in_process
from tests.telemetry.otlp_receiver import OtlpReceiver

OTEL_VARS = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
)


@pytest.fixture(autouse=True)
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracing is off unless a test turns it on: the machine's own OTEL_* variables do not leak in."""
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


class HeaderTap:
    """Wraps the sim: notes the headers of every request it receives."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[dict[str, str]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.seen.append({k.decode(): v.decode() for k, v in scope["headers"]} | {":path": scope["path"]})
        await self.app(scope, receive, send)


@dataclass
class Running:
    client: httpx.AsyncClient
    state: GuardState
    upstream: HeaderTap
    url: str


def guard_settings(
    upstream_url: str, *, max_inflight: int = 1, probe_interval: float = 0.05, **extra: Any
) -> dict[str, Any]:
    up = {"url": upstream_url, "max_inflight": max_inflight, "probe_interval": probe_interval}
    raw: dict[str, Any] = {"upstreams": {"default": up}}
    raw.update(extra)
    return raw


@contextlib.asynccontextmanager
async def running_guard(
    *, max_inflight: int = 1, sim: SimConfig | None = None, **settings: Any
) -> AsyncIterator[Running]:
    tap = HeaderTap(build_sim_app(sim or SimConfig(tokens_per_second=200.0, ttft=0.01)))
    async with serve_in_process(tap) as sim_url:
        app = build_app(parse_settings(guard_settings(sim_url, max_inflight=max_inflight, **settings)))
        state: GuardState = app.state.guard
        try:
            async with serve_in_process(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
                yield Running(client, state, tap, url)
        finally:
            await state.aclose()  # lifespan is off in serve_in_process: flush and stop the exporters here


def chat(max_tokens: int = 4, *, stream: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "sim",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition: (name, labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return parsed.get((name, frozenset(labels.items())), 0.0)
