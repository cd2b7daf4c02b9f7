"""Logs, metrics and traces of each request: the only module that will import opentelemetry / prometheus_client.

The proxy fills one ``RequestRecord`` per request and hands it to ``Telemetry.request_finished``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from gateway_guard.errors import Outcome

access_log = logging.getLogger("gateway_guard.access")


@dataclass(slots=True)
class RequestRecord:
    method: str
    path: str
    lane: str | None = None
    profile: str | None = None
    upstream: str | None = None
    model: str | None = None
    status: int = 0
    outcome: Outcome = Outcome.PASSTHROUGH
    queue_wait: float = 0.0
    duration: float = 0.0
    ttfb: float | None = None
    bytes_out: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


class Telemetry:
    def __init__(self, *, log_json: bool = False) -> None:
        self._log_json = log_json

    def request_finished(self, record: RequestRecord) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        if self._log_json:
            access_log.info(json.dumps({k: v for k, v in asdict(record).items() if v is not None}))
            return
        access_log.info(
            "%s %s status=%d outcome=%s lane=%s profile=%s upstream=%s wait=%.3fs duration=%.3fs%s",
            record.method,
            record.path,
            record.status,
            record.outcome.value,
            record.lane or "-",
            record.profile or "-",
            record.upstream or "-",
            record.queue_wait,
            record.duration,
            f" error={record.error!r}" if record.error else "",
        )
