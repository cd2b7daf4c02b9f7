"""A pooled connection the upstream dropped while idle must not fail a request (real sockets, no mocks)."""

from __future__ import annotations

import asyncio

import pytest

from gateway_guard.errors import UpstreamError
from gateway_guard.settings import UpstreamSettings
from gateway_guard.upstream.client import Upstream

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def _serve(behaviour: list[str]) -> tuple[asyncio.Server, list[int]]:
    """Each accepted connection reads one request, then either answers ('ok') or closes at once ('drop')."""
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        seen.append(1)
        if behaviour.pop(0) == "ok":
            writer.write(OK)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


async def test_a_connection_closed_before_any_response_byte_is_retried_once() -> None:
    server, seen = await _serve(["drop", "ok"])
    port = server.sockets[0].getsockname()[1]
    up = Upstream(UpstreamSettings(name="u", url=f"http://127.0.0.1:{port}"))
    try:
        response = await up.send("POST", "/v1/chat/completions", b"", [], b"{}")
        assert response.status == 200
        await response.aclose()
        assert len(seen) == 2
    finally:
        await up.aclose()
        server.close()
        await server.wait_closed()


async def test_an_upstream_that_always_drops_is_a_502_after_one_retry() -> None:
    server, seen = await _serve(["drop", "drop", "drop"])
    port = server.sockets[0].getsockname()[1]
    up = Upstream(UpstreamSettings(name="u", url=f"http://127.0.0.1:{port}"))
    try:
        with pytest.raises(UpstreamError) as info:
            await up.send("POST", "/v1/chat/completions", b"", [], b"{}")
        assert info.value.status == 502
        assert len(seen) == 2
    finally:
        await up.aclose()
        server.close()
        await server.wait_closed()
