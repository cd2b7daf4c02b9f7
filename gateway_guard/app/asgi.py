"""Small pure-ASGI helpers shared by the proxy and the guard's own endpoints."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gateway_guard.errors import GuardError, PayloadTooLarge

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


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects (call only after the request body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def first_or_disconnect(work: Awaitable[Any], disconnect: asyncio.Future[None]) -> Any:
    """Await ``work`` unless the client disconnects first; then cancel it and raise ``ClientDisconnected``."""
    task = asyncio.ensure_future(work)
    if disconnect.done():
        task.cancel()
    else:
        await asyncio.wait((task, disconnect), return_when=asyncio.FIRST_COMPLETED)
    if task.done() and not task.cancelled():
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:  # finished in the same turn as the disconnect: caller must still release what it got
        return task.result()
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


def is_admin(token: str | None, headers: dict[str, str]) -> bool:
    """The admin token, as ``X-Guard-Admin-Token`` or ``Authorization: Bearer``; no token configured = no admin."""
    if not token:
        return False
    given = headers.get("x-guard-admin-token") or headers.get("authorization", "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), token.encode())
