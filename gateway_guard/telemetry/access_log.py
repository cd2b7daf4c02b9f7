"""One access line per request (``gateway_guard.access``), text or JSON; never a key or a request body.

The fields come from the ``RequestRecord`` only, which holds no credentials: the client's key is read by the
classifier and never stored. In JSON mode the fields travel as ``extra={"fields": ...}`` and
``JsonLogFormatter`` writes them as top-level keys of one JSON object per line.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from gateway_guard.telemetry.record import RequestRecord

access_log = logging.getLogger("gateway_guard.access")


def access_fields(record: RequestRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "method": record.method,
        "path": record.path,
        "status": record.status,
        "outcome": record.outcome.value,
        "lane": record.lane,
        "profile": record.profile,
        "upstream": record.upstream,
        "model": record.model,
        "wait_s": round(record.queue_wait, 6),
        "duration_s": round(record.duration, 6),
        "ttft_s": None if record.ttfb is None else round(record.ttfb, 6),
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "bytes_out": record.bytes_out,
        "trace_id": record.trace_id,
        "error": record.error,
    }
    return {k: v for k, v in fields.items() if v is not None}


def log_access(record: RequestRecord, *, as_json: bool) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    if as_json:
        access_log.info("%s %s %d", record.method, record.path, record.status, extra={"fields": access_fields(record)})
        return
    tokens = (
        f" tokens={record.prompt_tokens}/{record.completion_tokens}"
        if record.prompt_tokens is not None or record.completion_tokens is not None
        else ""
    )
    access_log.info(
        "%s %s status=%d outcome=%s lane=%s profile=%s upstream=%s wait=%.3fs duration=%.3fs%s%s%s%s",
        record.method,
        record.path,
        record.status,
        record.outcome.value,
        record.lane or "-",
        record.profile or "-",
        record.upstream or "-",
        record.queue_wait,
        record.duration,
        "" if record.ttfb is None else f" ttft={record.ttfb:.3f}s",
        tokens,
        f" trace_id={record.trace_id}" if record.trace_id else "",
        f" error={record.error!r}" if record.error else "",
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
