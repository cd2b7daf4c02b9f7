"""Each attack on the guard's edge, against a live ``gateway-guard`` process on 127.0.0.1 in front of an upstream
that records every request (raw sockets where a client library would refuse to send the request).

Each test asserts the status the guard answers, that the upstream never saw what it should not, and for the
memory attacks that the guard's RSS stays under a stated bound (the docs/edge.md arithmetic for the settings
used, plus a margin for a shared machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

import httpx

from gateway_guard.app.edge_room import IDLE_GRACE
from tests.integration.edge_support import (
    GUARD_BIN,
    Guard,
    RecordingUpstream,
    closed_by_peer,
    closed_within,
    connections,
    edge_guard,
    raw_exchange,
    read_answer,
    request,
    write_config,
)

CHAT = "/v1/chat/completions"
SMALL_CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
MB = 1024 * 1024


async def _send_slowly(guard: Guard, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", guard.port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def test_oversized_or_too_many_headers_are_431_and_never_forwarded() -> None:
    async with RecordingUpstream() as up:
        with edge_guard(up.url) as guard:
            big = await raw_exchange(guard.port, request("POST", CHAT, {"x-big": "a" * 40_000}, SMALL_CHAT))
            many = await raw_exchange(
                guard.port, request("POST", CHAT, {f"x-h{i}": "1" for i in range(120)}, SMALL_CHAT)
            )
            long_target = await raw_exchange(guard.port, request("GET", "/v1/models/" + "m" * 40_000))
            assert (big.status, many.status, long_target.status) == (431, 431, 431)
            assert big.json()["error"]["code"] == "request_headers_too_large"
            assert "connection: close" in big.head.lower()
            ok = await raw_exchange(guard.port, request("POST", CHAT, {"x-fine": "a" * 1000}, SMALL_CHAT))
            assert ok.status == 200
            assert up.targets() == [CHAT]  # only the fine one
            assert "431 from 127.0.0.1" in guard.log()


async def test_unfinished_header_floods_keep_the_rss_bounded() -> None:
    """20 connections each streaming 15 MB of one header line that never ends: each is cut at 32 KiB."""
    async with RecordingUpstream() as up:
        with edge_guard(up.url) as guard:
            before = guard.rss_mb()
            chunk = b"a" * (256 * 1024)

            async def flood() -> int:
                reader, writer = await _send_slowly(guard, b"POST /v1/chat/completions HTTP/1.1\r\nx-flood: ")
                try:
                    for _ in range(60):  # up to 15 MB
                        writer.write(chunk)
                        await writer.drain()
                except ConnectionError:
                    pass
                answer = await read_answer(reader, timeout=30)
                writer.close()
                return answer.status

            statuses = await asyncio.gather(*(flood() for _ in range(20)))
            after = guard.rss_mb()
            # 431, or the connection reset under the client's own writes (the answer lost with it): cut either way
            assert set(statuses) <= {431, 0}
            assert guard.log().count("431 from 127.0.0.1") == 20
            assert after - before < 40, f"RSS grew {after - before:.0f} MB (before {before:.0f} MB)"
            assert up.requests == []


async def test_slow_senders_get_408_within_the_deadlines() -> None:
    """An idle socket, slow headers, a slow body, an unfinished chunked body: each answered 408 and closed."""
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server={"header_timeout": 1.0, "body_timeout": 1.0}) as guard:
            idle_r, idle_w = await asyncio.open_connection("127.0.0.1", guard.port)
            slow_head_r, slow_head_w = await _send_slowly(guard, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
            slow_body_r, slow_body_w = await _send_slowly(
                guard, request("POST", CHAT, {"content-length": "1000", "content-type": "application/json"}, b'{"m')
            )
            chunked_r, chunked_w = await _send_slowly(
                guard,
                b'POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{"mod\r\n',
            )
            started = time.monotonic()
            answers = await asyncio.gather(
                *(read_answer(r, timeout=15) for r in (idle_r, slow_head_r, slow_body_r, chunked_r))
            )
            took = time.monotonic() - started
            assert [a.status for a in answers] == [408, 408, 408, 408]
            assert answers[2].json()["error"]["code"] == "request_timeout"
            for reader in (idle_r, slow_head_r, slow_body_r, chunked_r):
                assert await closed_by_peer(reader, 5) == b""
            for writer in (idle_w, slow_head_w, slow_body_w, chunked_w):
                writer.close()
            assert took < 10  # deadlines of 1 s: an upper bound, not a timing
            assert up.requests == []
            assert guard.in_flight() == 0
            assert "408 from 127.0.0.1" in guard.log()


async def test_bodies_over_the_limit_are_413_at_the_edge() -> None:
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server={"max_body_bytes": 1 * MB, "body_budget_bytes": 4 * MB}) as guard:
            declared = await raw_exchange(guard.port, request("POST", CHAT, {"content-length": str(2 * MB)}))
            assert declared.status == 413
            reader, writer = await _send_slowly(
                guard, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            piece = b"x" * 65536
            with contextlib.suppress(ConnectionError):
                for _ in range(40):  # 2.5 MB in chunks
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
            counted = await read_answer(reader)
            writer.close()
            # the guard answers and closes while the client is still writing: the client's kernel may drop the
            # answer on the reset that follows, so a lost answer counts when the guard's log shows the 413
            assert counted.status == 413 or (counted.status == 0 and "413 from 127.0.0.1" in guard.log()), counted
            guard_own = await raw_exchange(guard.port, request("POST", "/guard/reload", {}, b"x" * 100_000))
            assert guard_own.status == 413  # the guard's own endpoints take 64 KiB at most
            assert up.requests == []


async def test_queued_bodies_past_the_budget_are_429_and_memory_stays_bounded() -> None:
    """The upstream holds the one slot; 3 MB bodies queue behind it until the 12 MiB budget is spent."""
    server = {"max_body_bytes": 4 * MB, "body_budget_bytes": 12 * MB}
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server=server, upstream_table={"max_inflight": 1}) as guard:
            up.hold.clear()
            before = guard.rss_mb()
            lane = {"x-guard-lane": "interactive", "content-type": "application/json"}
            body = b'{"model":"m","messages":[{"role":"user","content":"' + b"a" * (3_000_000 - 60) + b'"}]}'
            async with httpx.AsyncClient(base_url=guard.url, timeout=60) as client:
                tasks = [asyncio.create_task(client.post(CHAT, content=body, headers=lane)) for _ in range(6)]
                deadline = time.monotonic() + 60
                while sum(t.done() for t in tasks) < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)  # polling a foreign process's answers: no event to wait on
                refused = [t.result() for t in tasks if t.done()]
                assert [r.status_code for r in refused] == [429, 429]
                assert refused[0].json()["error"]["code"] == "body_budget_full"
                assert int(refused[0].headers["retry-after"]) >= 1
                peak = guard.rss_mb()
                up.hold.set()
                answers = await asyncio.gather(*tasks)
            assert sorted(r.status_code for r in answers) == [200, 200, 200, 200, 429, 429]
            assert len(up.requests) == 4
            assert peak - before < 12 * 3 + 30, f"RSS grew {peak - before:.0f} MB"
            assert guard.in_flight() == 0


async def test_stalled_bodies_are_cut_by_the_body_deadline_and_the_budget() -> None:
    """Bodies stalled one byte short: past the budget a 429 at once, the rest a 408 at the body deadline."""
    server = {"max_body_bytes": 4 * MB, "body_budget_bytes": 12 * MB, "body_timeout": 3.0}
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server=server) as guard:
            size = 3_000_000
            head = request("POST", CHAT, {"content-length": str(size), "content-type": "application/json"})
            conns = []
            reset_while_sending = 0  # refused from its headers while the rest was still on its way
            for _ in range(6):
                reader, writer = await asyncio.open_connection("127.0.0.1", guard.port)
                conns.append((reader, writer))
                writer.write(head + b"a" * (size - 1))
                try:
                    await writer.drain()
                except ConnectionError:
                    reset_while_sending += 1
            answers = await asyncio.gather(*(read_answer(r, timeout=30) for r, _ in conns))
            for _, writer in conns:
                writer.close()
            statuses = sorted(a.status for a in answers)
            assert reset_while_sending <= statuses.count(0)
            # a 429 may be lost in the reset of a connection whose client is still writing: the log has it
            assert statuses.count(408) == 4 and set(statuses) <= {0, 408, 429}
            log = guard.log()  # refused by the edge from the declared length, or by the proxy as it read
            assert log.count("status=429 outcome=rejected_queue_full") + log.count("over what is left of") == 2
            assert up.requests == []
            assert guard.in_flight() == 0
            after = await raw_exchange(
                guard.port, request("POST", CHAT, {"content-type": "application/json"}, SMALL_CHAT)
            )
            assert after.status == 200  # the budget came back


async def test_idle_keep_alive_connections_past_their_limit_close_the_oldest() -> None:
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server={"max_connections": 20, "max_idle_connections": 4}) as guard:
            # keep-alive connections that went idle: once they have been idle for the grace, a ninth going idle
            # leaves only the newest 4 open
            async with connections(guard.port, 8) as kept, connections(guard.port, 1) as ninth:
                for reader, writer in kept:
                    writer.write(request("GET", "/guard/health"))
                    assert (await read_answer(reader)).status == 200
                await asyncio.sleep(IDLE_GRACE + 0.2)  # the rule is about elapsed time: let the grace pass
                ninth[0][1].write(request("GET", "/guard/health"))
                assert (await read_answer(ninth[0][0])).status == 200
                closed = await asyncio.gather(*(closed_within(r, 1.0) for r, _ in kept))
                assert closed == [True] * 5 + [False] * 3
            assert up.requests == []
    # which connection goes when the guard is at max_connections: tests/integration/test_edge_room.py


async def test_nothing_of_the_guards_own_goes_upstream() -> None:
    async with RecordingUpstream() as up:
        guard_cfg = {"admin_token": "adm-t0ken-zz"}
        with edge_guard(up.url, server=guard_cfg, upstream_table={"api_key": "up-key-77"}) as guard:
            headers = {
                "x-guard-admin-token": "adm-t0ken-zz",
                "x-guard-lane": "interactive",
                "x-guard-profile": "p",
                "x-guard-anything": "1",
                "authorization": "Bearer client-key",
                "x-api-key": "client-key",
                "content-type": "application/json",
                "x-custom": "kept",
            }
            for path in (CHAT, "/api/pull"):
                answer = await raw_exchange(guard.port, request("POST", path, headers, SMALL_CHAT))
                assert answer.status == 200
            assert up.targets() == [CHAT, "/api/pull"]
            for seen in up.requests:
                names = [n for n, _ in seen.headers]
                assert not [n for n in names if n.startswith("x-guard-")], names
                assert "x-api-key" not in names and ("x-custom", "kept") in seen.headers
                assert [v for n, v in seen.headers if n == "authorization"] == ["Bearer up-key-77"]
                assert b"adm-t0ken-zz" not in seen.body


async def test_paths_are_strict_and_admin_routes_match_their_canonical_form() -> None:
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server={"admin_token": "adm"}) as guard:
            json_ct = {"content-type": "application/json"}
            for path in ("/api/pull/", "/API/PULL", "/api/pull//"):
                answer = await raw_exchange(guard.port, request("POST", path, json_ct, b'{"model":"m"}'))
                assert answer.status in (400, 403, 404), path
            for path in (
                "/api//pull",
                "/api/./pull",
                "/api/pull%20",
                "/v1/%2e%2e/%2e%2e/admin",
                "/v1/../admin",
                "/v1/a%2Fb",
                "/v1/chat%3Fx=1",
                "/v1/a%23b",
                "/v1/a%00",
                "/v1/%zz",
                "/v1/a\\..\\b",
            ):
                answer = await raw_exchange(guard.port, request("POST", path, json_ct, b'{"model":"m"}'))
                assert answer.status == 400, path
                assert answer.json()["error"]["code"] == "invalid_path"
            assert up.requests == []
            ok = await raw_exchange(guard.port, request("GET", "/v1/models/caf%C3%A9%41"))
            assert ok.status == 200
            assert up.targets() == ["/v1/models/caf%C3%A9A"]  # the one correct encoding of the checked path


async def test_bad_json_is_400_never_500() -> None:
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server={"admin_token": "adm"}) as guard:
            bodies = [
                b"[" * 100_000,
                b'{"a":' * 50_000,
                b'{"model":"m","n":' + b"9" * 5000 + b"}",
                b'{"t": NaN}',
                b'{"t": -Infinity}',
                b'{"t": 1e999}',
                b"\xff\xfe",
                b'{"model": 5}',
            ]
            for body in bodies:
                answer = await raw_exchange(
                    guard.port, request("POST", CHAT, {"content-type": "application/json"}, body)
                )
                assert answer.status == 400, body[:30]
                assert answer.json()["error"]["type"] == "invalid_request_error"
            limit = await raw_exchange(
                guard.port,
                request("POST", "/guard/upstreams/gpu/limit", {"x-guard-admin-token": "adm"}, b'{"limit": Infinity}'),
            )
            assert limit.status == 400
            assert up.requests == []
            assert "Traceback" not in guard.log() and "status=500" not in guard.log()


async def test_metrics_token_and_no_upstream_call_per_scrape() -> None:
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server={"metrics_token": "m-t0k"}, upstream_table={"probe": "auto"}) as guard:
            async with httpx.AsyncClient(base_url=guard.url, timeout=30) as client:
                assert (await client.get("/metrics")).status_code == 401
                assert (await client.get("/metrics", headers={"authorization": "Bearer wrong"})).status_code == 401
                auth = {"authorization": "Bearer m-t0k"}
                assert (await client.get("/metrics", headers=auth)).status_code == 200
                up.requests.clear()
                flood = [client.get(p, headers=auth) for p in ("/metrics", "/guard/ready", "/guard/capacity") * 50]
                answers = await asyncio.gather(*flood)
            assert all(a.status_code in (200, 503) for a in answers)
            assert up.requests == []  # probes are not recorded; nothing else reached the upstream


async def test_a_password_in_the_upstream_url_is_refused_without_being_printed() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "g.toml"
        write_config(config, {"upstreams.gpu": {"url": "http://user:pa55-w0rd-xyz@127.0.0.1:9/"}})
        proc = await asyncio.create_subprocess_exec(
            str(GUARD_BIN), "--config", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    out = stdout.decode()
    assert proc.returncode == 2
    assert "upstreams.gpu.url" in out and "user name or password" in out
    assert "pa55-w0rd-xyz" not in out and "user:" not in out


async def test_a_pipelined_request_gets_its_body_deadline_only_when_its_turn_comes() -> None:
    """Behind a request the upstream holds longer than body_timeout: a complete pipelined request is served,
    a stalled one gets its 408 one deadline after its turn came, and neither corrupts the answer before it."""
    json_ct = {"content-type": "application/json"}
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server={"body_timeout": 1.0}) as guard:
            for second, expected in (
                (request("POST", CHAT, json_ct, SMALL_CHAT), 200),
                (request("POST", CHAT, {**json_ct, "content-length": "100"}, b'{"mo'), 408),
            ):
                up.hold.clear()
                reader, writer = await _send_slowly(guard, request("POST", CHAT, json_ct, SMALL_CHAT) + second)
                deadline = time.monotonic() + 30
                while not up.requests and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)  # polling a recording server in this loop for the first request
                await asyncio.sleep(1.5)  # hold the first answer past the body deadline (the rule is elapsed time)
                up.hold.set()
                first = await read_answer(reader)
                after = await read_answer(reader)
                writer.close()
                assert (first.status, after.status) == (200, expected)
                up.requests.clear()
            assert guard.in_flight() == 0
