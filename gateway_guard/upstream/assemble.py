"""Ask the server for a stream, give the client the non-streamed answer (pure: no I/O).

llama.cpp stops a streamed generation as soon as its client hangs up, but not always a non-streamed one
(docs/upstream-client.md). So for a non-streamed completion the guard sends the same request with
``"stream": true`` (``to_stream_request``), reads the SSE answer through an ``Assembler`` and hands the client
the JSON body a non-streamed call would have returned. When the client leaves, closing the upstream connection
stops the generation.

Rules of ``to_stream_request`` (None = send the request as it is):

* only ``/v1/chat/completions`` and ``/v1/completions``, a JSON object body, ``stream`` absent, null or false;
* not when ``best_of`` is set above 1 (OpenAI refuses to stream it);
* ``stream_options`` must be absent, null or an object; ``include_usage`` is set to true in it, so the
  assembled answer carries ``usage`` as a non-streamed one does.

The ``Assembler`` merges chunks the way the OpenAI SDK's stream accumulator does: per choice ``index``, strings
in ``delta`` concatenated (content, reasoning_content, refusal, tool-call names and arguments; ``role``, ``id``,
``type`` replaced), tool calls
merged by their ``index`` (which the answer then drops), ``finish_reason`` the last one given, ``logprobs``
lists concatenated; ``id``, ``created``, ``model``, ``system_fingerprint`` from the first chunk that has them;
``usage`` and other top-level keys (llama.cpp's ``timings``) the last ones given. ``n`` > 1 is merged by index.
Memory is the size of the answer: strings are kept as lists of pieces and joined once, at the end.

Feed only a 2xx ``text/event-stream`` answer; relay any other answer (the server's own error) untouched. An
``error`` event inside the stream becomes ``Assembled(status, {"error": ...})``: the status is the error's own
numeric ``code`` when it is one (400..599), else 500.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from gateway_guard.upstream.errors import UpstreamProtocolError

CHAT_PATH = "/v1/chat/completions"
TEXT_PATH = "/v1/completions"
_OBJECT = {CHAT_PATH: "chat.completion", TEXT_PATH: "text_completion"}
MAX_EVENT = 16 * 1024 * 1024  # one SSE event (one chunk of the answer); longer is a broken stream
_TOP = ("id", "created", "model", "system_fingerprint")
_REPLACED = frozenset({"index", "type", "role", "id"})
_CHOICE_OWN = frozenset({"index", "delta", "text", "message", "finish_reason", "logprobs"})


def to_stream_request(path: str, payload: object) -> dict[str, Any] | None:
    """A copy of ``payload`` asking for a stream with usage, or None when the request is not one to convert."""
    if path not in _OBJECT or not isinstance(payload, dict):
        return None
    if payload.get("stream", False) not in (False, None):
        return None
    best_of = payload.get("best_of")
    if best_of is not None and best_of != 1:
        return None
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return None
    converted = dict(payload)
    converted["stream"] = True
    converted["stream_options"] = {**(options or {}), "include_usage": True}
    return converted


class Assembled(NamedTuple):
    status: int
    body: bytes  # JSON


class _Text:
    """A string being assembled from pieces (joined once, at the end: linear, not quadratic)."""

    __slots__ = ("parts",)

    def __init__(self, first: str) -> None:
        self.parts = [first]


class _Choice:
    __slots__ = ("extra", "finish_reason", "logprobs", "message", "text")

    def __init__(self) -> None:
        self.message: dict[str, Any] = {}
        self.text: list[str] = []
        self.finish_reason: Any = None
        self.logprobs: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}


class Assembler:
    """Fed the raw bytes of an SSE answer (chunked any way), returns the non-streamed answer's JSON."""

    __slots__ = (
        "_chat",
        "_choices",
        "_chunks",
        "_data",
        "_done",
        "_error",
        "_event",
        "_extra",
        "_object",
        "_partial",
        "_partial_size",
        "_top",
        "_upstream",
        "_usage",
    )

    def __init__(self, path: str, *, upstream: str = "upstream") -> None:
        if path not in _OBJECT:
            raise ValueError(f"no non-streamed shape for {path!r}")
        self._object = _OBJECT[path]
        self._chat = path == CHAT_PATH
        self._upstream = upstream
        self._partial: list[bytes] = []
        self._partial_size = 0
        self._data: list[str] = []
        self._event = ""
        self._top: dict[str, Any] = {}
        self._extra: dict[str, Any] = {}
        self._usage: Any = None
        self._choices: dict[int, _Choice] = {}
        self._chunks = 0
        self._done = False
        self._error: dict[str, Any] | None = None

    @property
    def error(self) -> dict[str, Any] | None:
        """The ``error`` object the stream carried, if any (the first one)."""
        return self._error

    @property
    def done(self) -> bool:
        """``data: [DONE]`` was seen."""
        return self._done

    def feed(self, data: bytes) -> None:
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            piece = data[start:end]
            start = end + 1
            if self._partial:
                self._partial.append(piece)
                piece = b"".join(self._partial)
                self._partial.clear()
                self._partial_size = 0
            self._line(piece)
        if start < len(data):
            rest = data[start:]
            self._partial_size += len(rest)
            if self._partial_size > MAX_EVENT:
                raise self._broken(f"an SSE line over {MAX_EVENT} bytes")
            self._partial.append(rest)

    def finish(self) -> Assembled:
        """The answer; raises ``UpstreamProtocolError`` (502) when the stream held no chunk and no error."""
        if self._partial:
            line = b"".join(self._partial)
            self._partial.clear()
            self._line(line)
        self._dispatch()
        if self._error is not None:
            code = self._error.get("code")
            status = code if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599 else 500
            return Assembled(status, json.dumps({"error": self._error}).encode())
        if not self._chunks:
            raise self._broken("a stream without a single completion chunk")
        return Assembled(200, json.dumps(self._answer(), ensure_ascii=False).encode())

    # -- SSE -------------------------------------------------------------------------------------------------

    def _line(self, raw: bytes) -> None:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw:
            self._dispatch()
            return
        if raw.startswith(b":"):
            return
        try:
            line = raw.decode()
        except UnicodeDecodeError:
            raise self._broken("an SSE line that is not UTF-8") from None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "error":  # older llama.cpp servers wrote ``error: {...}`` lines
            self._event = "error"
            self._data.append(value)

    def _dispatch(self) -> None:
        data, event = "\n".join(self._data), self._event
        self._data.clear()
        self._event = ""
        if not data:
            return
        if data == "[DONE]":
            self._done = True
            return
        try:
            obj = json.loads(data)
        except ValueError:
            raise self._broken("an SSE event that is not JSON") from None
        if not isinstance(obj, dict):
            raise self._broken("an SSE event that is not a JSON object")
        if event == "error" or ("error" in obj and "choices" not in obj):
            if self._error is None:
                error = obj.get("error", obj)
                self._error = error if isinstance(error, dict) else {"message": str(error)}
            return
        self._chunk(obj)

    def _broken(self, what: str) -> UpstreamProtocolError:
        return UpstreamProtocolError(f"upstream {self._upstream!r} sent {what}")

    # -- merging ---------------------------------------------------------------------------------------------

    def _chunk(self, obj: dict[str, Any]) -> None:
        self._chunks += 1
        for key, value in obj.items():
            if key in _TOP:
                if value is not None and key not in self._top:
                    self._top[key] = value
            elif key == "usage":
                if value is not None:
                    self._usage = value
            elif key not in ("object", "choices"):
                self._extra[key] = value
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index")
            if not isinstance(index, int):
                index = 0
            state = self._choices.get(index)
            if state is None:
                state = self._choices[index] = _Choice()
            if self._chat:
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    _accumulate(state.message, delta)
            else:
                text = choice.get("text")
                if isinstance(text, str):
                    state.text.append(text)
            if choice.get("finish_reason") is not None:
                state.finish_reason = choice["finish_reason"]
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict):
                state.logprobs = _merge_logprobs(state.logprobs, logprobs)
            for key, value in choice.items():
                if key not in _CHOICE_OWN and value is not None:
                    state.extra[key] = value

    def _answer(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "id": self._top.get("id"),
            "object": self._object,
            "created": self._top.get("created"),
            "model": self._top.get("model"),
        }
        if "system_fingerprint" in self._top:
            answer["system_fingerprint"] = self._top["system_fingerprint"]
        answer["choices"] = [self._choice(index, self._choices[index]) for index in sorted(self._choices)]
        if self._usage is not None:
            answer["usage"] = self._usage
        for key, value in self._extra.items():
            answer.setdefault(key, value)
        return answer

    def _choice(self, index: int, state: _Choice) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self._chat:
            merged = _unwrap(state.message)
            message: dict[str, Any] = {"role": merged.pop("role", None) or "assistant", "content": None}
            message.update(merged)
            calls = message.get("tool_calls")
            if isinstance(calls, list):
                calls.sort(key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
            choice["message"] = message
        else:
            choice["text"] = "".join(state.text)
        choice["logprobs"] = state.logprobs
        choice["finish_reason"] = state.finish_reason
        choice.update(state.extra)
        return choice


def _wrap(value: Any) -> Any:
    if isinstance(value, str):
        return _Text(value)
    if isinstance(value, dict):
        return {k: _wrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, _Text):
        return "".join(value.parts)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def _accumulate(acc: dict[str, Any], delta: dict[str, Any]) -> None:
    """``delta`` into ``acc`` as the OpenAI SDK accumulates a stream; ``index``, ``type``, ``role`` and ``id`` are
    replaced rather than added to (some servers repeat them in every chunk)."""
    for key, value in delta.items():
        current = acc.get(key)
        if current is None or key in _REPLACED:
            if value is not None or key not in acc:
                acc[key] = _wrap(value)
        elif value is None:
            continue
        elif isinstance(current, _Text) and isinstance(value, str):
            current.parts.append(value)
        elif isinstance(current, dict) and isinstance(value, dict):
            _accumulate(current, value)
        elif isinstance(current, list) and isinstance(value, list):
            _merge_list(current, value)
        else:
            acc[key] = _wrap(value)


def _merge_list(current: list[Any], delta: list[Any]) -> None:
    for entry in delta:
        index = entry.get("index") if isinstance(entry, dict) else None
        if isinstance(index, int):
            for existing in current:
                if isinstance(existing, dict) and existing.get("index") == index:
                    _accumulate(existing, entry)
                    break
            else:
                current.append(_wrap(entry))
        else:
            current.append(_wrap(entry))


def _merge_logprobs(acc: dict[str, Any] | None, delta: dict[str, Any]) -> dict[str, Any]:
    """Lists (``content``, ``refusal``, legacy ``tokens``/``token_logprobs``/...) concatenated; the rest replaced."""
    if acc is None:
        return {k: list(v) if isinstance(v, list) else v for k, v in delta.items()}
    for key, value in delta.items():
        current = acc.get(key)
        if isinstance(current, list) and isinstance(value, list):
            current.extend(value)
        elif value is not None:
            acc[key] = list(value) if isinstance(value, list) else value
    return acc
