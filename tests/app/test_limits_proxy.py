"""Rate limits and the token budget through the proxy: tokens charged after the fact, for a client that left too."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from gateway_guard.app.factory import build_app
from gateway_guard.app.state import GuardState
from tests.app.conftest import guard_client, settings_for
from tests.support.inprocess import serve_in_process

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 390}], "stream": True}).encode()
JSON = {"content-type": "application/json", "x-guard-profile": "w"}
CONTENT = b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'


def sse_with_usage(prompt: int, completion: int) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": CONTENT * 3, "more_body": True})
        usage = {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
        tail = b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    return app


class StallsAfterThreeTokens:
    """Streams three content chunks, then holds the stream open until the client hangs up."""

    def __init__(self) -> None:
        self.client_gone = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": CONTENT * 3, "more_body": True})
        await receive()  # http.disconnect
        self.client_gone.set()


def limited(url: str = "http://upstream.test", **profile: Any) -> Any:
    return settings_for(url, profiles={"w": profile}, lanes={"batch": {"queue_timeout": 2}})


async def test_tokens_from_the_streams_usage_are_charged_and_the_debt_is_a_429_with_retry_after() -> None:
    async with guard_client(limited(tokens_per_minute=1000), sse_with_usage(400, 1500)) as (client, state):
        first = await client.post("/v1/chat/completions", content=BODY, headers=JSON)
        assert first.status_code == 200
        assert state.rates.snapshot()["profile w"]["tokens_level"] == pytest.approx(1900, abs=1)
        second = await client.post("/v1/chat/completions", content=BODY, headers=JSON)
    assert second.status_code == 429
    error = second.json()["error"]
    assert error["code"] == "rate_limited" and "profile w" in error["message"]
    assert 50 <= int(second.headers["retry-after"]) <= 55  # 900 tokens of debt at 1000/min = 54 s


async def test_requests_per_minute_over_the_limit_is_a_429_naming_the_lane_and_retry_after() -> None:
    async with guard_client(limited(requests_per_minute=1), sse_with_usage(1, 1)) as (client, _state):
        assert (await client.post("/v1/chat/completions", content=BODY, headers=JSON)).status_code == 200
        second = await client.post("/v1/chat/completions", content=BODY, headers=JSON)
    assert second.status_code == 429
    assert second.json()["error"]["lane"] == "batch"
    assert int(second.headers["retry-after"]) == 60


async def test_a_client_that_leaves_mid_stream_is_charged_the_tokens_seen_so_far() -> None:
    upstream = StallsAfterThreeTokens()
    async with serve_in_process(upstream) as up_url:
        app = build_app(limited(up_url, tokens_per_minute=100))
        state: GuardState = app.state.guard
        try:
            async with serve_in_process(app) as guard_url, httpx.AsyncClient(base_url=guard_url) as client:
                async with client.stream("POST", "/v1/chat/completions", content=BODY, headers=JSON) as r:
                    seen = b""
                    async for chunk in r.aiter_raw():
                        seen += chunk
                        if seen.count(b"tok") >= 3:
                            break  # and hang up with the stream still open
                async with asyncio.timeout(5):
                    await upstream.client_gone.wait()
                    while state.gates["default"].snapshot().in_flight:
                        await asyncio.sleep(0.01)
        finally:
            await state.aclose()
    charged = (len(BODY) + 3) // 4 + 3  # no usage came: the prompt estimate + the content chunks counted
    assert state.rates.snapshot()["profile w"]["tokens_level"] == pytest.approx(charged, abs=3)  # leaks 1.7/s


async def test_the_capacity_endpoint_shows_the_token_budget() -> None:
    settings = settings_for(upstreams={"default": {"max_context_tokens": 5000}})
    async with guard_client(settings, sse_with_usage(100, 10)) as (client, _state):
        payload = (await client.get("/guard/capacity")).json()["upstreams"]["default"]
    assert (payload["tokens_in_flight"], payload["max_context_tokens"]) == (0, 5000)


async def test_an_adaptive_upstream_is_probed_from_start_until_close() -> None:
    metrics = b"llamacpp:requests_processing 4\nllamacpp:requests_deferred 6\n"

    async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        found = scope["path"] == "/metrics"
        await send({"type": "http.response.start", "status": 200 if found else 404, "headers": []})
        await send({"type": "http.response.body", "body": metrics if found else b""})

    adaptive = {"default": {"limit": "adaptive", "ceiling": 8, "probe_interval": 0.01}}
    settings = settings_for(upstreams=adaptive)
    async with guard_client(settings, upstream) as (client, state):
        limit = state.gates["default"].limit_source
        assert limit.limit == 8 and len(state.probers) == 1
        state.start()
        async with asyncio.timeout(5):
            while limit.limit == 8:
                await asyncio.sleep(0.01)
        assert limit.limit == 1 and "6 requests deferred" in limit.reason  # nothing of ours runs: the floor
        up = (await client.get("/guard/capacity")).json()["upstreams"]["default"]
        assert up["limit"] == 1 and "deferred" in up["limit_reason"]
        assert [h["limit"] for h in up["limit_history"]] == [8, 1]
    assert all(p._task is None for p in state.probers.values())  # stopped by aclose
