"""Traces through the real OTLP/HTTP exporter to a receiver on 127.0.0.1 that decodes the protobuf."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from typing import Any

import httpx
import pytest

from gateway_guard.app.factory import build_app
from gateway_guard.app.state import GuardState
from gateway_guard.errors import ConfigError
from gateway_guard.settings import parse_settings
from gateway_guard.sim import SimConfig
from gateway_guard.telemetry.otel_env import tracing_wanted
from tests.support.inprocess import serve_in_process
from tests.telemetry.conftest import chat, guard_settings, running_guard
from tests.telemetry.otlp_receiver import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, STATUS_CODE_ERROR, OtlpReceiver, Span

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
INTERACTIVE = {"x-guard-lane": "interactive"}


def children(spans: list[Span], parent: Span) -> dict[str, Span]:
    return {s.name: s for s in spans if s.parent_span_id == parent.span_id}


def server_span(spans: list[Span]) -> Span:
    (server,) = [s for s in spans if s.kind == SPAN_KIND_SERVER]
    return server


async def test_streamed_request_gives_spans_and_continues_the_clients_trace(
    otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", otlp_receiver.endpoint)
    sim = SimConfig(tokens_per_second=40.0, ttft=0.02)  # 20 tokens take ~0.5 s: the others must wait
    async with running_guard(max_inflight=1, sim=sim, lanes={"batch": {"queue_timeout": 0.1}}) as g:
        assert g.state.telemetry.tracing is not None
        headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", **INTERACTIVE}
        async with g.client.stream("POST", "/v1/chat/completions", json=chat(20), headers=headers) as first:
            assert first.status_code == 200
            chunks = first.aiter_raw()
            await chunks.__anext__()  # the first request holds the only permit now
            second = asyncio.create_task(g.client.post("/v1/chat/completions", json=chat(2), headers=INTERACTIVE))
            async with asyncio.timeout(5):
                while g.state.gates["default"].snapshot().queued != 1:
                    await asyncio.sleep(0.005)
            expired = await g.client.post("/v1/chat/completions", json=chat(2), headers={"x-guard-lane": "batch"})
            async for _ in chunks:
                pass
        assert ((await second).status_code, expired.status_code) == (200, 429)
        upstream_saw = [h for h in g.upstream.seen if h[":path"] == "/v1/chat/completions"]
    # running_guard's exit shut the provider down: every span has been exported

    spans = otlp_receiver.trace(CLIENT_TRACE)
    server = server_span(spans)
    assert server.parent_span_id == CLIENT_SPAN, "the client's traceparent is continued"
    assert server.name == "POST /v1/chat/completions"
    assert server.resource["service.name"] == "gateway-guard"
    a = server.attributes
    assert (a["guard.lane"], a["guard.profile"], a["guard.upstream"], a["guard.outcome"]) == (
        "interactive",
        "anonymous",
        "default",
        "admitted",
    )
    assert (a["http.response.status_code"], a["gen_ai.request.model"]) == (200, "sim")
    assert a["guard.queue.wait_seconds"] < 0.1
    assert server.start_ns < server.events["guard.classified"] < server.end_ns

    kids = children(spans, server)
    assert set(kids) == {"upstream"}, "no queue.wait span: the permit was granted at once"
    upstream = kids["upstream"]
    assert upstream.kind == SPAN_KIND_CLIENT
    u = upstream.attributes
    assert (u["server.address"], u["http.response.status_code"], u["gen_ai.operation.name"]) == (
        "127.0.0.1",
        200,
        "chat",
    )
    assert u["gen_ai.request.model"] == "sim"
    assert u["gen_ai.usage.output_tokens"] == 20
    assert u["gen_ai.usage.input_tokens"] > 0
    assert 0 < u["gen_ai.server.time_to_first_token"] < upstream.duration
    first_token = upstream.events["gen_ai.first_token"]
    assert upstream.start_ns < first_token < upstream.end_ns <= server.end_ns
    assert abs((first_token - upstream.start_ns) / 1e9 - u["gen_ai.server.time_to_first_token"]) < 0.001

    # the upstream got the guard's traceparent: same trace, its parent is the guard's upstream span
    assert upstream_saw[0]["traceparent"] == f"00-{CLIENT_TRACE}-{upstream.span_id}-01"

    servers = [s for s in otlp_receiver.spans if s.kind == SPAN_KIND_SERVER]
    assert len(servers) == 3
    # the second request had no traceparent: a trace of its own, with the wait it really had
    (waiter,) = [s for s in servers if s.trace_id != CLIENT_TRACE and s.attributes["guard.outcome"] == "admitted"]
    waited = children(otlp_receiver.trace(waiter.trace_id), waiter)
    assert set(waited) == {"queue.wait", "upstream"}
    assert waited["queue.wait"].duration >= 0.2
    assert waited["queue.wait"].attributes["guard.queue.admitted"] is True
    assert waited["queue.wait"].attributes["guard.queue.wait_seconds"] >= 0.2
    assert waited["queue.wait"].end_ns <= waited["upstream"].start_ns
    assert waiter.attributes["guard.queue.wait_seconds"] >= 0.2
    assert upstream_saw[1]["traceparent"].split("-")[1] == waiter.trace_id

    # the batch request waited out its 0.1 s deadline in the queue: refused there, never sent upstream
    (refused,) = [s for s in servers if s.attributes["guard.outcome"] == "expired_deadline"]
    assert refused.status_code == STATUS_CODE_ERROR and refused.attributes["http.response.status_code"] == 429
    (wait,) = children(otlp_receiver.trace(refused.trace_id), refused).values()
    assert wait.name == "queue.wait" and wait.attributes["guard.queue.admitted"] is False
    assert 0.09 <= wait.duration < 0.5 and wait.attributes["guard.outcome"] == "expired_deadline"
    assert len(upstream_saw) == 2


async def test_refused_and_failed_requests_are_traced_with_their_outcome(
    otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint.removesuffix("/v1/traces"))
    monkeypatch.setenv("OTEL_SERVICE_NAME", "guard-under-test")
    async with serve_in_process(lambda *_: None) as dead_url:
        pass  # the port is closed again: nothing listens there now
    app = build_app(parse_settings(guard_settings(dead_url, lanes={"interactive": {"queue_size": 0}})))
    state: GuardState = app.state.guard
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guard.test") as client:
            failed_call = await client.get("/v1/models")  # no GPU work: a 502 at once
            # a generation call finds the upstream down: back to its lane, whose queue takes nobody: refused
            down = await client.post("/v1/chat/completions", json=chat(), headers=INTERACTIVE)
            unknown = await client.post("/v1/chat/completions", json=chat(), headers={"x-guard-lane": "nope"})
    finally:
        await state.aclose()
    assert (failed_call.status_code, down.status_code, unknown.status_code) == (502, 429, 400)

    servers = {s.attributes["guard.outcome"]: s for s in otlp_receiver.spans if s.kind == SPAN_KIND_SERVER}
    assert set(servers) == {"upstream_error", "rejected_queue_full", "rejected_client"}
    assert servers["rejected_queue_full"].status_code == STATUS_CODE_ERROR  # not served for want of room
    failed = servers["upstream_error"]
    assert failed.status_code == STATUS_CODE_ERROR
    assert failed.resource["service.name"] == "guard-under-test"
    upstream = children(otlp_receiver.trace(failed.trace_id), failed)["upstream"]
    assert upstream.status_code == STATUS_CODE_ERROR
    refused = servers["rejected_client"]
    assert refused.status_code != STATUS_CODE_ERROR, "a 4xx is the client's error, not the server span's"
    assert children(otlp_receiver.trace(refused.trace_id), refused) == {}


async def test_off_by_default_and_the_clients_traceparent_passes_through(
    otlp_receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    with caplog.at_level(logging.INFO, logger="gateway_guard.access"):
        async with running_guard(sim=SimConfig(mode="zero")) as g:
            assert g.state.telemetry.tracing is None
            r = await g.client.post("/v1/chat/completions", json=chat(), headers={"traceparent": traceparent})
            assert r.status_code == 200
            assert g.upstream.seen[-1]["traceparent"] == traceparent
    assert otlp_receiver.posts == []
    (line,) = [r.getMessage() for r in caplog.records if r.name == "gateway_guard.access"]
    assert f"trace_id={CLIENT_TRACE}" in line


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, []),
    ],
)
def test_which_environment_turns_tracing_on(environ: dict[str, str], wanted: list[str]) -> None:
    assert tracing_wanted(environ) == wanted


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ],
)
def test_an_unsupported_exporter_is_a_config_error_naming_the_variable(environ: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        tracing_wanted(environ)
    assert info.value.key == key


async def test_the_server_span_is_current_in_the_handlers_task(
    otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ContextVar propagation through the pure-ASGI proxy: code the handler runs sees the guard's server span."""
    from opentelemetry import trace

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", otlp_receiver.endpoint)
    seen: list[tuple[str, str]] = []

    async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        # httpx.ASGITransport runs this inside the guard's own task: its context is the handler's
        ctx = trace.get_current_span().get_span_context()
        seen.append((trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    app = build_app(parse_settings(guard_settings("http://upstream.test")), transport=httpx.ASGITransport(upstream))
    state: GuardState = app.state.guard
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guard.test") as client:
            headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
            assert (await client.post("/v1/chat/completions", json=chat(), headers=headers)).status_code == 200
    finally:
        await state.aclose()
    server = server_span(otlp_receiver.trace(CLIENT_TRACE))
    assert seen == [(CLIENT_TRACE, server.span_id)]
    assert trace.get_current_span().get_span_context().is_valid is False, "and detached once the request ended"


def test_tracing_off_imports_no_opentelemetry() -> None:
    code = (
        "import sys\n"
        "from gateway_guard.app.factory import build_app\n"
        "from gateway_guard.settings import parse_settings\n"
        "build_app(parse_settings({'upstreams': {'u': {'url': 'http://127.0.0.1:9'}}}))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith('opentelemetry')}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
