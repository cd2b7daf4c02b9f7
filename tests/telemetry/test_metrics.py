"""``GET /metrics`` parsed with prometheus_client's own parser: counters move by exactly what was sent."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from gateway_guard.app.factory import build_app
from gateway_guard.app.state import GuardState
from gateway_guard.settings import UpstreamSettings, parse_settings
from gateway_guard.sim import SimConfig
from gateway_guard.telemetry.metrics import GuardMetrics, ProfileLabels
from gateway_guard.upstream.client import Upstream
from gateway_guard.upstream.probe import Prober, Reading
from gateway_guard.upstream.saturation import saturation_from_metrics
from tests.telemetry.conftest import chat, guard_settings, running_guard, samples, value

LANES = {"interactive": {"queue_size": 0}, "batch": {"queue_timeout": 0.1}}
UP = {"upstream": "default"}


def usage_of_stream(text: str) -> dict[str, int]:
    for line in text.splitlines():
        if line.startswith("data:") and '"usage"' in line:
            usage = json.loads(line[5:])["usage"]
            if usage:
                return dict(usage)
    raise AssertionError("no usage chunk in the stream")


async def scrape_until(client: httpx.AsyncClient, name: str, wanted: float) -> dict[Any, float]:
    """/metrics until the prober's reading shows ``wanted`` (it reads the upstream every 50 ms here)."""
    async with asyncio.timeout(5):
        while True:
            parsed = samples((await client.get("/metrics")).text)
            if value(parsed, name, **UP) == wanted:
                return parsed
            await asyncio.sleep(0.02)


async def test_counters_move_by_exactly_the_requests_sent_and_gauges_return_to_zero() -> None:
    sim = SimConfig(tokens_per_second=40.0, ttft=0.02)
    async with running_guard(max_inflight=1, sim=sim, lanes=LANES) as g:
        before = samples((await g.client.get("/metrics")).text)
        assert value(before, "gateway_guard_limit", **UP) == 1
        assert value(before, "gateway_guard_in_flight", upstream="default", lane="interactive") == 0

        headers = {"x-guard-lane": "interactive"}
        async with g.client.stream("POST", "/v1/chat/completions", json=chat(20), headers=headers) as long:
            chunks = long.aiter_text()
            body = await chunks.__anext__()
            during = await scrape_until(g.client, "gateway_guard_upstream_requests_processing", 1)
            full = await g.client.post("/v1/chat/completions", json=chat(), headers=headers)
            late = await g.client.post("/v1/chat/completions", json=chat(), headers={"x-guard-lane": "batch"})
            lost = await g.client.post("/v1/chat/completions", json=chat(), headers={"x-guard-lane": "nope"})
            async for text in chunks:
                body += text
        plain = await g.client.post(
            "/v1/chat/completions", json=chat(3, stream=False), headers={"x-guard-lane": "batch"}
        )
        models = await g.client.get("/v1/models")
        after = samples((await g.client.get("/metrics")).text)

    assert (full.status_code, late.status_code, lost.status_code) == (429, 429, 400)
    assert (plain.status_code, models.status_code) == (200, 200)

    # while the long stream ran: the guard and the upstream both saw exactly one request in flight
    assert value(during, "gateway_guard_in_flight", upstream="default", lane="interactive") == 1
    assert value(during, "gateway_guard_upstream_requests_processing", **UP) == 1
    assert value(during, "gateway_guard_upstream_metrics_up", **UP) == 1

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    expected = {
        ("default", "interactive", "admitted"): 1,
        ("default", "interactive", "rejected_queue_full"): 1,
        ("default", "batch", "expired_deadline"): 1,
        ("none", "none", "rejected_client"): 1,
        ("default", "batch", "admitted"): 1,
        ("default", "batch", "passthrough"): 1,
    }
    for (upstream, lane, outcome), n in expected.items():
        got = moved("gateway_guard_requests_total", upstream=upstream, lane=lane, outcome=outcome)
        assert got == n, (upstream, lane, outcome, got)
    every = [k for k in after if k[0] == "gateway_guard_requests_total"]
    assert sum(after[k] - before.get(k, 0.0) for k in every) == 6, "and nothing else moved"

    for lane in ("interactive", "batch"):
        assert moved("gateway_guard_queue_wait_seconds_count", upstream="default", lane=lane) == 1
        assert moved("gateway_guard_upstream_latency_seconds_count", upstream="default", lane=lane) == 1
    assert moved("gateway_guard_time_to_first_token_seconds_count", upstream="default", lane="interactive") == 1
    assert moved("gateway_guard_time_to_first_token_seconds_count", upstream="default", lane="batch") == 0, (
        "a non-streamed answer has no time to first token"
    )
    streamed, whole = usage_of_stream(body), plain.json()["usage"]
    assert streamed["completion_tokens"] == 20
    profile = {"upstream": "default", "profile": "anonymous"}
    assert moved("gateway_guard_output_tokens_total", **profile) == 20 + whole["completion_tokens"]
    assert moved("gateway_guard_input_tokens_total", **profile) == streamed["prompt_tokens"] + whole["prompt_tokens"]

    for lane in ("interactive", "batch"):
        assert value(after, "gateway_guard_in_flight", upstream="default", lane=lane) == 0
        assert value(after, "gateway_guard_queued", upstream="default", lane=lane) == 0
    assert value(after, "gateway_guard_upstream_requests_processing", **UP) == 0


async def test_each_app_has_its_own_registry() -> None:
    async with running_guard(sim=SimConfig(mode="zero")) as one, running_guard(sim=SimConfig(mode="zero")) as two:
        assert (await one.client.post("/v1/chat/completions", json=chat())).status_code == 200
        first = samples((await one.client.get("/metrics")).text)
        second = samples((await two.client.get("/metrics")).text)
    labels = {"upstream": "default", "lane": "batch", "outcome": "admitted"}
    assert value(first, "gateway_guard_requests_total", **labels) == 1
    assert value(second, "gateway_guard_requests_total", **labels) == 0


async def test_an_upstream_without_metrics_reads_as_down_and_adds_no_gauges() -> None:
    async def no_metrics(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"not here"})

    app = build_app(parse_settings(guard_settings("http://upstream.test")), transport=httpx.ASGITransport(no_metrics))
    state: GuardState = app.state.guard
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guard.test") as client:
            response = await client.get("/metrics")
    finally:
        await state.aclose()
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    parsed = samples(response.text)
    assert value(parsed, "gateway_guard_upstream_metrics_up", **UP) == 0
    assert not [k for k in parsed if k[0].startswith("gateway_guard_upstream_requests_")]


async def test_upstream_saturation_comes_from_the_probers_last_reading() -> None:
    llamacpp = "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 3\n"
    llamacpp += "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 5\n"
    vllm = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="a"} 2\nvllm:num_requests_running{model_name="b"} 1\n'
        '# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="a"} 7\n'
        'vllm:kv_cache_usage_perc{model_name="a"} 0.25\n'
    )
    probers = {}
    for name, text in (("llama", llamacpp), ("vllm", vllm), ("other", "process_cpu_seconds_total 12\n")):
        prober = Prober(Upstream(UpstreamSettings(name=name, url="http://127.0.0.1:9")))
        prober.last = Reading(time.monotonic(), True, "GET /health -> 200", saturation_from_metrics(text))
        probers[name] = prober
    parsed = samples((await GuardMetrics({}, probers).render()).decode())
    assert value(parsed, "gateway_guard_upstream_requests_processing", upstream="llama") == 3
    assert value(parsed, "gateway_guard_upstream_requests_deferred", upstream="llama") == 5
    assert value(parsed, "gateway_guard_upstream_requests_processing", upstream="vllm") == 3
    assert value(parsed, "gateway_guard_upstream_requests_deferred", upstream="vllm") == 7
    assert value(parsed, "gateway_guard_upstream_kv_cache_usage_ratio", upstream="vllm") == 0.25
    assert value(parsed, "gateway_guard_upstream_metrics_up", upstream="other") == 0
    assert value(parsed, "gateway_guard_upstream_ready", upstream="other") == 1
    assert 0 <= value(parsed, "gateway_guard_upstream_reading_age_seconds", upstream="other") < 60
    for prober in probers.values():
        await prober.upstream.aclose()


def test_profile_labels_stay_few_whatever_clients_send() -> None:
    label = ProfileLabels(["worker1"], max_extra=2)
    assert [label(p) for p in ("worker1", "a", "b", "c", "a", None)] == ["worker1", "a", "b", "other", "a", "none"]


async def test_gauges_are_read_at_scrape_time_from_the_gate() -> None:
    async with running_guard(max_inflight=2, sim=SimConfig(mode="zero")) as g:
        gate = g.state.gates["default"]
        permit = await gate.acquire("batch", "anonymous")
        try:
            held = samples((await g.client.get("/metrics")).text)
        finally:
            permit.release()
        freed = samples((await g.client.get("/metrics")).text)
    assert value(held, "gateway_guard_in_flight", upstream="default", lane="batch") == 1
    assert value(held, "gateway_guard_profile_in_flight", upstream="default", profile="anonymous") == 1
    assert value(freed, "gateway_guard_in_flight", upstream="default", lane="batch") == 0


async def test_a_scrape_flood_reuses_the_text_until_something_changes() -> None:
    async with running_guard(max_inflight=2, sim=SimConfig(mode="zero"), probe_interval=3600) as g:
        registry = g.state.telemetry.metrics_registry
        first = await registry.render()
        assert all([await registry.render() is first for _ in range(150)])  # nothing changed: no rendering
        gate = g.state.gates["default"]
        permit = await gate.acquire("batch", "anonymous")  # a change at the gate: a new text at once
        held = await registry.render()
        assert held is not first
        assert value(samples(held.decode()), "gateway_guard_in_flight", upstream="default", lane="batch") == 1
        permit.release()
        await g.client.post("/v1/chat/completions", json=chat(stream=False))  # a request that ended: new text
        after = samples((await registry.render()).decode())
        labels = {"upstream": "default", "lane": "batch", "outcome": "admitted"}
        assert value(after, "gateway_guard_requests_total", **labels) == 1


def test_the_cluster_gauges_show_each_replicas_held_and_idle_leases() -> None:
    """``[cluster]``: what this replica holds, the leases it keeps idle for its next requests (counted in the
    shared cap, so Redis shows more leases than requests), and every live replica's leases."""
    from prometheus_client import CollectorRegistry, generate_latest

    from gateway_guard.admission.cluster.link import FALLBACK, SHARED, ClusterStatus
    from gateway_guard.telemetry.metrics import ClusterCollector

    statuses = {
        "gpu": ClusterStatus(
            mode=SHARED, reason="", allowance=None, replica="a", held=3, in_flight=6, replicas={"a": 5, "b": 1}, idle=2
        ),
        "cpu": ClusterStatus(
            mode=FALLBACK, reason="redis gone", allowance=1, replica="a", held=1, in_flight=1, replicas={"a": 1}
        ),
    }
    registry = CollectorRegistry()
    registry.register(ClusterCollector(lambda: statuses))
    parsed = samples(generate_latest(registry).decode())
    assert parsed[("gateway_guard_cluster_shared", frozenset({"upstream": "gpu"}.items()))] == 1
    assert parsed[("gateway_guard_cluster_shared", frozenset({"upstream": "cpu"}.items()))] == 0
    assert value(parsed, "gateway_guard_cluster_held", upstream="gpu") == 3
    assert value(parsed, "gateway_guard_cluster_idle_leases", upstream="gpu") == 2
    assert parsed[("gateway_guard_cluster_idle_leases", frozenset({"upstream": "cpu"}.items()))] == 0
    assert value(parsed, "gateway_guard_cluster_replica_leases", upstream="gpu", replica="b") == 1
