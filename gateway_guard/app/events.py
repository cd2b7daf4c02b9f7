"""``GET /guard/events`` (Server-Sent Events of the capacity) and the ``/guard/reservations`` endpoints.

Every event is ``event: capacity`` with the whole current ``/guard/capacity`` JSON (reservations taken
off), so a client that reconnects needs no replay: one on connect, then one per change, bursts coalesced
to at most one per ``coalesce_s`` (the first change after a quiet spell goes out at once; with more than
``fanout`` listeners the interval grows so that at most ``fanout / coalesce_s`` writes a second go out in
all), and a comment line as heartbeat every ``heartbeat_s``. Clients wait on one shared future per
change: a change costs one snapshot and one write per client, no task or timer per client. The hub
watches the gates and the reservations only while at least one client listens: with nobody listening
their listener lists are empty and a request pays nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway_guard.admission.reservations import NoRoom, Reservations, apply_reservations
from gateway_guard.app.asgi import ClientDisconnected, DisconnectWatch, Receive, Scope, Send, is_admin
from gateway_guard.errors import ClientError, Forbidden, GuardError, NotFound

HEARTBEAT = b": heartbeat\n\n"


class Watchable(Protocol):
    def watch(self, listener: Callable[[], None]) -> Callable[[], None]: ...


class EventHub:
    """Fans one snapshot per change out to every connected client."""

    def __init__(
        self, snapshot: Callable[[], dict[str, Any]], sources: Callable[[], Iterable[Watchable]], *,
        heartbeat_s: float = 15.0, coalesce_s: float = 0.05, fanout: int = 25,
    ) -> None:
        self._snapshot = snapshot
        self._sources = sources
        self.heartbeat_s = heartbeat_s
        self.coalesce_s = coalesce_s
        self.fanout = fanout
        self.listeners = 0
        self.sent = 0  # snapshots built (one per coalesced change, whatever the number of clients)
        self._unwatch: list[Callable[[], None]] = []
        self._watched: list[int] = []
        self._scheduled = False
        self._last_flush = -math.inf
        self._seq = 0
        self._beat = 0
        self._data = b""
        self._next: asyncio.Future[None] | None = None  # resolved at each change, heartbeat and close
        self._beat_timer: asyncio.TimerHandle | None = None
        self.closed = False

    # -- change notification (called synchronously by gates and reservations) --

    def notify(self) -> None:
        if self._scheduled:
            return
        self._scheduled = True
        loop = asyncio.get_running_loop()
        when = self._last_flush + self.coalesce_s * max(1.0, self.listeners / self.fanout)
        if loop.time() >= when:
            loop.call_soon(self._flush)
        else:
            loop.call_at(when, self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self.listeners:
            return
        self._last_flush = asyncio.get_running_loop().time()
        self._resubscribe()
        self._seq += 1
        self._data = self.encode()
        self.sent += 1
        self._wake()

    def _wake(self) -> None:
        waiting, self._next = self._next, None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def _heartbeat(self) -> None:
        self._beat += 1
        self._wake()
        self._beat_timer = asyncio.get_running_loop().call_later(self.heartbeat_s, self._heartbeat)

    async def _wait(self) -> None:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._next)  # shielded: one client's cancellation must not cancel the others' wait

    def encode(self) -> bytes:
        return b"event: capacity\ndata: " + json.dumps(self._snapshot(), separators=(",", ":")).encode() + b"\n\n"

    def _resubscribe(self) -> None:
        """Watch the current sources (a reload may have replaced a gate)."""
        sources = list(self._sources())
        if [id(s) for s in sources] == self._watched:
            return
        self._drop_watches()
        self._unwatch = [s.watch(self.notify) for s in sources]
        self._watched = [id(s) for s in sources]

    def _drop_watches(self) -> None:
        for unwatch in self._unwatch:
            unwatch()
        self._unwatch, self._watched = [], []

    # -- clients --

    def _join(self) -> None:
        self.listeners += 1
        if self.listeners == 1:
            self._resubscribe()
            self._beat_timer = asyncio.get_running_loop().call_later(self.heartbeat_s, self._heartbeat)

    def _leave(self) -> None:
        self.listeners -= 1
        if self.listeners == 0:
            self._drop_watches()
            if self._beat_timer is not None:
                self._beat_timer.cancel()
                self._beat_timer = None

    def close(self) -> None:
        """End every stream (the server is stopping: uvicorn waits for open responses before it exits)."""
        self.closed = True
        self._wake()

    def close_on_exit_signals(self) -> None:
        """Chain SIGTERM/SIGINT (uvicorn's handlers, installed by now) so that open streams end at once."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(signum: int, frame: Any, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(self.close)
                previous(signum, frame)

            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(sig, handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI endpoint of one client's stream."""
        self._join()
        try:
            with DisconnectWatch(receive):
                headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                           (b"x-accel-buffering", b"no")]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                seq, beat = self._seq, self._beat
                await send({"type": "http.response.body", "body": self.encode(), "more_body": True})
                while not self.closed:
                    if seq == self._seq and beat == self._beat:
                        await self._wait()
                    if self.closed:
                        break
                    if seq != self._seq:
                        body = self._data
                    elif beat != self._beat:
                        body = HEARTBEAT
                    else:
                        continue
                    seq, beat = self._seq, self._beat
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientDisconnected, OSError):
            pass
        finally:
            self._leave()


# ---------------------------------------------------------------------------------------- reservations


def _headers(request: Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


def _error(error: GuardError) -> Response:
    return Response(error.body(), status_code=error.status, media_type="application/json",
                    headers=error.headers())


class Conflict(ClientError):
    status = 409
    code = "no_free_slot"


class ReservationEndpoints:
    """``POST/GET /guard/reservations``, ``DELETE /guard/reservations/{id}``: admin token required."""

    def __init__(self, reservations: Reservations, admin_token: Callable[[], str | None],
                 room: Callable[[str | None], int], upstreams: Callable[[], Mapping[str, object]]) -> None:
        self.reservations = reservations
        self._token = admin_token
        self._room = room
        self._upstreams = upstreams

    def _check(self, request: Request) -> None:
        if not is_admin(self._token(), _headers(request)):
            raise Forbidden("reservations need the admin token (server.admin_token / GUARD_ADMIN_TOKEN)")

    async def create(self, request: Request) -> Response:
        try:
            self._check(request)
            profile, n, ttl, upstream = await self._body(request)
            try:
                booked = self.reservations.book(profile, n, ttl, upstream, room=self._room(upstream))
            except NoRoom as exc:
                raise Conflict(str(exc)) from None
            now = asyncio.get_running_loop().time()
            return JSONResponse({k: v for k, v in booked.as_dict(now).items() if k != "upstream"}
                                | {"upstream": upstream}, status_code=201)
        except GuardError as error:
            return _error(error)

    async def _body(self, request: Request) -> tuple[str, int, float, str | None]:
        try:
            body = await request.json()
        except ValueError:
            raise ClientError("body must be JSON like {\"profile\": \"worker1\", \"n\": 1, \"ttl_seconds\": 60}") \
                from None
        if not isinstance(body, dict):
            raise ClientError("body must be a JSON object")
        profile, n, ttl, upstream = body.get("profile"), body.get("n"), body.get("ttl_seconds"), body.get("upstream")
        if not isinstance(profile, str) or not profile:
            raise ClientError(f"profile must be a non-empty string, got {profile!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ClientError(f"n must be an integer >= 1, got {n!r}")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
            raise ClientError(f"ttl_seconds must be a number > 0, got {ttl!r}")
        if upstream is not None and (not isinstance(upstream, str) or upstream not in self._upstreams()):
            known = ", ".join(sorted(self._upstreams()))
            raise ClientError(f"upstream must be one of: {known} (got {upstream!r})")
        return profile, n, float(ttl), upstream

    async def delete(self, request: Request) -> Response:
        try:
            self._check(request)
            rid = request.path_params["id"]
            if not self.reservations.cancel(rid):
                raise NotFound(f"no reservation {rid!r}")
            return Response(status_code=204)
        except GuardError as error:
            return _error(error)

    async def index(self, request: Request) -> Response:
        try:
            self._check(request)
            return JSONResponse({"reserved": self.reservations.reserved(), "reservations": self.reservations.list()})
        except GuardError as error:
            return _error(error)


# ---------------------------------------------------------------------------------------- wiring


class _State(Protocol):
    @property
    def gates(self) -> Mapping[str, Any]: ...
    @property
    def settings(self) -> Any: ...
    @property
    def probers(self) -> Mapping[str, Any]: ...
    @property
    def reservations(self) -> Reservations: ...


def capacity_with_reservations(state: _State, reservations: Reservations) -> dict[str, Any]:
    from gateway_guard.app.endpoints import capacity_payload

    return apply_reservations(capacity_payload(state.gates, probers=state.probers), reservations)


def free_room(payload: Mapping[str, Any], upstream: str | None) -> int:
    """Free, unreserved batch slots: overall, or on one upstream (its batch lane, else its total)."""
    if upstream is None:
        return int(payload.get("free") or 0)
    up = payload.get("upstreams", {}).get(upstream, {})
    batch = up.get("lanes", {}).get("batch")
    free = batch.get("free") if isinstance(batch, dict) else None
    return int(free if free is not None else up.get("free") or 0)


def mount(state: _State, *, heartbeat_s: float = 15.0) -> tuple[list[Any], Reservations, EventHub]:
    """The routes of this module (put them before the proxy's catch-all), the bookings and the hub."""
    from starlette.routing import Route

    reservations = state.reservations  # the state's: admission consumes them
    hub = EventHub(lambda: capacity_with_reservations(state, reservations),
                   lambda: [*state.gates.values(), reservations], heartbeat_s=heartbeat_s)
    api = ReservationEndpoints(
        reservations, lambda: state.settings.server.admin_token,
        lambda upstream: free_room(capacity_with_reservations(state, reservations), upstream),
        lambda: state.gates,
    )
    routes = [
        Route("/guard/events", hub, methods=["GET"]),
        Route("/guard/reservations", api.create, methods=["POST"]),
        Route("/guard/reservations", api.index, methods=["GET"]),
        Route("/guard/reservations/{id}", api.delete, methods=["DELETE"]),
    ]
    return routes, reservations, hub
