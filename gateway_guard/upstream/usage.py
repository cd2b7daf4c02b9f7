"""Token usage as the upstream reports it, read off the bytes being relayed (never buffering the stream).

* SSE (OpenAI streams): the chunk that carries ``"usage"`` (``stream_options.include_usage``); when the client
  did not ask for usage, content-bearing chunks are counted instead (an estimate: one chunk ~ one token).
* JSON (non-streamed OpenAI answers): ``usage`` of the whole body (bodies over 4 MiB are not parsed).
* NDJSON (Ollama's native API): ``prompt_eval_count`` / ``eval_count`` of the ``"done": true`` object.
"""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_BODY = 4 * 1024 * 1024


class UsageMeter:
    __slots__ = (
        "_body",
        "_buffer",
        "_kind",
        "_size",
        "completion_tokens",
        "content_chunks",
        "estimated",
        "prompt_tokens",
    )

    def __init__(self, content_type: str) -> None:
        ct = content_type.lower()
        self._kind = "sse" if "event-stream" in ct else "ndjson" if "ndjson" in ct else "json" if "json" in ct else ""
        self._buffer = b""
        self._body: list[bytes] | None = [] if self._kind == "json" else None
        self._size = 0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.content_chunks = 0
        self.estimated = False

    def feed(self, chunk: bytes) -> None:
        if self._kind == "json":
            if self._body is not None:
                self._body.append(chunk)
                self._size += len(chunk)
                if self._size > MAX_JSON_BODY:
                    self._body = None
            return
        if not self._kind:
            return
        data = self._buffer + chunk
        *lines, self._buffer = data.split(b"\n")
        for line in lines:
            self._line(line.strip())

    def finish(self) -> None:
        if self._kind == "json" and self._body:
            self._take(_loads(b"".join(self._body)))
        elif self._buffer:
            self._line(self._buffer.strip())
            self._buffer = b""
        if self.completion_tokens is None and self.content_chunks:
            self.completion_tokens = self.content_chunks
            self.estimated = True

    def _line(self, line: bytes) -> None:
        if self._kind == "sse":
            if not line.startswith(b"data:"):
                return
            line = line[5:].strip()
            if b'"usage"' in line:
                self._take(_loads(line))
            elif b'"content"' in line or b'"text"' in line or b'"tool_calls"' in line:
                self.content_chunks += 1
        elif line:
            if b'"done":true' in line.replace(b" ", b""):
                obj = _loads(line)
                if isinstance(obj, dict):
                    self.prompt_tokens = _int(obj.get("prompt_eval_count"))
                    self.completion_tokens = _int(obj.get("eval_count"))
            else:
                self.content_chunks += 1

    def _take(self, obj: Any) -> None:
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict):
            self.prompt_tokens = _int(usage.get("prompt_tokens"))
            self.completion_tokens = _int(usage.get("completion_tokens"))


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
