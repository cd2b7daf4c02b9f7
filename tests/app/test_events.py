"""GET /guard/events (SSE over a real socket) and the /guard/reservations endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from gateway_guard.admission.gate import Gate
from gateway_guard.app.events import EventHub
from gateway_guard.app.factory import build_app
from gateway_guard.app.state import GuardState
from tests.app.conftest import settings_for
from tests.support.inprocess import serve_in_process

TOKEN = "admin-secret"
ADMIN = {"x-guard-admin-token": TOKEN}


@asynccontextmanager
async def guard(heartbeat_s: float = 30.0, slots: int = 2) -> AsyncIterator[tuple[str, GuardState, EventHub, Any]]:
    app = build_app(settings_for(server={"admin_token": TOKEN}, upstreams={"default": {"max_inflight": slots}}))
    hub: EventHub = app.state.events
    hub.heartbeat_s = heartbeat_s
    state: GuardState = app.state.guard
    try:
        async with serve_in_process(app) as url:
            yield url, state, hub, app
    finally:
        await state.aclose()


class Stream:
    """One SSE client: ``next()`` gives the next event as (name, data) or ("comment", text)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self) -> tuple[str, Any]:
        event, data = "message", []
        async for line in self._lines:
            if line.startswith(":"):
                return "comment", line[1:].strip()
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                return event, json.loads("\n".join(data))
        raise EOFError


@asynccontextmanager
async def events(client: httpx.AsyncClient, url: str) -> AsyncIterator[Stream]:
    async with client.stream("GET", f"{url}/guard/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Stream(response)


def listeners(gate: Any) -> int:
    return len(gate._listeners)


async def test_first_event_is_the_capacity_and_a_freed_slot_is_sent_at_once() -> None:
    async with guard() as (url, state, hub, _), httpx.AsyncClient(timeout=10) as client:
        gate = state.gates["default"]
        assert isinstance(gate, Gate)
        others = listeners(gate)  # other parts of the guard may watch the gate too
        reservations = state_reservations(hub)
        assert listeners(reservations) == 0
        permit = await gate.acquire("batch", "worker1")
        capacity = (await client.get(f"{url}/guard/capacity")).json()
        async with events(client, url) as stream:
            name, first = await stream.next()
            assert name == "capacity"
            assert first["upstreams"]["default"]["in_flight"] == 1 and first["reserved"] == 0
            assert {k: first[k] for k in ("free", "lanes")} == {k: capacity[k] for k in ("free", "lanes")}
            assert listeners(gate) == others + 1 and listeners(reservations) == 1
            loop = asyncio.get_running_loop()
            freed_at = loop.time()
            permit.release()
            async with asyncio.timeout(5):  # an upper bound: the heartbeat is 30 s away
                name, after = await stream.next()
            latency = loop.time() - freed_at
            assert name == "capacity"
            assert after["upstreams"]["default"]["in_flight"] == 0  # caused by the release
            assert after["free"] == first["free"] + 1
            assert latency < 0.1, f"event {latency * 1000:.0f} ms after the release"
        async with asyncio.timeout(5):
            while hub.listeners:
                await asyncio.sleep(0.01)  # the server's side of the disconnect runs in its own task
        assert listeners(gate) == others and listeners(reservations) == 0


def state_reservations(hub: EventHub) -> Any:
    return next(s for s in hub._sources() if not isinstance(s, Gate))


async def test_bursts_are_coalesced_and_each_change_builds_one_snapshot() -> None:
    async with guard() as (url, state, hub, _), httpx.AsyncClient(timeout=10) as client:
        gate = state.gates["default"]
        async with events(client, url) as stream:
            await stream.next()
            for i in range(2):
                (await gate.acquire("batch", f"w{i}")).release()
            seen = []
            async with asyncio.timeout(5):
                while True:
                    _, data = await stream.next()
                    seen.append(data["upstreams"]["default"]["in_flight"])
                    if seen[-1] == 0:
                        break
            assert len(seen) <= 2  # four changes: the first at once, the rest in one coalesced event
            assert hub.sent == len(seen)


async def test_heartbeat_comment_when_nothing_changes() -> None:
    async with (guard(heartbeat_s=0.05) as (url, _, _, _), httpx.AsyncClient(timeout=10) as client,
                events(client, url) as stream):
        assert (await stream.next())[0] == "capacity"
        async with asyncio.timeout(5):
            assert await stream.next() == ("comment", "heartbeat")


async def test_a_hundred_idle_listeners_all_hear_one_change() -> None:
    async with guard() as (url, state, hub, _):
        gate = state.gates["default"]
        others = listeners(gate)
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client, contextlib.AsyncExitStack() as stack:
            streams = [await stack.enter_async_context(events(client, url)) for _ in range(100)]
            await asyncio.gather(*(s.next() for s in streams))
            assert hub.listeners == 100 and listeners(gate) == others + 1  # one watch, whatever the number
            built = hub.sent
            permit = await gate.acquire("batch", "w")
            async with asyncio.timeout(10):
                got = await asyncio.gather(*(s.next() for s in streams))
            assert all(d["upstreams"]["default"]["in_flight"] == 1 for _, d in got)
            assert hub.sent == built + 1
            permit.release()
        async with asyncio.timeout(10):
            while hub.listeners:
                await asyncio.sleep(0.01)
        assert listeners(gate) == others


async def test_reservations_endpoints_and_their_events() -> None:
    async with guard(slots=4) as (url, state, hub, app), httpx.AsyncClient(timeout=10) as client:
        free = (await client.get(f"{url}/guard/capacity")).json()["free"]
        assert free >= 2
        async with events(client, url) as stream:
            await stream.next()
            r = await client.post(f"{url}/guard/reservations", json={"profile": "w1", "n": 1, "ttl_seconds": 60},
                                  headers=ADMIN)
            assert r.status_code == 201, r.text
            booked = r.json()
            assert booked["profile"] == "w1" and booked["n"] == 1 and 59 < booked["expires_in"] <= 60
            async with asyncio.timeout(5):
                _, data = await stream.next()
            assert data["reserved"] == 1 and data["free"] == free - 1
            many = await client.post(f"{url}/guard/reservations", json={"profile": "w2", "n": 99, "ttl_seconds": 5},
                                     headers=ADMIN)
            assert many.status_code == 201 and many.json()["n"] == free - 1  # no more than the room left
            full = await client.post(f"{url}/guard/reservations", json={"profile": "w3", "n": 1, "ttl_seconds": 5},
                                     headers=ADMIN)
            assert full.status_code == 409 and full.json()["error"]["code"] == "no_free_slot"
            listed = (await client.get(f"{url}/guard/reservations", headers=ADMIN)).json()
            assert listed["reserved"] == free and {r["profile"] for r in listed["reservations"]} == {"w1", "w2"}
            assert app.state.reservations.consume("default", "w1") is True
            assert (await client.delete(f"{url}/guard/reservations/{many.json()['id']}", headers=ADMIN)).status_code \
                == 204
            gone = await client.delete(f"{url}/guard/reservations/{booked['id']}", headers=ADMIN)
            assert gone.status_code == 404  # consumed
            async with asyncio.timeout(5):
                while True:
                    _, data = await stream.next()
                    if data["reserved"] == 0:
                        break
            assert data["free"] == free


@pytest.mark.parametrize("body", [
    b"not json", b"[1]", b'{"n": 1, "ttl_seconds": 5}', b'{"profile": "", "n": 1, "ttl_seconds": 5}',
    b'{"profile": "w", "n": 0, "ttl_seconds": 5}', b'{"profile": "w", "n": true, "ttl_seconds": 5}',
    b'{"profile": "w", "n": 1.5, "ttl_seconds": 5}', b'{"profile": "w", "n": 1, "ttl_seconds": 0}',
    b'{"profile": "w", "n": 1, "ttl_seconds": "5"}', b'{"profile": "w", "n": 1, "ttl_seconds": 1e999}',
    b'{"profile": "w", "n": 1, "ttl_seconds": 5, "upstream": "nope"}',
])
async def test_bad_reservation_bodies_are_400(body: bytes) -> None:
    app = build_app(settings_for(server={"admin_token": TOKEN}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://guard.test") as client:
        r = await client.post("/guard/reservations", content=body, headers=ADMIN)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["message"]
    await app.state.guard.aclose()


async def test_reservations_need_the_admin_token() -> None:
    app = build_app(settings_for())  # no token configured: nobody is admin
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://guard.test") as client:
        body = {"profile": "w", "n": 1, "ttl_seconds": 5}
        assert (await client.post("/guard/reservations", json=body, headers=ADMIN)).status_code == 403
        assert (await client.get("/guard/reservations")).status_code == 403
        assert (await client.delete("/guard/reservations/r1")).status_code == 403
    await app.state.guard.aclose()


async def test_closing_the_hub_ends_open_streams() -> None:
    """What the guard does on SIGTERM, so that uvicorn need not wait for the streams to end."""
    async with guard() as (url, _, hub, _), httpx.AsyncClient(timeout=10) as client, events(client, url) as stream:
        await stream.next()
        hub.close()
        async with asyncio.timeout(5):
            with pytest.raises(EOFError):
                await stream.next()
