"""Small pure-ASGI helpers shared by the proxy and the guard's own endpoints."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gateway_guard.errors import GuardError, Outcome, PayloadTooLarge, Rejected

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ClientDisconnected(Exception):
    """The client went away (while we read its body, waited in the queue, or streamed to it)."""


def header_list(scope: Scope) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]


async def read_body(receive: Receive, limit: int, declared: str | None) -> bytes:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes is over the guard's limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the guard's limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class BodyBudgetFull(Rejected):
    status = 429
    type = "rate_limit_error"
    code = "body_budget_full"
    outcome = Outcome.REJECTED_QUEUE_FULL

    def headers(self) -> dict[str, str]:  # the rest of the body is not read: end the connection with it
        return {**super().headers(), "connection": "close"}


class BodyBudget:
    """Bytes of request bodies the proxy holds at once, across all requests (``server.body_budget_bytes``).

    A request's body counts from its first byte read to the request's end (the proxy holds it until then:
    while queued, and while it is forwarded). Past the budget a request is refused with 429 + Retry-After
    instead of being buffered, so queued bodies cannot grow the guard's memory without bound.
    """

    __slots__ = ("held", "limit")
    RETRY_AFTER = 2.0

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def metered(self, receive: Receive) -> MeteredReceive:
        return MeteredReceive(self, receive)


class MeteredReceive:
    """A ``receive`` that charges each body chunk to the budget; ``release()`` (once, at the request's end)
    gives it all back."""

    __slots__ = ("_budget", "_receive", "charged")

    def __init__(self, budget: BodyBudget, receive: Receive) -> None:
        self._budget = budget
        self._receive = receive
        self.charged = 0

    async def __call__(self) -> Message:
        message = await self._receive()
        size = len(message.get("body", b""))
        if size:
            budget = self._budget
            if budget.held + size > budget.limit:
                raise BodyBudgetFull(
                    f"the guard holds {budget.held} bytes of request bodies, its budget is {budget.limit} "
                    "(server.body_budget_bytes); retry shortly",
                    retry_after=BodyBudget.RETRY_AFTER,
                )
            budget.held += size
            self.charged += size
        return message

    def release(self) -> None:
        self._budget.held -= self.charged
        self.charged = 0


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects (call only after the request body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class DisconnectWatch:
    """Cancels the handler's own task when the client disconnects (as ``asyncio.timeout`` cancels on expiry).

    One extra task per request, whatever the handler is doing when the client leaves: waiting in the queue,
    waiting for the upstream's headers, or relaying the stream. ``__exit__`` turns that cancellation into
    ``ClientDisconnected``; any other cancellation (server shutdown) propagates unchanged.
    """

    __slots__ = ("_receive", "_task", "_watcher", "gone")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.gone = False

    def __enter__(self) -> DisconnectWatch:
        self._task = asyncio.current_task()
        self._watcher = asyncio.ensure_future(self._watch())
        return self

    async def _watch(self) -> None:
        await wait_for_disconnect(self._receive)
        self.gone = True
        assert self._task is not None
        self._task.cancel()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        assert self._watcher is not None and self._task is not None
        self._watcher.cancel()
        if self.gone:
            if self._task.uncancel() == 0 and exc_type is asyncio.CancelledError:
                raise ClientDisconnected from exc
            if exc_type is None:
                raise ClientDisconnected


async def send_json(
    send: Send, status: int, payload: object, headers: dict[str, str] | None = None, *, body: bytes | None = None
) -> None:
    data = body if body is not None else json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


async def send_error(send: Send, error: GuardError, extra_headers: dict[str, str] | None = None) -> None:
    await send_json(send, error.status, None, {**error.headers(), **(extra_headers or {})}, body=error.body())


def bearer_is(token: str, authorization: str | None) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def is_admin(token: str | None, headers: dict[str, str]) -> bool:
    """The admin token, as ``X-Guard-Admin-Token`` or ``Authorization: Bearer``; no token configured = no admin."""
    if not token:
        return False
    given = headers.get("x-guard-admin-token") or headers.get("authorization", "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), token.encode())
