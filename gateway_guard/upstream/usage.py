"""Token usage as the upstream reports it, read off the bytes being relayed (never buffering the stream).

* SSE (OpenAI streams): the chunk that carries ``"usage"`` (``stream_options.include_usage``); when the client
  did not ask for usage, content-bearing chunks are counted instead (an estimate: one chunk ~ one token).
* JSON (non-streamed OpenAI answers): ``usage`` of the whole body (bodies over 4 MiB are not parsed).
* NDJSON (Ollama's native API): ``prompt_eval_count`` / ``eval_count`` of the ``"done": true`` object.

Linear in the bytes fed and bounded in memory: a partial line is kept as a list of pieces (never re-joined per
chunk) and at most ``MAX_LINE`` bytes of it; a longer line is skipped up to its newline (no usage line is that long).
"""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_BODY = 4 * 1024 * 1024
MAX_LINE = 64 * 1024


class UsageMeter:
    __slots__ = (
        "_body",
        "_kind",
        "_partial",
        "_partial_size",
        "_size",
        "_skipping",
        "completion_tokens",
        "content_chunks",
        "estimated",
        "prompt_tokens",
    )

    def __init__(self, content_type: str) -> None:
        ct = content_type.lower()
        self._kind = "sse" if "event-stream" in ct else "ndjson" if "ndjson" in ct else "json" if "json" in ct else ""
        self._partial: list[bytes] = []  # the current line's pieces so far (no newline yet)
        self._partial_size = 0
        self._skipping = False  # inside a line longer than MAX_LINE: dropped up to its newline
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
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            piece = chunk[start:end]
            start = end + 1
            if self._skipping:
                self._skipping = False
            elif self._partial_size + len(piece) > MAX_LINE:
                self._drop_partial()
            elif self._partial:
                self._partial.append(piece)
                line = b"".join(self._partial)
                self._drop_partial()
                self._line(line.strip())
            else:
                self._line(piece.strip())
        rest = chunk[start:]
        if rest and not self._skipping:
            if self._partial_size + len(rest) > MAX_LINE:
                self._drop_partial()
                self._skipping = True
            else:
                self._partial.append(rest)
                self._partial_size += len(rest)

    @property
    def partial_size(self) -> int:
        """Bytes of the unfinished line held (at most ``MAX_LINE``)."""
        return self._partial_size

    def _drop_partial(self) -> None:
        self._partial.clear()
        self._partial_size = 0

    def finish(self) -> None:
        if self._kind == "json" and self._body:
            self._take(_loads(b"".join(self._body)))
        elif self._partial and not self._skipping:
            line = b"".join(self._partial)
            self._drop_partial()
            self._line(line.strip())
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
