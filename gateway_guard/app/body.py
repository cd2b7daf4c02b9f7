"""The request body as JSON, read defensively: whatever a client sends is a 400, never a 500.

``json.loads`` alone fails a guard in three ways: deep nesting raises ``RecursionError``, an integer of more
than 4,300 digits raises a plain ``ValueError`` (CPython's int/str limit), and ``NaN`` / ``Infinity`` /
``1e999`` are accepted as numbers no upstream agrees on. Here each is an ``InvalidJSON`` (400) with an
OpenAI-style body. Nesting is bounded by the C parser's own recursion check (about 1,000 levels: it raises
``RecursionError`` cleanly, at no cost to ordinary bodies).
"""

from __future__ import annotations

import json
import math
from typing import Any

from gateway_guard.errors import ClientError, InvalidJSON

MAX_INT_DIGITS = 100  # no OpenAI / Ollama field needs more


def parse_json(body: bytes) -> Any:
    """The JSON value of ``body``; ``InvalidJSON`` (400) for anything that is not plain, finite JSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_no_constant, parse_int=_bounded_int, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc.msg} (line {exc.lineno} col {exc.colno})") from None
    except RecursionError:
        raise InvalidJSON("request body nests objects/arrays too deeply") from None
    except ValueError as exc:  # from the hooks below (and CPython's own digit limit)
        raise InvalidJSON(f"request body has a number the guard does not accept: {exc}") from None


def model_of(method: str, path: str, body: bytes, content_type: str) -> str | None:
    """The model a request names: ``GET /v1/models/<id>``, or ``"model"`` in a JSON POST body (checked whole)."""
    return read_request(method, path, body, content_type)[0]


def read_request(
    method: str, path: str, body: bytes, content_type: str
) -> tuple[str | None, dict[str, Any] | None]:
    """The model a request names and, for a JSON POST, its body parsed once (the relay reads it again for
    ``stream``): ``(model, payload)``."""
    if method == "GET" and path.startswith("/v1/models/"):
        return path.removeprefix("/v1/models/") or None, None
    if method != "POST" or not body:
        return None, None
    if content_type and "json" not in content_type:
        return None, None
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise InvalidJSON("request body must be a JSON object")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise ClientError("'model' must be a string")
    return model, payload


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range")
    return value
