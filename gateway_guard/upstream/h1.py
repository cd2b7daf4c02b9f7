"""A small keep-alive HTTP/1.1 client for plain-http upstreams: an asyncio Protocol per connection, responses
parsed by httptools (C), a LIFO pool of idle connections per upstream. Raises only the guard's own errors.

Rules (docs/upstream-client.md):

* A request is written once. It goes on a pooled connection only after that connection was checked, just before
  the write, to be still open and silent (no EOF, reset or stray bytes pending on the socket); a dead one is
  dropped and the next (or a fresh) one taken. Once written, a close or reset before the first byte of the
  answer is an ``UpstreamClosedEarly`` (502): the server may have started on it, so it is never sent again.
* A 101, any status outside 100..599, a malformed status line, conflicting (or any duplicate) Content-Length,
  and response headers over ``MAX_HEADER_BYTES`` are an ``UpstreamProtocolError`` (502). Other 1xx interim
  answers (100, 102, 103) are skipped.
* The status line and headers must all have arrived within ``read_timeout`` of the write (a server dripping
  header bytes cannot hold a request forever); after them, ``read_timeout`` is the longest silence allowed.
* A body without Content-Length or chunked framing ends when the server closes the connection (HTTP/1.0, or
  ``Connection: close``): a clean close ends it, a reset is an error, and such a connection is never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import select
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import quote

import httptools

from gateway_guard.errors import UpstreamError
from gateway_guard.upstream.errors import (
    closed_early_error,
    closed_error,
    connect_error,
    connect_timeout_error,
    header_timeout_error,
    protocol_error,
    read_timeout_error,
    reset_error,
)

log = logging.getLogger("gateway_guard.upstream")

IDLE_EXPIRY = 2.0  # servers close idle keep-alive connections (llama.cpp's cpp-httplib after 5 s); ours sooner
STREAM_KEEPALIVE_CHECK = 0.25  # how long a connection must stay open after a stream before streams' are pooled
MAX_IDLE = 64
HIGH_WATER = 64 * 1024  # bytes read ahead of the consumer before the socket is paused
LOW_WATER = 16 * 1024
MAX_HEADER_BYTES = 64 * 1024  # status line + headers (+ any interim 1xx answers) of one response
_UNSAFE_TARGET = re.compile(r"[\x00-\x20\x7f#]")


class _Closed(Exception):
    """The connection ended (``reset`` when by an error) before the response was complete."""

    def __init__(self, reset: bool) -> None:
        self.reset = reset


class _BadResponse(Exception):
    def __init__(self, detail: str) -> None:
        self.detail = detail


class _Connection(asyncio.Protocol):
    """One TCP connection; carries one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._active = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._fd = -1
        self.idle_since = 0.0
        self.after_stream = False  # pooled after an event stream (the server is believed to keep it open)
        self._reset_message()

    def _reset_message(self) -> None:
        self.got_bytes = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self._head_bytes = 0  # bytes received before the headers were complete (a bound for dripping heads)
        self._head_size = 0  # bytes of the headers parsed (a bound for heads that arrive in one read)
        self._until_close = False
        self.status = 0
        self.keep_alive = False
        self.complete = False
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.error: Exception | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is transport:
            return
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
            with contextlib.suppress(OSError):  # not a TCP socket
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self._active or self.complete:  # bytes nobody asked for: the connection cannot be trusted
            self._fail("bytes outside any response")
            return
        self.got_bytes = True
        if not self.headers_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(str(exc) or type(exc).__name__)
        if not self.headers_done and self._head_bytes > MAX_HEADER_BYTES:
            self._fail(f"response headers over {MAX_HEADER_BYTES} bytes")
        if self.buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._active and not self.complete and self.error is None:
            if exc is None and self.headers_done and self._until_close:
                self.complete = True  # the body was delimited by the close (keep_alive stays False)
            else:
                self.error = _Closed(reset=exc is not None)
        self._wake()

    def _fail(self, detail: str) -> None:
        if self.error is None:
            self.error = _BadResponse(detail)
        self.close()

    # -- httptools callbacks ---------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request, in the same read: the connection cannot be trusted
            self._fail("bytes outside any response")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self._head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101 or not 100 <= status <= 599:
            self._fail(f"status {status} is not an answer a proxy can relay")
            return
        if self._head_size > MAX_HEADER_BYTES:
            self._fail(f"response headers over {MAX_HEADER_BYTES} bytes")
            return
        if status < 200:  # interim response (100, 102, 103): the real one follows
            self.headers = []
            return
        framed = False
        for name, _ in self.headers:
            low = name.lower()
            framed = framed or low == b"content-length" or low == b"transfer-encoding"
        self._until_close = not framed
        self.status = status
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        if not self.headers_done or self.error is not None:
            return
        self.keep_alive = self._parser.should_keep_alive()
        self.complete = True

    # -- used by the client ----------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until something new happened (bytes, end, error); TimeoutError after ``timeout`` s of silence."""
        waiter = self._loop.create_future()
        self._waiter = waiter
        handle = self._loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None

    def start(self, data: bytes) -> None:
        self._reset_message()
        self._active = True
        assert self.transport is not None
        self.transport.write(data)

    def reusable(self) -> bool:
        """Still open and silent: no EOF, reset or stray bytes waiting on the socket (checked just before a write,
        so a connection the server dropped while it sat idle is never written to)."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        if self._fd < 0:
            return True
        poller = select.poll()
        try:
            poller.register(self._fd, select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    def take(self) -> bytes:
        chunk = self.body.popleft()
        self.buffered -= len(chunk)
        if self._paused and self.buffered < LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def finish(self) -> None:
        self._active = False

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class H1Response:
    """Status and headers have arrived; the body is read by ``chunks()``."""

    __slots__ = ("_client", "_conn", "_no_body", "_read_timeout", "raw_headers", "status")

    def __init__(self, client: H1Client, conn: _Connection, read_timeout: float, no_body: bool) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self._read_timeout = read_timeout
        self._no_body = no_body
        self.status = conn.status
        self.raw_headers = conn.headers

    @property
    def content_type(self) -> str:
        for name, value in self.raw_headers:
            if name.lower() == b"content-type":
                return value.decode("latin-1")
        return ""

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive, transfer framing removed."""
        conn = self._conn
        if conn is None or self._no_body:
            return
        name = self._client.name
        while True:
            if conn.body:
                yield conn.take()
            elif conn.complete:
                return
            elif conn.error is not None:
                raise _mapped(name, conn.error)
            else:
                try:
                    await conn.wait(self._read_timeout)
                except TimeoutError:
                    raise read_timeout_error(name, self._read_timeout) from None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.finish()
        # After an event stream, only where the server keeps such connections open: llama.cpp closes the
        # connection after every streamed answer (despite its Keep-Alive header) and never runs a request written
        # before that close arrives -- a 502 the guard may not replay (tests/support/keepalive.py). So the first
        # stream's connection is watched a moment before streams' connections are pooled (``after_stream``).
        if conn.complete and conn.keep_alive and not conn.body and not conn.closed and not self._no_body:
            if "event-stream" in self.content_type:
                self._client.after_stream(conn)
            else:
                self._client.release(conn)
        else:  # unfinished: closing the socket tells the server to stop (and free its slot)
            conn.close()


def _mapped(upstream: str, error: Exception) -> UpstreamError:
    if isinstance(error, _Closed):
        return reset_error(upstream) if error.reset else closed_error(upstream)
    if isinstance(error, _BadResponse):
        return protocol_error(upstream, error.detail)
    return protocol_error(upstream)


class H1Client:
    """Requests to one ``http://host:port`` upstream over pooled keep-alive connections."""

    def __init__(self, name: str, host: str, port: int, host_header: str, connect_timeout: float) -> None:
        self.name = name
        self._host = host
        self._port = port
        self._host_line = f"host: {host_header}\r\n"
        self._connect_timeout = connect_timeout
        self._idle: deque[_Connection] = deque()
        self.streams_keep_alive: bool | None = None  # does the server keep a connection open after a stream?

    async def _connect(self, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(loop)
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_connection(lambda: conn, self._host, self._port)
        except TimeoutError:
            raise connect_timeout_error(self.name) from None
        except OSError:
            raise connect_error(self.name) from None
        if conn.transport is None:  # uvloop may call connection_made only after create_connection returned
            conn.connection_made(transport)
        return conn

    def _checkout(self) -> _Connection | None:
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # LIFO: the most recently used is the least likely to have been dropped
            if now - conn.idle_since > IDLE_EXPIRY:
                conn.close()
                while idle:  # the rest are older still
                    idle.pop().close()
                return None
            if conn.reusable():
                conn.after_stream = False
                return conn
            if conn.after_stream:  # the server does close after streams, only later than we looked
                self.streams_keep_alive = False
            conn.close()  # dropped by the server while idle: nothing was written on it
        return None

    def after_stream(self, conn: _Connection) -> None:
        """A connection whose stream ended well: pooled where streams' connections are known to stay open,
        closed where they are known not to, and while unknown, judged ``STREAM_KEEPALIVE_CHECK`` s later."""
        if self.streams_keep_alive:
            conn.after_stream = True
            self.release(conn)
        elif self.streams_keep_alive is False:
            conn.close()
        else:
            asyncio.get_running_loop().call_later(STREAM_KEEPALIVE_CHECK, self._judge, conn)

    def _judge(self, conn: _Connection) -> None:
        if conn.reusable():
            if self.streams_keep_alive is None:
                log.info("upstream %s keeps connections open after streams: pooling them", self.name)
            self.streams_keep_alive = True
            conn.after_stream = True
            self.release(conn)
        else:
            if self.streams_keep_alive is None:
                log.info("upstream %s closes connections after streams: a new one per stream", self.name)
            self.streams_keep_alive = False
            conn.close()

    def release(self, conn: _Connection) -> None:
        now = time.monotonic()
        conn.idle_since = now
        idle = self._idle
        while idle and (now - idle[0].idle_since > IDLE_EXPIRY or idle[0].closed):
            idle.popleft().close()
        if len(idle) >= MAX_IDLE:
            idle.popleft().close()
        idle.append(conn)

    def _head(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
        if not target.isascii() or _UNSAFE_TARGET.search(target):  # never a broken request line
            target = quote(target, safe="/%?&=:@!$'()*+,;-._~")
        lines = [f"{method} {target} HTTP/1.1\r\n", self._host_line]
        for name, value in headers:
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
                raise UpstreamError(f"upstream {self.name!r} transport error: invalid header {name!r}")
            lines.append(f"{name}: {value}\r\n")
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            lines.append(f"content-length: {len(body)}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        read_timeout: float,
        connect_timeout: float | None = None,
    ) -> H1Response:
        """Send and return once the status line and headers have arrived."""
        try:
            data = self._head(method, target, headers, body) + body
        except UnicodeEncodeError:
            raise UpstreamError(f"upstream {self.name!r} transport error: header not latin-1") from None
        conn = self._checkout()
        if conn is None:
            conn = await self._connect(self._connect_timeout if connect_timeout is None else connect_timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + read_timeout
        try:
            conn.start(data)  # the only write of this request: from here on it may be running upstream
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError
                await conn.wait(left)
        except _Closed as exc:
            conn.close()
            if not conn.got_bytes:
                raise closed_early_error(self.name, reset=exc.reset) from None
            raise _mapped(self.name, exc) from None
        except TimeoutError:
            conn.close()
            if conn.got_bytes:  # some header bytes, never all of them
                raise header_timeout_error(self.name, read_timeout) from None
            raise read_timeout_error(self.name, read_timeout) from None
        except _BadResponse as exc:
            conn.close()
            raise protocol_error(self.name, exc.detail) from None
        except BaseException:  # cancelled: the request may be running upstream; closing stops it
            conn.close()
            raise
        return H1Response(self, conn, read_timeout, method == "HEAD")

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()
