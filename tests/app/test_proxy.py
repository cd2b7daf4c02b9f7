from __future__ import annotations

import asyncio
import json

import pytest

from gateway_guard.admission.gate import Gate
from gateway_guard.sim import SimConfig, build_sim_app
from tests.app.conftest import EchoUpstream, guard_client, settings_for

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def fast_sim() -> object:
    return build_sim_app(SimConfig(mode="zero"))


def assert_openai_error(body: dict[str, object], code: str) -> None:
    err = body["error"]
    assert isinstance(err, dict)
    assert err["code"] == code and err["message"] and err["type"]


async def assert_all_free(client: object) -> None:
    cap = (await client.get("/guard/capacity")).json()  # type: ignore[attr-defined]
    for up in cap["upstreams"].values():
        assert up["in_flight"] == 0 and up["queued"] == 0 and up["free"] == up["limit"]


async def test_chat_completion_passes_through_with_usage() -> None:
    async with guard_client(settings_for(), fast_sim()) as (client, state):
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        assert r.json()["object"] == "chat.completion"
        assert r.json()["usage"]["completion_tokens"] == 4
        assert r.headers["x-guard-lane"] == "batch"
        assert r.headers["x-guard-upstream"] == "default"
        await assert_all_free(client)


async def test_streamed_answer_is_relayed_as_sse() -> None:
    async with guard_client(settings_for(), fast_sim()) as (client, _):
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": "sim", "messages": [', "invalid_json"),
        (b'{"model": "\xff\xfe"}', "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"model": 3}', "bad_request"),
    ],
)
async def test_bad_bodies_are_a_clear_400(body: bytes, code: str) -> None:
    upstream = EchoUpstream()
    async with guard_client(settings_for(), upstream) as (client, _):
        r = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert_openai_error(r.json(), code)
        assert upstream.requests == []
        await assert_all_free(client)


async def test_huge_body_is_413_under_the_configured_limit() -> None:
    upstream = EchoUpstream()
    settings = settings_for(server={"max_body_bytes": 1024 * 1024})
    async with guard_client(settings, upstream) as (client, _):
        big = b"x" * (50 * 1024 * 1024)
        r = await client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert_openai_error(r.json(), "payload_too_large")

        async def chunked():  # no Content-Length: the limit is enforced while reading
            for _ in range(50):
                yield b"x" * (1024 * 1024)

        r = await client.post("/v1/chat/completions", content=chunked())
        assert r.status_code == 413
        assert upstream.requests == []
        await assert_all_free(client)


async def test_unknown_lane_is_400_naming_the_lanes() -> None:
    async with guard_client(settings_for(), fast_sim()) as (client, _):
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"x-guard-lane": "bulk"})
        assert r.status_code == 400
        assert_openai_error(r.json(), "unknown_lane")
        assert "interactive" in r.json()["error"]["message"]


async def test_no_default_lane_means_the_lane_must_be_named() -> None:
    async with guard_client(settings_for(server={"default_lane": ""}), fast_sim()) as (client, _):
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 400
        assert_openai_error(r.json(), "unknown_lane")
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"x-guard-lane": "interactive"})
        assert r.status_code == 200 and r.headers["x-guard-lane"] == "interactive"


async def test_keys_decide_profile_and_never_reach_the_upstream() -> None:
    upstream = EchoUpstream()
    settings = settings_for(
        upstreams={"default": {"api_key": "sk-upstream-secret"}},
        profiles={"worker1": {"lane": "batch"}, "chat": {"lane": "interactive"}},
        keys={"worker1": "sk-worker1", "chat": "sk-chat"},
    )
    async with guard_client(settings, upstream) as (client, _):
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 401
        assert_openai_error(r.json(), "invalid_api_key")
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-nope"})
        assert r.status_code == 401
        assert "sk-nope" not in r.text
        r = await client.post("/p/chat/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-worker1"})
        assert r.status_code == 403
        assert upstream.requests == []
        r = await client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"authorization": "Bearer sk-chat", "x-guard-lane": "batch"},  # key's profile fixes the lane
        )
        assert r.status_code == 200 and r.headers["x-guard-lane"] == "interactive"
        assert upstream.header(0, "authorization") == "Bearer sk-upstream-secret"
        assert upstream.header(0, "x-guard-lane") is None


async def test_profile_path_prefix_is_stripped_and_names_the_profile() -> None:
    upstream = EchoUpstream()
    settings = settings_for(profiles={"nightly": {"lane": "batch", "max_inflight": 1}})
    async with guard_client(settings, upstream) as (client, state):
        r = await client.post("/p/nightly/v1/chat/completions?x=1", json=CHAT)
        assert r.status_code == 200
        assert r.json()["path"] == "/v1/chat/completions" and r.json()["query"] == "x=1"
        gate = state.gates["default"]
        permit = await gate.acquire("batch", "nightly")
        cap = (await client.get("/guard/capacity")).json()
        assert cap["upstreams"]["default"]["profiles"]["nightly"] == {
            "limit": 1,
            "in_flight": 1,
            "queued": 0,
            "free": 0,
        }
        permit.release()


async def test_hop_by_hop_headers_stop_at_the_guard() -> None:
    upstream = EchoUpstream()
    async with guard_client(settings_for(), upstream) as (client, _):
        r = await client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"connection": "keep-alive, x-drop-me", "x-drop-me": "1", "te": "trailers", "x-keep": "yes"},
        )
        assert r.status_code == 200
        seen = dict(r.json()["headers"])
        assert "x-drop-me" not in seen and "te" not in seen
        assert "x-drop-me" not in seen.get("connection", "")  # httpx sends its own keep-alive, not the client's
        assert seen["x-keep"] == "yes"
        assert "x-secret-hop" not in r.headers and r.headers["x-upstream"] == "echo"


async def test_metadata_calls_take_no_generation_permit() -> None:
    settings = settings_for(upstreams={"default": {"max_inflight": 1}}, lanes={"batch": {"queue_size": 0}})
    async with guard_client(settings, fast_sim()) as (client, state):
        held = await state.gates["default"].acquire("interactive", "other")
        assert (await client.get("/v1/models")).status_code == 200
        assert (await client.get("/v1/models/sim")).status_code == 200
        assert (await client.post("/api/show", json={"model": "sim"})).status_code == 200
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 429
        held.release()


@pytest.mark.parametrize(("configured", "status"), [({}, 429), ({"refusal_status": 503}, 503)])
async def test_full_queue_is_refused_with_retry_after_naming_the_lane(configured: dict[str, int], status: int) -> None:
    lanes = {"batch": {"queue_size": 0, **configured}}
    settings = settings_for(upstreams={"default": {"max_inflight": 1}}, lanes=lanes)
    async with guard_client(settings, fast_sim()) as (client, state):
        held = await state.gates["default"].acquire("batch", "p")
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == status
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["lane"] == "batch"
        assert_openai_error(r.json(), "queue_full")
        held.release()
        await assert_all_free(client)


async def test_profile_queue_limit_is_429() -> None:
    settings = settings_for(upstreams={"default": {"max_inflight": 1}}, profiles={"w": {"max_queued": 0}})
    async with guard_client(settings, fast_sim()) as (client, state):
        held = await state.gates["default"].acquire("batch", "x")
        r = await client.post("/p/w/v1/chat/completions", json=CHAT)
        assert r.status_code == 429 and "retry-after" in r.headers
        assert_openai_error(r.json(), "profile_queue_full")
        held.release()


async def test_queued_batch_request_is_held_until_a_slot_frees() -> None:
    settings = settings_for(upstreams={"default": {"max_inflight": 1}})
    async with guard_client(settings, fast_sim()) as (client, state):
        gate = state.gates["default"]
        held = await gate.acquire("interactive", "p")
        request = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
        for _ in range(200):
            if gate.snapshot().queued == 1:
                break
            await asyncio.sleep(0.005)
        assert gate.snapshot().queued == 1 and not request.done()
        held.release()
        r = await request
        assert r.status_code == 200
        await assert_all_free(client)


async def test_unknown_path_and_admin_only_ollama_paths() -> None:
    upstream = EchoUpstream()
    async with guard_client(settings_for(server={"admin_token": "t0k"}), upstream) as (client, _):
        assert (await client.get("/metrics-of-upstream")).status_code == 404
        r = await client.post("/api/pull", json={"model": "llama3"})
        assert r.status_code == 403
        r = await client.post("/api/pull", json={"model": "llama3"}, headers={"x-guard-admin-token": "t0k"})
        assert r.status_code == 200 and upstream.requests[-1]["path"] == "/api/pull"


async def test_ollama_native_chat_passes_through() -> None:
    sim = build_sim_app(SimConfig(mode="zero"))
    async with guard_client(settings_for(), sim) as (client, _):
        r = await client.post("/api/chat", json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        lines = [json.loads(line) for line in r.text.splitlines() if line.strip()]
        assert lines[-1]["done"] is True and len(lines) > 1


async def test_requests_route_by_model_to_their_upstream() -> None:
    a, b = EchoUpstream(), EchoUpstream()

    async def router(scope, receive, send):  # type: ignore[no-untyped-def]
        target = a if scope["server"][0] == "a.test" else b
        await target(scope, receive, send)

    settings = settings_for(
        upstreams={
            "default": {"url": "http://a.test", "models": ["small"]},
            "big": {"url": "http://b.test", "models": ["large"]},
        }
    )
    async with guard_client(settings, router) as (client, _):
        r = await client.post("/v1/chat/completions", json={**CHAT, "model": "large"})
        assert r.status_code == 200 and r.headers["x-guard-upstream"] == "big" and len(b.requests) == 1
        r = await client.post("/v1/chat/completions", json={**CHAT, "model": "small"})
        assert r.headers["x-guard-upstream"] == "default" and len(a.requests) == 1
        r = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        assert r.status_code == 404 and "large" in r.json()["error"]["message"]


async def test_upstream_down_holds_the_request_until_its_deadline_then_429_and_frees_the_permit() -> None:
    settings = settings_for(url="http://127.0.0.1:9", lanes={"batch": {"queue_timeout": 1.0}})
    async with guard_client(settings) as (client, state):
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert_openai_error(r.json(), "queue_deadline_exceeded")
        assert "not ready" in r.json()["error"]["message"] and "127.0.0.1" not in r.text
        assert state.probers["default"].state == "down"
        capacity = (await client.get("/guard/capacity")).json()
        assert capacity["free"] == 0 and capacity["upstreams"]["default"]["in_flight"] == 0
        ready = await client.get("/guard/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        models = await client.get("/v1/models")  # no GPU work: not held, a 502 at once
        assert models.status_code == 502 and "127.0.0.1" not in models.text


async def test_admin_can_change_a_limit_live() -> None:
    async with guard_client(settings_for(server={"admin_token": "t0k"}), fast_sim()) as (client, state):
        r = await client.post("/guard/upstreams/default/limit", json={"limit": 7})
        assert r.status_code == 403
        r = await client.post(
            "/guard/upstreams/default/limit", json={"limit": 7}, headers={"x-guard-admin-token": "t0k"}
        )
        assert r.status_code == 200 and r.json()["limit"] == 7
        gate = state.gates["default"]
        assert isinstance(gate, Gate) and gate.limit == 7
        r = await client.post(
            "/guard/upstreams/default/limit", json={"limit": 0}, headers={"x-guard-admin-token": "t0k"}
        )
        assert r.status_code == 400
        r = await client.post("/guard/upstreams/nope/limit", json={"limit": 2}, headers={"x-guard-admin-token": "t0k"})
        assert r.status_code == 404


async def test_capacity_reports_batch_room_at_top_level() -> None:
    settings = settings_for(upstreams={"default": {"max_inflight": 4}})
    async with guard_client(settings, fast_sim()) as (client, state):
        cap = (await client.get("/guard/capacity")).json()
        assert cap["free"] == 3  # headroom 1: batch may hold 3 of 4
        assert cap["lanes"]["interactive"]["free"] == 4
        held = await state.gates["default"].acquire("batch", "p")
        cap = (await client.get("/guard/capacity")).json()
        assert cap["free"] == 2 and cap["upstreams"]["default"]["in_flight"] == 1
        held.release()
        assert (await client.get("/guard/health")).json() == {"status": "ok"}


async def test_no_cookie_jar_carries_one_clients_cookie_to_another() -> None:
    upstream = EchoUpstream()  # answers every request with Set-Cookie: session=alice-secret
    async with guard_client(settings_for(), upstream) as (client, _):
        first = await client.post("/v1/chat/completions", json=CHAT)
        assert "alice-secret" in first.headers["set-cookie"]  # relayed to the client it was meant for
        client.cookies.clear()  # the next caller has no cookie of its own
        await client.post("/v1/chat/completions", json=CHAT)
        assert upstream.header(1, "cookie") is None
