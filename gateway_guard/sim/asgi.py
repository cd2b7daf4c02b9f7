"""Raw ASGI helpers for the sim (STYLE.md: only app/ imports starlette): bodies, JSON, streams, disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping, Sequence
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Header = tuple[bytes, bytes]

JSON_TYPE = b"application/json"
SSE_TYPE = b"text/event-stream"
NDJSON_TYPE = b"application/x-ndjson"


class ClientGone(Exception):
    """The client disconnected before the request body was read."""


def dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def openai_error(message: str, *, type_: str = "invalid_request_error", code: str | int | None = None) -> Any:
    return {"error": {"message": message, "type": type_, "code": code}}


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_json(send: Send, status: int, obj: object, headers: Sequence[Header] = ()) -> None:
    body = dumps(obj)
    await send_bytes(send, status, body, JSON_TYPE, headers)


async def send_bytes(send: Send, status: int, body: bytes, content_type: bytes, headers: Sequence[Header] = ()) -> None:
    all_headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


class Stream:
    """A chunked response whose headers go out with its first chunk (so they mark the first token)."""

    __slots__ = ("_content_type", "_send", "_started")

    def __init__(self, send: Send, content_type: bytes) -> None:
        self._send = send
        self._content_type = content_type
        self._started = False

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            headers = [(b"content-type", self._content_type), (b"cache-control", b"no-cache")]
            await self._send({"type": "http.response.start", "status": 200, "headers": headers})

    async def write(self, data: bytes) -> None:
        await self._start()
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def sse(self, obj: object) -> None:
        await self.write(b"data: " + dumps(obj) + b"\n\n")

    async def ndjson(self, obj: object) -> None:
        await self.write(dumps(obj) + b"\n")

    async def close(self) -> None:
        await self._start()
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_until_disconnect(receive: Receive, work: Coroutine[Any, Any, None]) -> bool:
    """Run ``work``; if the client goes away first (disconnect, or a send that fails), cancel it at once.

    Returns True when the client went away. The body must already be read.
    """
    work_task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait((work_task, listener), return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        work_task.cancel()
        await asyncio.gather(work_task, listener, return_exceptions=True)
    if work_task.cancelled():
        return True
    error = work_task.exception()
    if isinstance(error, OSError):  # uvicorn's ClientDisconnected from send()
        return True
    if error is not None:
        raise error
    return False
