"""Upstreams that fail, on real sockets: down, hung, reset before or during the answer; and the cap under many
clients that leave at random. After each, ``/guard/capacity`` must be back to all-free.

The misbehaving upstreams are raw asyncio servers speaking just enough HTTP/1.1 to fail on purpose; the
many-clients run uses the simulated GPU as its own process, whose ``sim:max_concurrent_seen`` gauge is the
judge of what the guard let through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway_guard.sim import SimConfig, build_sim_app
from tests.integration.conftest import (
    CHAT_PATH,
    assert_openai_error,
    guard_in_process,
    guard_settings,
    poll_until,
    prometheus,
    wait_all_free,
)
from tests.support.inprocess import serve_in_process
from tests.support.llamacpp import free_port, sim_server

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
STREAM = CHAT | {"stream": True}
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
# A stream cut short upstream must not end cleanly at the client: it would look like a complete answer.
TRUNCATED = "a stream cut short upstream must end with an SSE error event (what the OpenAI SDK raises), no [DONE]"


def assert_ends_with_error_event(received: bytes, ended_by: str, code: str) -> None:
    assert ended_by == "clean end", TRUNCATED
    assert b"[DONE]" not in received, TRUNCATED
    last = received.strip().split(b"\n\n")[-1]
    assert last.startswith(b"data: "), received
    error = json.loads(last.removeprefix(b"data: "))["error"]
    assert error["code"] == code and error["type"] == "upstream_error", error
FIRST_EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"first"}}]}\n\n'

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Ending = Callable[[asyncio.StreamWriter], Awaitable[None]]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class RawUpstream:
    """Reads one HTTP/1.1 request per connection, then runs ``behaviour``; notes when the guard hangs up."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests = 0
        self.arrived = asyncio.Event()
        self.peer_closed = asyncio.Event()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.close()
            for writer in self._writers:
                writer.transport.abort()
            await asyncio.wait_for(asyncio.gather(*self._handlers, return_exceptions=True), 5)
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            self.requests += 1
            self.arrived.set()
            await self.behaviour(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def wait_for_hang_up(self, reader: asyncio.StreamReader) -> None:
        """Read until the guard closes its end (EOF or reset)."""
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        self.peer_closed.set()


# -- upstream down / hung -----------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [CHAT, STREAM], ids=["plain", "stream"])
async def test_a_request_waits_while_the_upstream_is_down_and_goes_through_once_it_is_back(
    body: dict[str, Any],
) -> None:
    port = free_port()
    nothing_listens = f"http://127.0.0.1:{port}"
    async with guard_in_process(guard_settings(nothing_listens)) as (guard, _), httpx.AsyncClient(timeout=60) as http:
        waiting = asyncio.ensure_future(http.post(f"{guard}{CHAT_PATH}", json=body))
        async with asyncio.timeout(10):  # the guard tried, found it down, and holds the request in its lane
            while True:
                up = (await http.get(f"{guard}/guard/capacity")).json()["upstreams"]["default"]
                if up.get("state") == "down" and up["queued"] == 1:
                    break
                await asyncio.sleep(0.05)
        assert up["in_flight"] == 0 and "held" in up and nothing_listens not in str(up)
        ready = await http.get(f"{guard}/guard/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert not waiting.done()
        async with serve_in_process(build_sim_app(SimConfig(ttft=0.0, tokens_per_second=500.0)), port):
            response = await waiting  # the upstream is back where it was: the request goes on
            assert response.status_code == 200, response.text
            state = (await http.get(f"{guard}/guard/capacity")).json()["upstreams"]["default"]["state"]
            assert state == "up"
            await wait_all_free(http, guard)


async def test_upstream_that_never_answers_is_a_504_after_the_read_timeout() -> None:
    upstream = RawUpstream(lambda reader, _: upstream.wait_for_hang_up(reader))
    async with upstream.serving() as up_url:
        settings = guard_settings(up_url, **{"upstreams.default.read_timeout": 0.5})
        async with guard_in_process(settings) as (guard, _), httpx.AsyncClient(timeout=10) as http:
            started = time.monotonic()
            response = await http.post(f"{guard}{CHAT_PATH}", json=STREAM)
            elapsed = time.monotonic() - started
            error = assert_openai_error(response, 504)
            assert error["code"] == "upstream_timeout"
            assert 0.45 <= elapsed < 5.0, f"504 after {elapsed:.2f} s with read_timeout 0.5 s"
            async with asyncio.timeout(3):
                await upstream.peer_closed.wait()  # the guard dropped the upstream connection (frees its slot)
            await wait_all_free(http, guard)
    assert upstream.requests == 1


async def test_client_leaving_before_the_upstream_answers_closes_the_upstream_connection() -> None:
    upstream = RawUpstream(lambda reader, _: upstream.wait_for_hang_up(reader))
    async with upstream.serving() as up_url:
        # A read timeout far beyond the test: only the client's departure can end the upstream request.
        settings = guard_settings(up_url, **{"upstreams.default.read_timeout": 600})
        async with guard_in_process(settings) as (guard, _), httpx.AsyncClient(timeout=10) as http:
            request = asyncio.create_task(http.post(f"{guard}{CHAT_PATH}", json=STREAM))
            async with asyncio.timeout(3):
                await upstream.arrived.wait()
            request.cancel()  # the client hangs up while the guard waits for the upstream's headers
            with contextlib.suppress(asyncio.CancelledError):
                await request
            async with asyncio.timeout(2):
                await upstream.peer_closed.wait()
            await wait_all_free(http, guard)


async def test_upstream_that_stalls_mid_stream_ends_the_stream_after_the_read_timeout() -> None:
    upstream = RawUpstream(lambda reader, writer: _first_event_then(writer, upstream.wait_for_hang_up(reader)))
    async with upstream.serving() as up_url:
        settings = guard_settings(up_url, **{"upstreams.default.read_timeout": 0.5})
        async with guard_in_process(settings) as (guard, _), httpx.AsyncClient(timeout=10) as http:
            received, ended_by = await _read_stream(http, guard)
            assert b"first" in received
            assert_ends_with_error_event(received, ended_by, "upstream_timeout")
            async with asyncio.timeout(3):
                await upstream.peer_closed.wait()
            await wait_all_free(http, guard)


# -- upstream resets ----------------------------------------------------------------------------------------


async def _first_event_then(writer: asyncio.StreamWriter, then: Awaitable[None]) -> None:
    writer.write(SSE_HEAD + chunk(FIRST_EVENT))
    await writer.drain()
    await then


async def _abort(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()  # RST: the connection is reset


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()  # FIN without the last chunk: the body is cut short


async def _read_stream(http: httpx.AsyncClient, guard: str) -> tuple[bytes, str]:
    """Stream a chat through the guard; what arrived, and how it ended (bounded: 5 s)."""
    received = b""
    async with asyncio.timeout(5), http.stream("POST", f"{guard}{CHAT_PATH}", json=STREAM) as response:
        assert response.status_code == 200
        try:
            async for data in response.aiter_raw():
                received += data
        except httpx.RemoteProtocolError:
            return received, "RemoteProtocolError"
    return received, "clean end"


@pytest.mark.parametrize("how", [_abort, _close], ids=["reset", "closed"])
async def test_upstream_reset_before_headers_is_a_502(how: Ending) -> None:
    upstream = RawUpstream(lambda _, writer: how(writer))
    async with (
        upstream.serving() as up_url,
        guard_in_process(guard_settings(up_url)) as (guard, _),
        httpx.AsyncClient(timeout=10) as http,
    ):
        response = await http.post(f"{guard}{CHAT_PATH}", json=STREAM)
        error = assert_openai_error(response, 502)
        assert error["code"] == "upstream_error"
        await wait_all_free(http, guard)


@pytest.mark.parametrize("how", [_abort, _close], ids=["reset", "closed"])
async def test_upstream_reset_mid_stream_ends_the_clients_stream(how: Ending) -> None:
    upstream = RawUpstream(lambda _, writer: _first_event_then(writer, how(writer)))
    async with (
        upstream.serving() as up_url,
        guard_in_process(guard_settings(up_url)) as (guard, _),
        httpx.AsyncClient(timeout=10) as http,
    ):
        received, ended_by = await _read_stream(http, guard)
        assert b"first" in received, received
        assert_ends_with_error_event(received, ended_by, "upstream_error")
        await wait_all_free(http, guard)
        # The guard still serves: the next request gets the same treatment, not a stuck permit.
        received, _ = await _read_stream(http, guard)
        assert b"first" in received
        await wait_all_free(http, guard)
    assert upstream.requests == 2


# -- the cap under many clients that leave at random ----------------------------------------------------------

CAP = 2
CLIENTS = 24


@pytest.fixture
def sim() -> Iterator[str]:
    with sim_server(slots=8, tokens_per_second=100, ttft=0.02, batch_slowdown=0, max_output_tokens=64) as url:
        yield url


async def _client(http: httpx.AsyncClient, guard: str, rng: random.Random) -> str:
    """One client: finishes, leaves mid-stream, or leaves at a random moment (queued or streaming)."""
    kind = rng.choice(["complete", "complete", "plain", "leave_mid_stream", "leave_any_time"])
    lane = rng.choice(["interactive", "batch"])
    # Leavers ask for a long reply, so they leave while the upstream is still generating for them.
    max_tokens = rng.randint(5, 30) if kind == "complete" else 60
    body = STREAM | {"max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    headers = {"X-Guard-Lane": lane}
    if kind == "plain":
        response = await http.post(f"{guard}{CHAT_PATH}", json=CHAT, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == CHAT["max_tokens"]
        return kind
    leave_after = rng.uniform(0.0, 0.6) if kind == "leave_any_time" else 30.0
    leave_at_line = rng.randint(1, 4) if kind == "leave_mid_stream" else -1
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(leave_after):
            async with http.stream("POST", f"{guard}{CHAT_PATH}", json=body, headers=headers) as response:
                assert response.status_code == 200, await response.aread()
                lines = response.aiter_lines()
                events, done = 0, False
                async for line in lines:
                    events += line.startswith("data: ")
                    done = done or line == "data: [DONE]"
                    if events == leave_at_line:
                        return kind  # leaving the block closes the connection mid-stream
                assert done, f"{kind}: the stream ended without [DONE]"
                return kind
    return kind + " (left)"


async def test_cap_is_never_exceeded_with_many_clients_leaving_at_random(sim: str) -> None:
    rng = random.Random(20261123)
    async with (
        guard_in_process(guard_settings(sim, **{"upstreams.default.max_inflight": CAP})) as (guard, _),
        httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as http,
    ):
        async with asyncio.timeout(30):
            kinds = await asyncio.gather(*(_client(http, guard, random.Random(rng.random())) for _ in range(CLIENTS)))

        async def sim_metrics() -> dict[str, float]:
            return prometheus((await http.get(f"{sim}/metrics")).text)

        idle = await poll_until(
            sim_metrics,
            lambda m: m["llamacpp:requests_processing"] == 0 and m["llamacpp:requests_deferred"] == 0,
            timeout=3.0,
            what="sim idle after every client finished or left",
        )
        await wait_all_free(http, guard)

    left = [k for k in kinds if k.startswith("leave")]
    assert left and len(left) < CLIENTS, kinds
    assert idle["sim:max_concurrent_seen"] <= CAP, f"the upstream held {idle['sim:max_concurrent_seen']:.0f} at once"
    assert idle["sim:max_concurrent_seen"] == CAP, "the cap was never reached: the load did not test it"
    assert idle["sim:requests_abandoned_total"] >= 1, "no client left mid-generation: disconnects were not tested"
    assert idle["sim:requests_total"] <= CLIENTS
