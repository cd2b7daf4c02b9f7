"""Reading an upstream's own load: llama.cpp and vLLM /metrics text, Ollama /api/ps, and the prober loop.

llama.cpp's text is what the real server (xllamacpp) printed under load; vLLM's follows its documented names
(no vLLM can run here, FACTS.md); Ollama is an emulation of ``/api/ps`` (no Ollama server can be had here).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from gateway_guard.settings import UpstreamSettings
from gateway_guard.upstream.client import Upstream
from gateway_guard.upstream.probe import Prober, Reading
from gateway_guard.upstream.saturation import (
    Saturation,
    parse_prometheus,
    saturation_from_metrics,
    saturation_from_ollama_ps,
)

LLAMA = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 290
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 4
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 6
"""

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 12.0
vllm:num_requests_running{engine="1",model_name="qwen"} 4.0
vllm:num_requests_waiting{engine="0",model_name="qwen"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="qwen"} 0.93
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="qwen"} 0.0
vllm:time_to_first_token_seconds_sum{model_name="qwen"} 1.5e+01 1700000000000
"""


def test_prometheus_text_is_summed_over_label_sets_and_tolerates_timestamps() -> None:
    values = parse_prometheus(VLLM + "garbage line\nname_without_value\n")
    assert values["vllm:num_requests_running"] == 16.0
    assert values["vllm:time_to_first_token_seconds_sum"] == 15.0
    assert "garbage" not in values


def test_llamacpp_metrics() -> None:
    assert saturation_from_metrics(LLAMA) == Saturation(source="llama.cpp /metrics", waiting=6, running=4)


def test_vllm_metrics_with_kv_cache_and_the_pre_v1_name() -> None:
    assert saturation_from_metrics(VLLM) == Saturation(
        source="vLLM /metrics", waiting=3, running=16, kv_cache_usage=0.93
    )
    old = VLLM.replace("kv_cache_usage_perc", "gpu_cache_usage_perc")
    sat = saturation_from_metrics(old)
    assert sat is not None and sat.kv_cache_usage == 0.93


def test_metrics_of_neither_server_say_nothing() -> None:
    assert saturation_from_metrics("process_cpu_seconds_total 3.2\n") is None


def test_ollama_ps_reports_a_model_partly_outside_vram() -> None:
    in_vram = {"models": [{"name": "qwen3:8b", "size": 6_000_000_000, "size_vram": 6_000_000_000}]}
    spilled = {"models": [{"name": "qwen3:32b", "size": 21_000_000_000, "size_vram": 15_000_000_000}]}
    ok = saturation_from_ollama_ps(in_vram)
    assert ok == Saturation(source="Ollama /api/ps", running=1, memory_pressure=False)
    bad = saturation_from_ollama_ps(spilled)
    assert bad is not None and bad.memory_pressure
    assert saturation_from_ollama_ps({"error": "x"}) is None


class FakeServer:
    """An in-process upstream: answers the probe paths it was given, 404 for the rest; counts calls."""

    def __init__(self, pages: dict[str, str]) -> None:
        self.pages = pages
        self.calls: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls.append(scope["path"])
        body = self.pages.get(scope["path"])
        status = 200 if body is not None else 404
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": (body or "not found").encode()})


def upstream(app: Any) -> Upstream:
    return Upstream(UpstreamSettings(name="gpu", url="http://up.test"), transport=httpx.ASGITransport(app=app))


async def test_auto_finds_llamacpp_and_keeps_to_it() -> None:
    server = FakeServer({"/metrics": LLAMA})
    up = upstream(server)
    prober = Prober(up, lambda _s: None)
    assert (await prober.probe_once()) == Saturation(source="llama.cpp /metrics", waiting=6, running=4)
    assert prober.kind == "llamacpp"
    await prober.probe_once()
    assert server.calls == ["/metrics", "/metrics"]
    await up.aclose()


async def test_auto_falls_back_to_ollama_ps() -> None:
    server = FakeServer({"/api/ps": json.dumps({"models": []})})
    up = upstream(server)
    prober = Prober(up, lambda _s: None)
    assert (await prober.probe_once()) == Saturation(source="Ollama /api/ps", running=0)
    assert prober.kind == "ollama"
    await up.aclose()


async def test_a_server_without_metrics_or_down_reports_nothing() -> None:
    up = upstream(FakeServer({}))
    assert await Prober(up, lambda _s: None).probe_once() is None
    await up.aclose()
    down = Upstream(UpstreamSettings(name="gpu", url="http://127.0.0.1:9", connect_timeout=0.5))
    assert await Prober(down, lambda _s: None, kind="llamacpp").probe_once() is None
    await down.aclose()


async def test_the_loop_hands_each_reading_on_until_stopped() -> None:
    up = upstream(FakeServer({"/metrics": VLLM, "/health": "ok"}))
    seen: list[Reading] = []
    got_two = asyncio.Event()

    def on_reading(reading: Reading) -> None:
        seen.append(reading)
        if len(seen) == 2:
            got_two.set()

    prober = Prober(up, on_reading, kind="vllm", interval=0.01)
    prober.start()
    prober.start()  # idempotent
    async with asyncio.timeout(5):
        await got_two.wait()
    await prober.stop()
    assert all(r.ready and r.saturation is not None and r.saturation.source == "vLLM /metrics" for r in seen)
    await up.aclose()


async def test_readers_of_the_last_reading_never_call_the_upstream() -> None:
    server = FakeServer({"/metrics": LLAMA, "/health": "ok"})
    up = upstream(server)
    prober = Prober(up, kind="llamacpp", interval=3600)
    prober.start()
    readings = await asyncio.gather(*(prober.latest() for _ in range(150)))  # 150 scrapes at once
    await prober.stop()
    assert all(r is readings[0] and r is not None and r.ready for r in readings)
    assert server.calls == ["/health", "/metrics"]  # one reading, whoever asked
    await up.aclose()


async def test_probe_off_reads_readiness_only() -> None:
    server = FakeServer({"/metrics": LLAMA, "/health": "ok"})
    up = upstream(server)
    reading = await Prober(up, kind="off").read()
    assert (reading.ready, reading.saturation, server.calls) == (True, None, ["/health"])
    await up.aclose()
