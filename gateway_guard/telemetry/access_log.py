"""One access line per request (``gateway_guard.access``), text or JSON; never a key or a request body.

The fields come from the ``RequestRecord`` only, which holds no credentials: the client's key is read by the
classifier and never stored. In JSON mode the fields travel as ``extra={"fields": ...}`` and
``JsonLogFormatter`` writes them as top-level keys of one JSON object per line.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from gateway_guard.telemetry.record import RequestRecord

access_log = logging.getLogger("gateway_guard.access")
# C0 controls (CR, LF, ESC, ...), DEL and C1 controls: a request's path or model could otherwise forge log lines
# or drive a terminal. Written as \xNN; a backslash is doubled so an escape cannot be faked either.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def escape(text: str) -> str:
    return _CONTROL.sub(lambda m: "\\\\" if m.group() == "\\" else f"\\x{ord(m.group()):02x}", text)


def _clean(value: str | None) -> str | None:
    return None if value is None else escape(value)


def access_fields(record: RequestRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "method": escape(record.method),
        "path": escape(record.path),
        "status": record.status,
        "outcome": record.outcome.value,
        "lane": _clean(record.lane),
        "profile": _clean(record.profile),
        "upstream": record.upstream,
        "model": _clean(record.model),
        "wait_s": round(record.queue_wait, 6),
        "duration_s": round(record.duration, 6),
        "ttft_s": None if record.ttfb is None else round(record.ttfb, 6),
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "bytes_out": record.bytes_out,
        "trace_id": record.trace_id,
        "error": _clean(record.error),
    }
    return {k: v for k, v in fields.items() if v is not None}


def log_access(record: RequestRecord, *, as_json: bool) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    method, path = escape(record.method), escape(record.path)
    if as_json:
        access_log.info("%s %s %d", method, path, record.status, extra={"fields": access_fields(record)})
        return
    tokens = (
        f" tokens={record.prompt_tokens}/{record.completion_tokens}"
        if record.prompt_tokens is not None or record.completion_tokens is not None
        else ""
    )
    access_log.info(
        "%s %s status=%d outcome=%s lane=%s profile=%s upstream=%s wait=%.3fs duration=%.3fs%s%s%s%s",
        method,
        path,
        record.status,
        record.outcome.value,
        escape(record.lane or "-"),
        escape(record.profile or "-"),
        record.upstream or "-",
        record.queue_wait,
        record.duration,
        "" if record.ttfb is None else f" ttft={record.ttfb:.3f}s",
        tokens,
        f" trace_id={record.trace_id}" if record.trace_id else "",
        f" error={record.error!r}" if record.error else "",  # repr escapes every control character
    )


class JsonLogFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...fields}``: one valid JSON object per line, for every logger."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)
