"""The h1 client's rules over raw 127.0.0.1 sockets (docs/upstream-client.md): close-delimited bodies, no replay
of a request the server may have started on, impossible answers become 502, bounded headers."""

from __future__ import annotations

import asyncio

import pytest

from gateway_guard.errors import UpstreamError, UpstreamTimeout
from gateway_guard.upstream.client import Upstream
from gateway_guard.upstream.errors import UpstreamClosedEarly, UpstreamProtocolError
from gateway_guard.upstream.h1 import MAX_HEADER_BYTES
from tests.support.raw_upstream import OK, ScriptedUpstream, abort, read_all

StreamReader = asyncio.StreamReader
StreamWriter = asyncio.StreamWriter


# -- bodies delimited by the connection's close ------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n", b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n"],
    ids=["http-1.0", "connection-close"],
)
async def test_a_body_delimited_by_close_is_relayed_whole_and_the_connection_not_reused(head: bytes) -> None:
    parts = [b"data: 1\n\n", b"data: 2\n\n", b"x" * 100_000, b"data: [DONE]\n\n"]

    async def handler(up: ScriptedUpstream, reader: StreamReader, writer: StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(head)
        for part in parts:
            writer.write(part)
            await writer.drain()

    upstream = ScriptedUpstream(handler)
    async with upstream.client() as up:
        for _ in range(2):
            assert await read_all(up) == (200, b"".join(parts))
    assert upstream.connections == 2
    assert len(upstream.requests) == 2


async def test_a_close_delimited_body_cut_by_a_reset_is_an_error() -> None:
    async def handler(up: ScriptedUpstream, reader: StreamReader, writer: StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.05)  # scripted: the reset comes after the first bytes
        abort(writer)

    upstream = ScriptedUpstream(handler)
    async with upstream.client() as up:
        response = await up.send("POST", "/v1/x", b"", [], b"{}")
        received = b""
        with pytest.raises(UpstreamError, match="reset"):
            async for chunk in response.chunks():
                received += chunk
        await response.aclose()
    assert received == b"partial"


# -- a request is sent once --------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["reset", "close"])
async def test_closed_after_reading_the_request_on_a_fresh_connection_is_not_replayed(ending: str) -> None:
    async def handler(up: ScriptedUpstream, reader: StreamReader, writer: StreamWriter) -> None:
        await up.read_request(reader)  # the server has the request: it may have started on it
        if ending == "reset":
            abort(writer)

    upstream = ScriptedUpstream(handler)
    async with upstream.client() as up:
        with pytest.raises(UpstreamClosedEarly) as info:
            await up.send("POST", "/v1/chat/completions", b"", [], b'{"n": 1}')
    assert info.value.status == 502
    assert ("reset" if ending == "reset" else "closed") in info.value.message
    assert len(upstream.requests) == 1
    assert upstream.connections == 1


@pytest.mark.parametrize("ending", ["reset", "close"])
async def test_closed_after_reading_the_request_on_a_reused_connection_is_not_replayed(ending: str) -> None:
    async def handler(up: ScriptedUpstream, reader: StreamReader, writer: StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(OK)  # the first request is answered; the connection stays open for the next
        await writer.drain()
        await up.read_request(reader)
        if ending == "reset":
            abort(writer)

    upstream = ScriptedUpstream(handler)
    async with upstream.client() as up:
        assert await read_all(up) == (200, b"{}")
        with pytest.raises(UpstreamClosedEarly) as info:
            await up.send("POST", "/v1/chat/completions", b"", [], b'{"n": 2}')
    assert info.value.status == 502
    assert [r.endswith(b'{"n": 2}') for r in upstream.requests] == [False, True]  # the second, once
    assert upstream.connections == 1


async def test_a_pooled_connection_the_server_dropped_is_not_written_to() -> None:
    dropped = asyncio.Event()

    async def handler(up: ScriptedUpstream, reader: StreamReader, writer: StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(OK)
        await writer.drain()
        if up.connections == 1:
            writer.close()  # the server closes the idle keep-alive connection...
            await writer.wait_closed()
            dropped.set()
            return
        await reader.read()

    upstream = ScriptedUpstream(handler)
    async with upstream.client() as up:
        assert await read_all(up) == (200, b"{}")
        await dropped.wait()  # ...and its FIN is on the client's socket before the next request
        assert await read_all(up) == (200, b"{}")
    assert upstream.connections == 2
    assert len(upstream.requests) == 2


async def test_stray_bytes_on_an_idle_connection_retire_it() -> None:
    sent = asyncio.Event()

    async def handler(up: ScriptedUpstream, reader: StreamReader, writer: StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(OK)
        await writer.drain()
        if up.connections == 1:
            writer.write(b"HTTP/1.1 200 OK\r\n")  # bytes nobody asked for
            await writer.drain()
            sent.set()
            await reader.read()
            return
        await reader.read()

    upstream = ScriptedUpstream(handler)
    async with upstream.client() as up:
        assert await read_all(up) == (200, b"{}")
        await sent.wait()
        assert await read_all(up) == (200, b"{}")
    assert upstream.connections == 2
    assert len(upstream.requests) == 2


# -- answers a proxy cannot relay --------------------------------------------------------------------------

IMPOSSIBLE = {
    "101": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    "101-bare": b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    "999": b"HTTP/1.1 999 Nine\r\ncontent-length: 2\r\n\r\n{}",
    "099": b"HTTP/1.1 099 Low\r\ncontent-length: 2\r\n\r\n{}",
    "600": b"HTTP/1.1 600 Six\r\ncontent-length: 0\r\n\r\n",
    "two-digit": b"HTTP/1.1 20 OK\r\ncontent-length: 0\r\n\r\n",
    "no-status-line": b"FOO BAR\r\n\r\n",
    "conflicting-length": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 5\r\n\r\n{}xyz",
    "identical-lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\n{}",
    "length-list": b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\n{}",
    "length-and-chunked": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n"
    b"2\r\n{}\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("answer", IMPOSSIBLE.values(), ids=IMPOSSIBLE.keys())
async def test_an_answer_that_cannot_be_relayed_is_a_502(answer: bytes) -> None:
    async def handler(up: ScriptedUpstream, reader: StreamReader, writer: StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(answer)
        await writer.drain()
        await reader.read()

    upstream = ScriptedUpstream(handler)
    async with upstream.client() as up:
        with pytest.raises(UpstreamProtocolError) as info:
            await up.send("POST", "/v1/x", b"", [], b"{}")
        assert info.value.status == 502
        assert info.value.code == "upstream_protocol_error"
        assert nothing_pooled(up)
    assert len(upstream.requests) == 1


def nothing_pooled(up: Upstream) -> bool:
    return up._h1 is not None and not up._h1._idle


async def test_interim_answers_are_skipped() -> None:
    async def handler(up: ScriptedUpstream, reader: StreamReader, writer: StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\nx-final: 1\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()
        await reader.read()

    upstream = ScriptedUpstream(handler)
    async with upstream.client() as up:
        response = await up.send("POST", "/v1/x", b"", [], b"{}")
        assert response.status == 201
        assert response.raw_headers == [(b"x-final", b"1"), (b"content-length", b"2")]
        assert b"".join([chunk async for chunk in response.chunks()]) == b"{}"
        await response.aclose()


# -- bounded headers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["one-huge-header", "many-headers"])
async def test_headers_over_the_bound_are_a_502(shape: str) -> None:
    async def handler(up: ScriptedUpstream, reader: StreamReader, writer: StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        if shape == "one-huge-header":
            writer.write(b"x-big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n")
        else:
            for i in range(MAX_HEADER_BYTES // 10):
                writer.write(b"x-%05d: 1\r\n" % i)
        writer.write(b"content-length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    upstream = ScriptedUpstream(handler)
    async with upstream.client() as up:
        with pytest.raises(UpstreamProtocolError, match="headers over"):
            await up.send("POST", "/v1/x", b"", [], b"{}")


async def test_headers_just_under_the_bound_are_fine() -> None:
    async def handler(up: ScriptedUpstream, reader: StreamReader, writer: StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (MAX_HEADER_BYTES - 200) + b"\r\ncontent-length: 2\r\n\r\n{}"
        )
        await writer.drain()
        await reader.read()

    upstream = ScriptedUpstream(handler)
    async with upstream.client() as up:
        assert await read_all(up) == (200, b"{}")


async def test_dripping_headers_time_out_within_the_read_timeout() -> None:
    stop = asyncio.Event()

    async def handler(up: ScriptedUpstream, reader: StreamReader, writer: StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        while not stop.is_set():  # scripted: one header byte every 20 ms, each well inside the read timeout
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.02)

    upstream = ScriptedUpstream(handler)
    async with upstream.client(read_timeout=0.3) as up:
        try:
            async with asyncio.timeout(10):  # an upper bound for a test that must end
                with pytest.raises(UpstreamTimeout, match="did not finish its response headers") as info:
                    await up.send("POST", "/v1/x", b"", [], b"{}")
        finally:
            stop.set()
    assert info.value.status == 504
    assert len(upstream.requests) == 1
