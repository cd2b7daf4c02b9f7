"""The guard's HTTP/1.1 edge: uvicorn's httptools protocol with every pre-admission resource bounded.

uvicorn bounds none of these (0.54: no header size or count limit, no timer until a first response, no cap on
connections before ``limit_concurrency`` answers 503 *after* reading the headers). Here, per connection:

- request line + headers over ``max_header_bytes``, or more than ``max_headers`` lines: **431**, closed;
- headers not complete ``header_timeout`` after the connection opened or the request's first byte (an idle
  socket, slow headers): **408**, closed;
- body not complete ``body_timeout`` after the headers (slow body, unfinished chunked body): **408**, closed;
- a body over ``max_body_bytes`` (declared or counted; ``GUARD_BODY_BYTES`` for the guard's own endpoints):
  **413**, closed;
- a proxied body whose declared length does not fit in what is left of the body budget (``app/asgi.py``,
  ``BodyBudget``, ``server.body_budget_bytes``; the bodies the proxy holds plus the declared bytes still on
  their way): **429** + ``Retry-After``, closed, before a byte of it is read; the proxy meters the bodies it
  reads (chunked ones included);
- over ``max_connections`` open: the least valuable connection is closed to make room (``app/edge_room.py``:
  silent ones, then ones stuck in their headers, then idle kept-alive ones), else **503**; over
  ``max_idle_connections`` idle keep-alive connections: the oldest is closed; an idle one is closed after
  ``keep_alive_timeout``;
- reads of the guard's own endpoints past ``server.read_rate`` (``app/read_limit.py``): **429** +
  ``Retry-After`` written here, the connection kept alive, the app never called.

A head that cannot end within ``max_header_bytes`` is refused from the bytes as they arrive, before the parser
sees them, so a header flood costs one socket read per connection. Each refusal is one warning line on
``gateway_guard.edge`` (status, reason, peer, escaped path; at most 50 at once and 10 a second after that, the
next line counting those left out).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway_guard.app.asgi import BodyBudget, BodyBudgetFull
from gateway_guard.app.edge_bytes import answer, content_length, error_answer, head_can_end, with_close
from gateway_guard.app.edge_room import Room
from gateway_guard.app.read_limit import ReadLimit
from gateway_guard.settings import ServerSettings
from gateway_guard.telemetry.access_log import escape

log = logging.getLogger("gateway_guard.edge")

LINGER = 1.0  # seconds a connection refused before its body is kept (not read) so that its client sees the answer
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


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the refusal has already been answered."""


class EdgeProtocol(HttpToolsProtocol):
    limits: EdgeLimits
    room: Room
    bodies: BodyBudget | None  # the proxy's body budget (None: no early refusal from the declared length)
    read_limit: ReadLimit | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between the request's first byte (or the connection's start) and its headers' end
        self._head_raw = 0  # bytes received while the current request's head is incomplete
        self._head_tail = b""  # the last bytes of the head so far (its end may straddle two reads)
        self._head_size = 0  # request target + header lines parsed so far
        self._header_count = 0
        self._body_limit = self.limits.max_body_bytes
        self._body_size = 0
        self._due = 0  # bytes of the declared body not yet arrived, counted in room.bodies_due
        self._app_owns = False  # whether self.cycle is the current request's (else a previous one's, or None)
        self._answered = False  # the current request was answered here (a read over server.read_rate)
        self._answered_in_read = 0  # requests answered here from the current socket read
        self._closing = False  # closed by the guard, not yet lost
        self._lingering = False  # refused, not read any more, closed LINGER after
        self._message_done = True  # the current request's body has all arrived
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # -- connection ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        now = self.loop.time()
        if len(self.connections) - self.room.closing > self.limits.max_connections and not self.room.make_room(now):
            self._refuse(503, "over server.max_connections", "too many connections to the guard; retry shortly")
            return
        self._arm_head_timer()
        self.room.fresh[self] = now

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget_due()
        if self._closing:
            self.room.closing -= 1
            self._closing = False
        self.room.discard(self)
        self._cancel_timers()
        super().connection_lost(exc)

    def drop(self, reason: str) -> None:
        log.debug("closed a connection from %s: %s", self._peer(), reason)  # routine: not a warning
        self._close()

    def on_response_complete(self, *, refused: bool = False) -> None:
        busy = bool(self.pipeline) or self._in_head  # another request is queued or has begun
        super().on_response_complete()
        if busy and not self._message_done and self._app_owns and self._body_timer is None:
            self._arm_body_timer()  # the pipelined request has started: its body is due now
        if not busy and not self.transport.is_closing():
            self.room.add_idle(self, self.limits.max_idle_connections, self.loop.time(), refused=refused)

    # -- bytes in ------------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # answered and refused: what is still on its way is not read
            return
        room = self.room
        room.busy(self)
        self._unset_keepalive_if_required()
        if self._message_done and not self._in_head:  # between requests: the next one's head begins
            self._in_head, self._app_owns, self.url = True, False, b""
        if self._in_head:
            if not self._head_raw:
                room.heads[self] = self.loop.time()
            allowed = self.limits.max_header_bytes - self._head_raw
            if len(data) > allowed and not head_can_end(self._head_tail, data, allowed):
                self._refuse(431, "headers over server.max_header_bytes", "request headers are too large")
                return
            self._head_raw += len(data)
        self._answered_in_read = 0
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
        if self._in_head:
            if self._head_raw > self.limits.max_header_bytes:
                self._refuse(431, "headers over server.max_header_bytes", "request headers are too large")
            else:
                self._head_tail = data[-3:]

    def _invalid(self) -> None:
        log.warning("400 from %s: invalid HTTP request", self._peer())
        self.send_400_response("Invalid HTTP request received.")

    # -- parser callbacks ----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_size = self._header_count = self._body_size = 0
        self._app_owns = self._answered = False
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
        self._head_raw, self._head_tail = 0, b""
        self.room.heads.pop(self, None)
        self._cancel_head_timer()
        if self.read_limit is not None and self._read_limited():
            return
        proxied = self.url.startswith(PROXIED)
        self._body_limit = self.limits.max_body_bytes if proxied else min(GUARD_BODY_BYTES, self.limits.max_body_bytes)
        declared = content_length(self.headers)
        if declared is not None and declared > self._body_limit:
            self._refuse(413, "declared body over the limit", f"request body is over {self._body_limit} bytes")
            raise _Refused
        bodies = self.bodies
        if declared and proxied and bodies is not None:
            held = bodies.held + self.room.bodies_due
            if held + declared > bodies.limit:
                full = BodyBudgetFull(
                    f"the guard holds or awaits {held} bytes of request bodies, its budget is {bodies.limit} "
                    f"(server.body_budget_bytes): no room for {declared} more; retry shortly",
                    retry_after=BodyBudget.RETRY_AFTER,
                )
                reason = "declared body over what is left of server.body_budget_bytes"
                self._refuse(429, reason, "", error_answer(full), linger=True)
                raise _Refused
            self._due = declared  # counted as held from now on: bodies declared at once cannot all pass
            self.room.bodies_due += declared
        self._message_done = False
        super().on_headers_complete()
        self._app_owns = True  # self.cycle is this request's now
        if not self.pipeline:  # a pipelined request's body deadline starts when its turn comes
            self._arm_body_timer()

    def _read_limited(self) -> bool:
        """A read of the guard's own endpoints past ``server.read_rate``: answered here with a 429 (True)."""
        assert self.read_limit is not None
        keep_alive = self.parser.should_keep_alive() and self.parser.get_http_version() != "1.0"
        method = self.parser.get_method()
        answer = self.read_limit.check(method, self.url, self.headers, self.loop.time(), close=not keep_alive)
        if answer is None:
            return False
        previous_busy = self.cycle is not None and not self.cycle.response_complete
        has_body = any(n in (b"content-length", b"transfer-encoding") for n, _ in self.headers)
        self._answered_in_read += 1
        if previous_busy or has_body or self._answered_in_read > 1 or self._writes_backed_up():
            # pipelined behind another request, or a body to read: not worth it; the connection ends here
            self._refuse(429, "reads over server.read_rate (pipelined)", "", with_close(answer))
            raise _Refused
        self._answered = True
        self.transport.write(answer)
        if not keep_alive:
            self._close()
        return True

    def _forget_due(self) -> None:
        self.room.bodies_due -= self._due
        self._due = 0

    def _writes_backed_up(self) -> bool:
        return self.transport.get_write_buffer_size() > 64 * 1024

    def on_body(self, body: bytes) -> None:
        if self._due:  # from here the proxy's meter counts these bytes
            arrived = min(self._due, len(body))
            self._due -= arrived
            self.room.bodies_due -= arrived
        self._body_size += len(body)
        if self._body_size > self._body_limit:
            self._refuse(413, "body over the limit", f"request body is over {self._body_limit} bytes")
            raise _Refused
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._message_done = True
        self._forget_due()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if self._answered:  # nothing of it went to the app: this request is over
            self._answered = False
            self.on_response_complete(refused=True)
            return
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

    def _refuse(
        self, status: int, reason: str, message: str, response: bytes | None = None, *, linger: bool = False
    ) -> None:
        """Answer ``status`` (unless a response has started), end the request for the app, close. ``linger``:
        stop reading but close only ``LINGER`` later (a client still sending its body would otherwise get a
        reset instead of the answer), meanwhile first in line to be closed for room."""
        if self.transport.is_closing():
            return
        self.room.discard(self)
        self._cancel_timers()
        budget = self.room.log_budget
        if budget.take(self.loop.time()):
            path = escape(self.url[:200].decode("latin-1")) if getattr(self, "url", b"") else "-"
            more = f" ({budget.left_out} more refusals not logged before this one)" if budget.left_out else ""
            budget.left_out = 0
            log.warning("%d from %s %s: %s%s", status, self._peer(), path, reason, more)
        cycle = self.cycle if self._app_owns else None
        previous_busy = not self._app_owns and self.cycle is not None and not self.cycle.response_complete
        previous_busy |= cycle is not None and any(c is cycle for c, _ in self.pipeline)  # queued behind one
        if not previous_busy and (cycle is None or not cycle.response_started):
            self.transport.write(response if response is not None else answer(status, message))
            if linger:
                self._lingering = True
                self.flow.pause_reading()
                self.room.add_idle(self, self.limits.max_idle_connections, self.loop.time(), refused=True)
                self._body_timer = self.loop.call_later(LINGER, self._close)
                return
        if cycle is not None:
            cycle.disconnected = True  # the app's receive() now says http.disconnect; its sends are dropped
            cycle.message_event.set()
        self._close()

    def _close(self) -> None:
        self._cancel_timers()
        if not self._closing:
            self._closing = True
            self.room.closing += 1
        self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "-"


def edge_protocol(
    limits: EdgeLimits, *, bodies: BodyBudget | None = None, read_limit: ReadLimit | None = None
) -> type[EdgeProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)``: one per server (its connections are the server's)."""
    attrs = {"limits": limits, "room": Room(), "bodies": bodies, "read_limit": read_limit}
    return type("EdgeProtocol", (EdgeProtocol,), attrs)
