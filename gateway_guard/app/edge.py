"""The guard's HTTP/1.1 edge: uvicorn's httptools protocol with every pre-admission resource bounded.

uvicorn bounds none of these (0.54: no header size or count limit, no timer until a first response, no cap on
connections before ``limit_concurrency`` answers 503 *after* reading the headers). Here, per connection:

- request line + headers over ``max_header_bytes``, or more than ``max_headers`` lines: **431**, closed;
- headers not complete ``header_timeout`` after the connection opened or the request's first byte (an idle
  socket, slow headers): **408**, closed;
- body not complete ``body_timeout`` after the headers (slow body, unfinished chunked body): **408**, closed;
- a body over ``max_body_bytes`` (declared or counted; ``GUARD_BODY_BYTES`` for the guard's own endpoints):
  **413**, closed;
- over ``max_connections`` open: the oldest silent one (connected ``FRESH_GRACE`` ago, no byte sent) is
  closed, else the oldest idle keep-alive one, else **503**; over
  ``max_idle_connections`` idle keep-alive connections: the oldest is closed; an idle one is closed after
  ``keep_alive_timeout``.

Each refusal is one warning line on ``gateway_guard.edge`` (status, reason, peer, escaped path; at most 50 at
once and 10 a second after that, the next line counting those left out). The bodies
themselves are counted against the global body budget by the proxy (``app/asgi.py``, ``BodyBudget``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway_guard.settings import ServerSettings
from gateway_guard.telemetry.access_log import escape

log = logging.getLogger("gateway_guard.edge")

FRESH_GRACE = 1.0  # seconds a new connection may stay silent before it can be closed to make room
GUARD_BODY_BYTES = 64 * 1024  # bodies of /guard/* and anything not proxied: small JSON at most
PROXIED = (b"/v1/", b"/api/", b"/p/")


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout: float
    body_timeout: float
    max_body_bytes: int
    max_connections: int
    max_idle_connections: int

    @classmethod
    def from_settings(cls, server: ServerSettings) -> EdgeLimits:
        return cls(
            max_header_bytes=server.max_header_bytes,
            max_headers=server.max_headers,
            header_timeout=server.header_timeout,
            body_timeout=server.body_timeout,
            max_body_bytes=server.max_body_bytes,
            max_connections=server.max_connections,
            max_idle_connections=server.max_idle_connections,
        )


class _LogBudget:
    """At most ``burst`` refusal lines at once and ``rate`` a second after that, so an attack cannot fill the
    disk through the log; the next line that is written says how many were left out."""

    __slots__ = ("at", "burst", "left_out", "level", "rate")

    def __init__(self, rate: float = 10.0, burst: float = 50.0) -> None:
        self.rate, self.burst = rate, burst
        self.level, self.at, self.left_out = burst, 0.0, 0

    def take(self, now: float) -> bool:
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level >= 1:
            self.level -= 1
            return True
        self.left_out += 1
        return False


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the refusal has already been answered."""


class _Idle:
    """One server's connections that hold no request, oldest first (dicts keep insertion order): ``waiting``
    between requests (kept alive, at most ``max_idle_connections``), ``fresh`` ones that have sent nothing."""

    __slots__ = ("closing", "fresh", "log_budget", "waiting")

    def __init__(self) -> None:
        self.waiting: dict[EdgeProtocol, None] = {}
        self.fresh: dict[EdgeProtocol, float] = {}  # -> when it connected (loop time)
        self.closing = 0  # connections the guard has closed that have not yet been reported lost
        self.log_budget = _LogBudget()

    def discard(self, conn: EdgeProtocol) -> None:
        self.waiting.pop(conn, None)
        self.fresh.pop(conn, None)

    def add_waiting(self, conn: EdgeProtocol, limit: int) -> None:
        self.waiting[conn] = None
        while len(self.waiting) > limit:
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            oldest.drop("more idle keep-alive connections than server.max_idle_connections")

    def close_oldest(self, now: float, reason: str) -> bool:
        """The oldest connection that has been silent for ``FRESH_GRACE`` (likely hostile: a real client sends
        its request at once), else the oldest kept-alive one; False if there is none."""
        if self.fresh:
            oldest, since = next(iter(self.fresh.items()))
            if now - since >= FRESH_GRACE:
                del self.fresh[oldest]
                oldest.drop(reason)
                return True
        if self.waiting:
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            oldest.drop(reason)
            return True
        return False


class EdgeProtocol(HttpToolsProtocol):
    limits: EdgeLimits
    idle: _Idle

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_raw = 0  # bytes received while the current request's head is incomplete
        self._head_size = 0  # request target + header lines parsed so far
        self._header_count = 0
        self._body_limit = self.limits.max_body_bytes
        self._body_size = 0
        self._app_owns = False  # whether self.cycle is the current request's (else a previous one's, or None)
        self._closing = False  # closed by the guard, not yet lost
        self._message_done = True  # the current request's body has all arrived
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # -- connection ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        now = self.loop.time()
        if len(self.connections) - self.idle.closing > self.limits.max_connections and not self.idle.close_oldest(
            now, "over server.max_connections: the oldest idle connection is closed"
        ):
            self._refuse(503, "over server.max_connections", "too many connections to the guard; retry shortly")
            return
        self._arm_head_timer()
        self.idle.fresh[self] = now

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closing:
            self.idle.closing -= 1
            self._closing = False
        self.idle.discard(self)
        self._cancel_timers()
        super().connection_lost(exc)

    def drop(self, reason: str) -> None:
        log.debug("closed an idle connection from %s: %s", self._peer(), reason)  # routine: not a warning
        self._close()

    def on_response_complete(self) -> None:
        busy = bool(self.pipeline) or self._in_head  # another request is queued or has begun
        super().on_response_complete()
        if busy and not self._message_done and self._app_owns and self._body_timer is None:
            self._arm_body_timer()  # the pipelined request has started: its body is due now
        if not busy and not self.transport.is_closing():
            self.idle.add_waiting(self, self.limits.max_idle_connections)

    # -- bytes in ------------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.idle.discard(self)
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_raw += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Refused):
                self._invalid()
            return
        except httptools.HttpParserError:
            self._invalid()
            return
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
            return
        if self._in_head and self._head_raw > self.limits.max_header_bytes:
            self._refuse(431, "headers over server.max_header_bytes", "request headers are too large")

    def _invalid(self) -> None:
        log.warning("400 from %s: invalid HTTP request", self._peer())
        self.send_400_response("Invalid HTTP request received.")

    # -- parser callbacks ----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_raw = self._head_size = self._header_count = self._body_size = 0
        self._app_owns = False
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_size += len(url)
        if self._head_size > self.limits.max_header_bytes:
            self._refuse(431, "request target over server.max_header_bytes", "request target is too long")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_count += 1
        self._head_size += len(name) + len(value) + 4
        if self._header_count > self.limits.max_headers:
            self._refuse(431, "more header lines than server.max_headers", "too many request headers")
            raise _Refused
        if self._head_size > self.limits.max_header_bytes:
            self._refuse(431, "headers over server.max_header_bytes", "request headers are too large")
            raise _Refused

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        proxied = self.url.startswith(PROXIED)
        self._body_limit = self.limits.max_body_bytes if proxied else min(GUARD_BODY_BYTES, self.limits.max_body_bytes)
        declared = _content_length(self.headers)
        if declared is not None and declared > self._body_limit:
            self._refuse(413, "declared body over the limit", f"request body is over {self._body_limit} bytes")
            raise _Refused
        self._message_done = False
        super().on_headers_complete()
        self._app_owns = True  # self.cycle is this request's now
        if not self.pipeline:  # a pipelined request's body deadline starts when its turn comes
            self._arm_body_timer()

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._body_limit:
            self._refuse(413, "body over the limit", f"request body is over {self._body_limit} bytes")
            raise _Refused
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._message_done = True
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # -- timers --------------------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _arm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, "headers not received within server.header_timeout", "request headers took too long")

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if not self.transport.is_closing():
            self._refuse(408, "body not received within server.body_timeout", "request body took too long")

    # -- refusing ------------------------------------------------------------------------------------------

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer ``status`` (unless a response has started), end the request for the app, close."""
        if self.transport.is_closing():
            return
        self.idle.discard(self)
        self._cancel_timers()
        budget = self.idle.log_budget
        if budget.take(self.loop.time()):
            path = escape(self.url[:200].decode("latin-1")) if getattr(self, "url", b"") else "-"
            more = f" ({budget.left_out} more refusals not logged before this one)" if budget.left_out else ""
            budget.left_out = 0
            log.warning("%d from %s %s: %s%s", status, self._peer(), path, reason, more)
        cycle = self.cycle if self._app_owns else None
        previous_busy = not self._app_owns and self.cycle is not None and not self.cycle.response_complete
        previous_busy |= cycle is not None and any(c is cycle for c, _ in self.pipeline)  # queued behind one
        if not previous_busy and (cycle is None or not cycle.response_started):
            self.transport.write(_response(status, message))
        if cycle is not None:
            cycle.disconnected = True  # the app's receive() now says http.disconnect; its sends are dropped
            cycle.message_event.set()
        self._close()

    def _close(self) -> None:
        self._cancel_timers()
        if not self._closing:
            self._closing = True
            self.idle.closing += 1
        self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "-"


def edge_protocol(limits: EdgeLimits) -> type[EdgeProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)``: one per server (its idle list is the server's)."""
    return type("EdgeProtocol", (EdgeProtocol,), {"limits": limits, "idle": _Idle()})


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length" and value.strip().isdigit():
            return int(value)
    return None


_CODES = {408: "request_timeout", 413: "payload_too_large", 431: "request_headers_too_large", 503: "overloaded"}


def _response(status: int, message: str) -> bytes:
    kind = "overloaded_error" if status == 503 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "code": _CODES[status]}}).encode()
    retry = b"retry-after: 1\r\n" if status == 503 else b""
    head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n" % len(body)
    return STATUS_LINE[status] + head + retry + b"\r\n" + body
