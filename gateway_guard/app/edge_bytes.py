"""The bytes the edge reads and writes itself (``app/edge.py``): its canned answers (408, 413, 429, 431, 503, with
an OpenAI-style JSON body), the declared body length, and a quick look at whether a request head can end."""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from gateway_guard.errors import GuardError


def head_can_end(tail: bytes, data: bytes, allowed: int) -> bool:
    """Whether a request head could end (an empty line) within the first ``allowed`` bytes of ``data``, ``tail``
    being the last bytes before it: a C-speed search instead of parsing bytes that are refused anyway."""
    probe = tail + data[: max(0, allowed) + 3]
    return b"\n\r\n" in probe or b"\n\n" in probe


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length" and value.strip().isdigit():
            return int(value)
    return None


CODES = {408: "request_timeout", 413: "payload_too_large", 431: "request_headers_too_large", 503: "overloaded"}


def error_answer(error: GuardError) -> bytes:
    body = error.body()
    headers = {**error.headers(), "content-type": "application/json", "content-length": str(len(body))}
    head = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items())
    return STATUS_LINE[error.status] + head + b"\r\n" + body


def with_close(response: bytes) -> bytes:
    if b"\r\nconnection: close\r\n" in response:
        return response
    head, _, body = response.partition(b"\r\n\r\n")
    return head + b"\r\nconnection: close\r\n\r\n" + body


def answer(status: int, message: str) -> bytes:
    kind = "overloaded_error" if status == 503 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "code": CODES[status]}}).encode()
    retry = b"retry-after: 1\r\n" if status == 503 else b""
    head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n" % len(body)
    return STATUS_LINE[status] + head + retry + b"\r\n" + body
