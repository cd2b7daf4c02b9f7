"""The h1 upstream client over real sockets: asyncio servers on 127.0.0.1, no mocks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from gateway_guard.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway_guard.settings import UpstreamSettings
from gateway_guard.upstream.client import Upstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.eof = asyncio.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body


@asynccontextmanager
async def serving(server: Server) -> AsyncIterator[Upstream]:
    srv = await asyncio.start_server(server._handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    up = Upstream(UpstreamSettings(name="u", url=f"http://127.0.0.1:{port}", read_timeout=5.0))
    try:
        yield up
    finally:
        await up.aclose()
        srv.close()
        await srv.wait_closed()


async def _read_all(up: Upstream, path: str = "/v1/x") -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    response = await up.send("POST", path, b"a=1", [("content-type", "application/json")], b"{}")
    try:
        body = b"".join([chunk async for chunk in response.chunks()])
    finally:
        await response.aclose()
    return response.status, body, response.raw_headers


async def test_content_length_body_and_the_request_on_the_wire() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()

    server = Server(handler)
    async with serving(server) as up:
        status, body, headers = await _read_all(up)
    assert (status, body) == (200, b"{}")
    assert (b"content-type", b"application/json") in headers
    request = server.requests[0]
    assert request.startswith(b"POST /v1/x?a=1 HTTP/1.1\r\n")
    assert b"\r\ncontent-length: 2\r\n" in request
    assert request.endswith(b"\r\n\r\n{}")


async def test_chunked_body_split_across_packets() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel")
        await writer.drain()
        await asyncio.sleep(0)
        writer.write(b"lo\r\n")
        await writer.drain()
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
        await writer.drain()

    server = Server(handler)
    async with serving(server) as up:
        status, body, _ = await _read_all(up)
    assert (status, body) == (200, b"hello world")


async def test_stream_chunks_arrive_one_by_one() -> None:
    gates = [asyncio.Event() for _ in range(3)]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i, gate in enumerate(gates):
            await gate.wait()
            data = f"data: {i}\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    server = Server(handler)
    async with serving(server) as up:
        response = await up.send("POST", "/v1/x", b"", [], b"{}")
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        chunks = response.chunks()
        for i, gate in enumerate(gates):
            gate.set()  # the server sends the next event only now: each arrives before the following exists
            assert await anext(chunks) == f"data: {i}\n\n".encode()
        assert [c async for c in chunks] == []
        await response.aclose()


async def test_keep_alive_one_connection_for_sequential_requests() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await server.read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(OK)
            await writer.drain()

    server = Server(handler)
    async with serving(server) as up:
        for _ in range(5):
            assert await _read_all(up) == (
                200,
                b"{}",
                [(b"content-type", b"application/json"), (b"content-length", b"2")],
            )
        status, text = await up.get_text("/health")
        assert (status, text) == (200, "{}")
    assert server.connections == 2  # one for the requests, one kept for probes
    assert len(server.requests) == 6


async def test_connection_close_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()
        await reader.read()  # stays open until the client closes its end

    server = Server(handler)
    async with serving(server) as up:
        for _ in range(3):
            assert (await _read_all(up))[:2] == (200, b"{}")
    assert server.connections == 3


async def test_http_1_0_response_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()
        await reader.read()

    server = Server(handler)
    async with serving(server) as up:
        for _ in range(2):
            assert (await _read_all(up))[:2] == (200, b"{}")
    assert server.connections == 2


async def test_server_closing_an_idle_connection_does_not_fail_the_next_request() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()
        if server.connections == 1:
            closed.set()
            return  # closes the idle keep-alive connection

        await reader.read()

    server = Server(handler)
    async with serving(server) as up:
        assert (await _read_all(up))[:2] == (200, b"{}")
        await closed.wait()
        await asyncio.sleep(0.05)  # let the FIN reach the client's protocol
        assert (await _read_all(up))[:2] == (200, b"{}")
    assert server.connections == 2
    assert len(server.requests) == 2


async def test_reset_before_headers_is_a_502_and_not_sent_again() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.transport.abort()

    server = Server(handler)
    async with serving(server) as up:
        with pytest.raises(UpstreamError) as info:
            await up.send("POST", "/v1/x", b"", [], b"{}")
    assert info.value.status == 502
    assert info.value.code == "upstream_error"
    assert len(server.requests) == 1  # the server had it and may have started on it: never replayed


async def test_connect_refused_is_upstream_unavailable() -> None:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    up = Upstream(UpstreamSettings(name="u", url=f"http://127.0.0.1:{port}"))
    with pytest.raises(UpstreamUnavailable) as info:
        await up.send("POST", "/v1/x", b"", [], b"{}")
    assert info.value.status == 502
    assert "unreachable" in str(info.value)
    await up.aclose()


async def test_silent_server_is_a_504_after_read_timeout() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await release.wait()

    server = Server(handler)
    srv = await asyncio.start_server(server._handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    up = Upstream(UpstreamSettings(name="u", url=f"http://127.0.0.1:{port}", read_timeout=0.2))
    try:
        with pytest.raises(UpstreamTimeout) as info:
            await up.send("POST", "/v1/x", b"", [], b"{}")
        assert info.value.status == 504
        assert "0.2s" in str(info.value)
        assert len(server.requests) == 1  # a timeout is not retried
    finally:
        release.set()
        await up.aclose()
        srv.close()
        await srv.wait_closed()


async def test_silence_mid_body_is_a_504() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
        await writer.drain()
        await release.wait()

    server = Server(handler)
    srv = await asyncio.start_server(server._handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    up = Upstream(UpstreamSettings(name="u", url=f"http://127.0.0.1:{port}", read_timeout=0.2))
    try:
        response = await up.send("POST", "/v1/x", b"", [], b"{}")
        chunks = response.chunks()
        assert await anext(chunks) == b"12345"
        with pytest.raises(UpstreamTimeout):
            await anext(chunks)
        await response.aclose()
    finally:
        release.set()
        await up.aclose()
        srv.close()
        await srv.wait_closed()


async def test_aclose_mid_body_closes_the_socket() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        assert await reader.read() == b""  # EOF: the client hung up
        server.eof.set()

    server = Server(handler)
    async with serving(server) as up:
        response = await up.send("POST", "/v1/x", b"", [], b"{}")
        chunks = response.chunks()
        assert await anext(chunks) == b"first"
        await response.aclose()
        async with asyncio.timeout(5):
            await server.eof.wait()


async def test_closed_mid_body_is_a_502() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
        await writer.drain()

    server = Server(handler)
    async with serving(server) as up:
        response = await up.send("POST", "/v1/x", b"", [], b"{}")
        with pytest.raises(UpstreamError, match="closed the connection"):
            async for _ in response.chunks():
                pass
        await response.aclose()


async def test_a_large_body_is_read_with_backpressure() -> None:
    size = 1024 * 1024

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await writer.drain()
        await reader.read()

    server = Server(handler)
    async with serving(server) as up:
        response = await up.send("POST", "/v1/x", b"", [], b"{}")
        await asyncio.sleep(0.1)  # the server has written everything it could; the client reads only so far
        h1 = response._h1
        assert h1 is not None and h1._conn is not None
        assert h1._conn.buffered < 4 * 64 * 1024
        total = 0
        async for chunk in response.chunks():
            total += len(chunk)
        assert total == size
        await response.aclose()


SSE = b"data: {}\n\ndata: [DONE]\n\n"
SSE_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s" % (len(SSE), SSE)


@pytest.mark.parametrize("closes_after_streams", [False, True])
async def test_connections_after_streams_are_pooled_only_where_the_server_keeps_them(
    closes_after_streams: bool,
) -> None:
    """llama.cpp closes the connection after every stream (and drops a request written before the close
    arrives): the client watches the first stream's connection and pools streams' connections only where the
    server keeps them open; every request is answered either way."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await server.read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(SSE_ANSWER)
            await writer.drain()
            if closes_after_streams:
                return

    server = Server(handler)
    async with serving(server) as up:
        assert await _read_all(up) == (
            200,
            SSE,
            [(b"content-type", b"text/event-stream"), (b"content-length", b"%d" % len(SSE))],
        )
        h1 = up._h1
        assert h1 is not None
        async with asyncio.timeout(5):  # the client judges the first stream's connection a moment later
            while h1.streams_keep_alive is None:
                await asyncio.sleep(0.02)
        assert h1.streams_keep_alive is (not closes_after_streams)
        for _ in range(4):
            status, body, _ = await _read_all(up)
            assert (status, body) == (200, SSE)
    assert len(server.requests) == 5
    assert server.connections == (5 if closes_after_streams else 1)
