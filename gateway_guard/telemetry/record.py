"""What the proxy writes down about one request; read once, at its end, by logs, metrics and traces."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gateway_guard.errors import Outcome


@dataclass(slots=True)
class RequestRecord:
    """One request. Times are ``time.perf_counter()`` seconds; durations are seconds.

    The proxy marks ``queue_entered`` just before it asks the gate for a permit and ``upstream_started`` just
    before it sends upstream; from those and ``started`` / ``duration`` the trace's child spans are drawn after
    the fact (nothing but a float per phase is spent while the request runs).
    """

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
    ttfb: float | None = None  # first response byte, seconds after upstream_started
    bytes_out: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)
    queue_entered: float | None = None
    upstream_started: float | None = None
    streamed: bool = False  # the upstream answered with an SSE / NDJSON stream
    trace_id: str | None = None  # 32 hex digits: the guard's trace, else the client's traceparent
    trace: Any = field(default=None, repr=False)  # the live spans while tracing is on (telemetry.tracing)

    @property
    def admitted(self) -> bool:
        """A permit was granted (the request went to the upstream through the gate)."""
        return self.queue_entered is not None and self.upstream_started is not None
