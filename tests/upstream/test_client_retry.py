"""When a request is sent again, and when it is not (real sockets, no mocks): only a pooled connection found dead
before the write is skipped; a request the server has read is never replayed (docs/upstream-client.md)."""

from __future__ import annotations

import asyncio

import pytest

from gateway_guard.settings import UpstreamSettings
from gateway_guard.upstream.client import Upstream
from gateway_guard.upstream.errors import UpstreamClosedEarly

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def _serve(behaviour: list[str]) -> tuple[asyncio.Server, list[int]]:
    """Each accepted connection reads one request, then either answers ('ok') or closes at once ('drop')."""
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        seen.append(1)
        if behaviour.pop(0) == "ok":
            writer.write(OK)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


async def test_a_request_the_server_read_and_dropped_is_not_sent_again() -> None:
    server, seen = await _serve(["drop", "ok"])
    port = server.sockets[0].getsockname()[1]
    up = Upstream(UpstreamSettings(name="u", url=f"http://127.0.0.1:{port}"))
    try:
        with pytest.raises(UpstreamClosedEarly) as info:
            await up.send("POST", "/v1/chat/completions", b"", [], b"{}")
        assert info.value.status == 502
        assert len(seen) == 1
    finally:
        await up.aclose()
        server.close()
        await server.wait_closed()
