"""Proxy cases of tests/app run over the production transport: the guard served by uvicorn on a 127.0.0.1 socket,
its h1 client to a real upstream on another socket (the sim's ASGI app served by uvicorn, or a scripted raw
socket), a real httpx client. tests/app drives the same app through httpx's ASGITransport, with no sockets.
After each case, ``/guard/capacity`` must be all free again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway_guard.sim.model import SimConfig
from gateway_guard.sim.server import build_sim_app
from tests.integration.conftest import CHAT_PATH, assert_openai_error, guard_in_process, guard_settings, wait_all_free
from tests.support.inprocess import serve_in_process
from tests.support.llamacpp import free_port
from tests.support.raw_upstream import ScriptedUpstream, abort

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
STREAM = CHAT | {"stream": True, "stream_options": {"include_usage": True}}


@contextlib.asynccontextmanager
async def guard_before(upstream_url: str) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    async with (
        guard_in_process(guard_settings(upstream_url)) as (guard, state),
        httpx.AsyncClient(base_url=guard, timeout=20) as http,
    ):
        assert state is not None
        yield guard, http
        await wait_all_free(http, guard, timeout=5)


@contextlib.asynccontextmanager
async def sim_guard(**config: Any) -> AsyncIterator[tuple[str, httpx.AsyncClient, Any]]:
    sim = build_sim_app(SimConfig(**({"ttft": 0.0, "tokens_per_second": 500.0} | config)))
    async with serve_in_process(sim) as sim_url, guard_before(sim_url) as (guard, http):
        yield guard, http, sim


async def test_non_streamed_through_the_socket() -> None:
    async with sim_guard() as (_, http, sim):
        response = await http.post(CHAT_PATH, json=CHAT)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["object"] == "chat.completion"
        assert answer["usage"]["completion_tokens"] == 6
        assert sim.gpu.stats().requests_total == 1


async def test_streamed_events_arrive_in_order_and_end_with_done() -> None:
    async with sim_guard() as (_, http, _sim), http.stream("POST", CHAT_PATH, json=STREAM) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_client_leaving_mid_stream_stops_the_upstream_and_frees_the_permit() -> None:
    async with sim_guard(tokens_per_second=20.0) as (_, http, sim):
        payload = STREAM | {"max_tokens": 60}  # three seconds of tokens at 20/s
        async with http.stream("POST", CHAT_PATH, json=payload) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # the client leaves after the first event
        stats = await asyncio.wait_for(sim.gpu.wait_until(lambda s: s.requests_abandoned_total >= 1), 10)
        assert stats.tokens_predicted_total < 60


async def test_upstream_down_is_a_502_for_a_call_that_holds_no_slot() -> None:
    """Generation calls wait in their lane while the upstream is down (tests/integration/test_outage.py)."""
    async with guard_before(f"http://127.0.0.1:{free_port()}") as (_, http):
        response = await http.get("/v1/models")
        assert assert_openai_error(response, 502)["code"] == "upstream_unavailable"


@pytest.mark.parametrize("ending", ["reset", "close"])
async def test_upstream_gone_after_reading_the_request_is_a_502_sent_once(ending: str) -> None:
    async def handler(up: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.read_request(reader)
        if ending == "reset":
            abort(writer)

    upstream = ScriptedUpstream(handler)
    async with upstream.serving() as url, guard_before(url) as (_, http):
        response = await http.post(CHAT_PATH, json=CHAT)
        assert_openai_error(response, 502)
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n", b"HTTP/1.1 999 X\r\n\r\n"],
    ids=["101", "999"],
)
async def test_an_answer_that_cannot_be_relayed_is_a_502(answer: bytes) -> None:
    async def handler(up: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(answer)
        await writer.drain()
        await reader.read()

    upstream = ScriptedUpstream(handler)
    async with upstream.serving() as url, guard_before(url) as (_, http):
        response = await http.post(CHAT_PATH, json=CHAT)
        assert assert_openai_error(response, 502)["code"] == "upstream_protocol_error"


async def test_a_close_delimited_stream_is_relayed_whole() -> None:
    events = [b'data: {"choices":[{"index":0,"delta":{"content":"%d"}}]}\n\n' % i for i in range(50)]

    async def handler(up: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        for event in [*events, b"data: [DONE]\n\n"]:
            writer.write(event)
            await writer.drain()

    upstream = ScriptedUpstream(handler)
    async with (
        upstream.serving() as url,
        guard_before(url) as (_, http),
        http.stream("POST", CHAT_PATH, json=STREAM) as response,
    ):
        assert response.status_code == 200
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    assert body == b"".join(events) + b"data: [DONE]\n\n"


async def test_reset_on_a_reused_connection_after_reading_is_a_502_sent_once() -> None:
    async def handler(up: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.read_request(reader)
        body = b'{"choices":[]}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body))
        writer.write(body)
        await writer.drain()
        await up.read_request(reader)  # the second request arrives on the same, reused connection
        abort(writer)

    upstream = ScriptedUpstream(handler)
    async with upstream.serving() as url, guard_before(url) as (_, http):
        assert (await http.post(CHAT_PATH, json=CHAT)).status_code == 200
        assert_openai_error(await http.post(CHAT_PATH, json=CHAT | {"max_tokens": 7}), 502)
    # both on one connection (the handler reads the second where it answered the first), and never a third
    bodies = [json.loads(request.split(b"\r\n\r\n", 1)[1]) for request in upstream.requests]
    assert [body["max_tokens"] for body in bodies] == [6, 7]


async def test_an_endless_sse_line_is_relayed_and_the_permit_freed() -> None:
    piece = b"x" * 4096
    pieces = 2000  # 8 MB of one line without a newline

    async def handler(up: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: ")
        for _ in range(pieces):
            writer.write(piece)
            await writer.drain()

    upstream = ScriptedUpstream(handler)
    async with (
        upstream.serving() as url,
        guard_before(url) as (_, http),
        http.stream("POST", CHAT_PATH, json=STREAM) as response,
    ):
        assert response.status_code == 200
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
    assert received == len(b"data: ") + pieces * len(piece)
