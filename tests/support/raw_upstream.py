"""A scripted upstream on a raw 127.0.0.1 socket: it sends exactly the bytes a test writes, and counts the
connections it accepted and the requests it read whole (so a test can tell whether a request was sent twice).

    upstream = ScriptedUpstream(handler)           # handler(upstream, reader, writer), one call per connection
    async with upstream.client(read_timeout=5) as up:   # an ``Upstream`` (the production h1 client) aimed at it
        ...

``handler`` reads with ``await upstream.read_request(reader)`` and answers with ``writer.write(...)``; ``abort(writer)``
resets the connection (RST) instead of closing it. With ``answer_probes`` (the default), GET requests (a guard's
health probes) are answered ``200 {}`` by ``read_request`` itself and not counted: the upstream is healthy, only
its answers to the scripted requests misbehave.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gateway_guard.settings import UpstreamSettings
from gateway_guard.upstream.client import Upstream

Handler = Callable[["ScriptedUpstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


def abort(writer: asyncio.StreamWriter) -> None:
    """Reset the connection: SO_LINGER 0, then close, so the peer gets an RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class ScriptedUpstream:
    def __init__(self, handler: Handler, *, answer_probes: bool = True) -> None:
        self.handler = handler
        self.answer_probes = answer_probes
        self._writers: dict[asyncio.StreamReader, asyncio.StreamWriter] = {}
        self.connections = 0
        self.requests: list[bytes] = []
        self.request_seen = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers[reader] = writer
        try:
            await self.handler(self, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            del self._writers[reader]
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """The next whole request (head + Content-Length body) that is not a probe, counted."""
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            request = head + await reader.readexactly(length)
            if self.answer_probes and head.startswith(b"GET "):
                self._writers[reader].write(OK)
                continue
            self.requests.append(request)
            self.request_seen.set()
            return request

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self._server = server
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self.url
        finally:
            server.close()
            await server.wait_closed()

    @contextlib.asynccontextmanager
    async def client(self, **settings: Any) -> AsyncIterator[Upstream]:
        async with self.serving() as url:
            up = Upstream(UpstreamSettings(name="u", url=url, **settings))
            try:
                yield up
            finally:
                await up.aclose()


async def read_all(up: Upstream, path: str = "/v1/x", body: bytes = b"{}") -> tuple[int, bytes]:
    """POST, read the whole body, close; (status, body)."""
    response = await up.send("POST", path, b"", [("content-type", "application/json")], body)
    try:
        data = b"".join([chunk async for chunk in response.chunks()])
    finally:
        await response.aclose()
    return response.status, data
