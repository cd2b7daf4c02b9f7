"""What the edge spends on an attacker, against a live ``gateway-guard`` process on 127.0.0.1 (raw sockets):
which connection goes at ``max_connections``, reads past ``server.read_rate``, a declared body that cannot fit
the body budget, a header flood on a kept-alive connection."""

from __future__ import annotations

import asyncio
import contextlib
import time

from gateway_guard.app.edge_room import HEAD_GRACE
from tests.integration.edge_support import (
    Guard,
    RecordingUpstream,
    closed_within,
    connections,
    edge_guard,
    raw_exchange,
    read_answer,
    request,
)

CHAT = "/v1/chat/completions"
SMALL_CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
MB = 1024 * 1024


async def test_at_max_connections_silent_and_slow_ones_go_before_kept_alive_clients() -> None:
    """20 slots: 4 clients that completed a request, 1 stuck in its headers, 15 silent. 16 newcomers that stay
    connected take the places of the silent ones and the slow one; the 4 kept-alive clients are served again on
    their connections."""
    server = {"max_connections": 20, "max_idle_connections": 20, "keep_alive_timeout": 60}
    health = request("GET", "/guard/health")
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server=server) as guard:
            async with connections(guard.port, 4) as kept, connections(guard.port, 1) as slow:
                for reader, writer in kept:
                    writer.write(health)
                    assert (await read_answer(reader)).status == 200
                slow[0][1].write(b"POST /v1/chat/completions HTTP/1.1\r\nx-slow: ")
                async with connections(guard.port, 15) as silent:
                    await asyncio.sleep(HEAD_GRACE + 0.2)  # the rule is about elapsed time: let the graces pass
                    async with connections(guard.port, 16) as newcomers:
                        for reader, writer in newcomers:
                            writer.write(health)
                            assert (await read_answer(reader)).status == 200
                        gone = await asyncio.gather(*(closed_within(r, 2.0) for r, _ in [*silent, *slow]))
                        assert gone == [True] * 16
                        for reader, writer in kept:  # still open, and served
                            writer.write(health)
                            assert (await read_answer(reader)).status == 200
            assert up.requests == []


async def test_a_newcomer_gets_503_only_when_every_connection_is_busy() -> None:
    """20 connections each in the middle of a request body: nothing to close, so the newcomer gets a 503."""
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server={"max_connections": 20}) as guard:
            head = request("POST", CHAT, {"content-type": "application/json", "content-length": "100"})
            async with connections(guard.port, 20) as busy:
                for _, writer in busy:
                    writer.write(head + b'{"mo')
                    await writer.drain()
                await asyncio.sleep(HEAD_GRACE + 0.2)  # not one of them is young any more
                answer = await raw_exchange(guard.port, request("GET", "/guard/health"), timeout=10)
                assert answer.status == 503 and answer.head.lower().count("retry-after: 1") == 1
                assert not any(await asyncio.gather(*(closed_within(r, 0.5) for r, _ in busy)))
            assert "503 from 127.0.0.1" in guard.log()
            assert up.requests == []


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, **headers: str) -> int:
    writer.write(request("GET", path, headers))
    answer = await read_answer(reader, timeout=10)
    if answer.status == 429:
        error = answer.json()["error"]
        assert error["code"] == "read_rate_limited" and error["type"] == "rate_limit_error"
        assert int(answer.head.lower().split("retry-after:", 1)[1].split("\r\n", 1)[0]) >= 1
    return answer.status


async def test_reads_past_read_rate_get_a_429_and_keep_their_connection() -> None:
    """read_rate 0.2/s (burst 1) on one kept-alive connection: one scrape, then 429s on the same connection,
    which still serves other requests; the metrics token and the admin token pass; each endpoint has its own
    bucket; pipelined reads past the rate end the connection."""
    server = {"read_rate": 0.2, "metrics_token": "m-t0k", "admin_token": "adm-t0k"}
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server=server) as guard:
            async with connections(guard.port, 1) as conns:
                reader, writer = conns[0]
                statuses = [await _get(reader, writer, "/metrics", authorization="Bearer wrong") for _ in range(2)]
                statuses += [await _get(reader, writer, "/metrics") for _ in range(2)]
                assert statuses == [401, 429, 429, 429]  # the app saw the first; the edge answered the rest
                assert await _get(reader, writer, "/metrics", authorization="Bearer m-t0k") == 200
                assert await _get(reader, writer, "/guard/health") == 200  # not limited
                assert [await _get(reader, writer, "/guard/ready") for _ in range(2)][-1] == 429
                assert await _get(reader, writer, "/guard/capacity") == 200  # its own bucket
                assert await _get(reader, writer, "/guard/capacity") == 429
                assert await _get(reader, writer, "/guard/capacity", **{"x-guard-admin-token": "adm-t0k"}) == 200
                writer.write(request("GET", "/metrics") * 3)  # pipelined past the rate
                first = await read_answer(reader, timeout=10)
                assert first.status == 429 and "connection: close" not in first.head.lower()
                second = await read_answer(reader, timeout=10)
                assert second.status == 429 and "connection: close" in second.head.lower()
                assert await closed_within(reader, 2.0)
            assert "429 from 127.0.0.1" in guard.log()
            assert up.requests == []


async def test_idle_connections_refused_for_their_read_rate_go_before_a_served_client() -> None:
    """max_idle_connections 2: a client served first, then four scrapers, three of them refused by the read rate,
    go idle after it; the refused ones are closed, the client's connection is kept and served again."""
    server = {"read_rate": 0.2, "max_idle_connections": 2, "keep_alive_timeout": 60}
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server=server) as guard:
            async with connections(guard.port, 1) as client, connections(guard.port, 4) as scrapers:
                assert await _get(*client[0], "/guard/health") == 200
                statuses = [await _get(reader, writer, "/metrics") for reader, writer in scrapers]
                assert statuses == [200, 429, 429, 429]  # the first took the one token
                # the client and scraper 0 (served) fill the two idle places; each refused one goes at once
                closed = await asyncio.gather(*(closed_within(r, 1.0) for r, _ in scrapers))
                assert closed == [False, True, True, True]
                assert await _get(*client[0], "/guard/health") == 200
            assert up.requests == []


async def test_a_declared_body_that_cannot_fit_the_budget_is_refused_before_it_is_sent() -> None:
    """Four 3 MB bodies held (one in flight, three queued) of a 12 MiB budget: a fifth that declares 3 MB gets
    its 429 from its headers alone; the proxy never waits for its body."""
    server = {"max_body_bytes": 4 * MB, "body_budget_bytes": 12 * MB, "body_timeout": 60}
    lane = {"x-guard-lane": "interactive", "content-type": "application/json"}
    body = b'{"model":"m","messages":[{"role":"user","content":"' + b"a" * (3_000_000 - 60) + b'"}]}'
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server=server, upstream_table={"max_inflight": 1}) as guard:
            up.hold.clear()
            async with connections(guard.port, 4) as held:
                for _, writer in held:
                    writer.write(request("POST", CHAT, lane, body))
                await _until(lambda: guard.in_flight() == 4, guard)
                head_only = request("POST", CHAT, {**lane, "content-length": str(len(body))})
                answer = await raw_exchange(guard.port, head_only, timeout=10)
                assert answer.status == 429 and answer.json()["error"]["code"] == "body_budget_full"
                assert "retry-after: 2" in answer.head.lower() and "connection: close" in answer.head.lower()
                assert "declared body over what is left of server.body_budget_bytes" in guard.log()
                up.hold.set()
                assert [(await read_answer(r)).status for r, _ in held] == [200] * 4
            assert len(up.requests) == 4
            small = await raw_exchange(guard.port, request("POST", CHAT, lane, SMALL_CHAT))
            assert small.status == 200  # the budget came back


async def test_bodies_declared_at_once_cannot_together_pass_the_budget() -> None:
    """Five heads declaring 3 MB each, no body yet, against a 12 MiB budget: four are awaited (their declared
    bytes count as held), the fifth gets its 429 at once; the room comes back when they end."""
    server = {"max_body_bytes": 4 * MB, "body_budget_bytes": 12 * MB, "body_timeout": 60}
    lane = {"x-guard-lane": "interactive", "content-type": "application/json"}
    body = b'{"model":"m","messages":[{"role":"user","content":"' + b"a" * (3_000_000 - 60) + b'"}]}'
    head_only = request("POST", CHAT, {**lane, "content-length": str(len(body))})
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server=server) as guard:
            async with connections(guard.port, 4) as awaited:
                for _, writer in awaited:
                    writer.write(head_only)
                    await writer.drain()
                fifth = await raw_exchange(guard.port, head_only, timeout=10)
                assert fifth.status == 429 and fifth.json()["error"]["code"] == "body_budget_full"
                reader, writer = awaited[0]
                writer.write(body)  # the first one's body comes after all: served
                assert (await read_answer(reader)).status == 200
            # the other three went away without their bodies: their room is back
            answers = [await raw_exchange(guard.port, request("POST", CHAT, lane, body)) for _ in range(4)]
            assert [a.status for a in answers] == [200] * 4
            assert len(up.requests) == 5


async def test_a_header_flood_on_a_kept_alive_connection_is_cut_at_its_first_read() -> None:
    """A second request whose one header line runs past max_header_bytes in a single write: 431 at once (the
    bytes are refused as they arrive, not only once a header line is complete)."""
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server={"header_timeout": 30}) as guard:
            async with connections(guard.port, 1) as conns:
                reader, writer = conns[0]
                writer.write(request("GET", "/guard/health"))
                assert (await read_answer(reader)).status == 200
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nx-flood: " + b"a" * 40_000)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                answer = await read_answer(reader, timeout=10)
                assert answer.status == 431 and answer.json()["error"]["code"] == "request_headers_too_large"
            assert "431 from 127.0.0.1" in guard.log()
            assert up.requests == []


async def _until(condition: object, guard: Guard, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not reached in {timeout} s; log:\n{guard.log()[-2000:]}"
        await asyncio.sleep(0.05)  # polling a foreign process's state: no event to wait on
