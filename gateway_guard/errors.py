"""One error tree for the whole guard.

    GuardError
    ├── ClientError          the request itself is wrong (400, 401, 403, 404, 413)
    ├── Rejected             admission said no (429 caller's own limit, 503 upstream saturated)
    │   ├── QueueFull
    │   ├── ProfileQueueFull
    │   ├── DeadlineExceeded
    │   └── RateLimited
    └── UpstreamError        the upstream failed (502 unreachable/reset, 504 hung)
    ConfigError              raised at start-up; names the key and the bad value (not an HTTP error)

Every HTTP error renders as an OpenAI-style body ``{"error": {"message", "type", "code", ...}}`` so the
OpenAI SDK (and so Hermes) shows the message; rejections carry an honest ``Retry-After``.
"""

from __future__ import annotations

import json
import math
from enum import StrEnum


class Outcome(StrEnum):
    """How a request ended: one low-cardinality label shared by logs, metrics and spans."""

    ADMITTED = "admitted"
    REJECTED_QUEUE_FULL = "rejected_queue_full"
    REJECTED_PROFILE_QUEUE = "rejected_profile_queue"
    EXPIRED_DEADLINE = "expired_deadline"
    REJECTED_RATE = "rejected_rate"
    REJECTED_CLIENT = "rejected_client"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    CLIENT_GONE = "client_gone"
    PASSTHROUGH = "passthrough"


class GuardError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str = "guard_error"
    outcome: Outcome = Outcome.UPSTREAM_ERROR

    def __init__(self, message: str, *, lane: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.lane = lane
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"retry-after": str(max(1, math.ceil(self.retry_after)))}

    def body(self) -> bytes:
        error: dict[str, object] = {"message": self.message, "type": self.type, "code": self.code}
        if self.lane is not None:
            error["lane"] = self.lane
        if self.retry_after is not None:
            error["retry_after_seconds"] = max(1, math.ceil(self.retry_after))
        return json.dumps({"error": error}).encode()


class ClientError(GuardError):
    status = 400
    type = "invalid_request_error"
    code = "bad_request"
    outcome = Outcome.REJECTED_CLIENT


class InvalidJSON(ClientError):
    code = "invalid_json"


class UnknownLane(ClientError):
    code = "unknown_lane"


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ClientError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class Rejected(GuardError):
    """Admission refused the request; ``retry_after`` is an estimate of when room will exist.

    A 429 by default (a lane's ``refusal_status`` may ask for 503): a Hermes worker classifies a 429 as a rate
    limit and waits the numeric ``Retry-After`` (up to 600 s) before each of its attempts, where a 5xx gets
    2-60 s of backoff. The wording must never match Hermes' overload phrases ("overloaded", "at capacity",
    "over capacity", ...): those turn a 429 into "overloaded" and its short backoff (FACTS.md)."""

    status = 429
    type = "rate_limit_error"
    code = "rejected"

    def __init__(
        self, message: str, *, lane: str | None = None, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message, lane=lane, retry_after=retry_after)
        if status is not None:
            self.status = status


class QueueFull(Rejected):
    code = "queue_full"
    outcome = Outcome.REJECTED_QUEUE_FULL


class DeadlineExceeded(Rejected):
    code = "queue_deadline_exceeded"
    outcome = Outcome.EXPIRED_DEADLINE


class ProfileQueueFull(Rejected):
    code = "profile_queue_full"
    outcome = Outcome.REJECTED_PROFILE_QUEUE


class RateLimited(Rejected):
    code = "rate_limited"
    outcome = Outcome.REJECTED_RATE


class UpstreamError(GuardError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"
    outcome = Outcome.UPSTREAM_ERROR


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    outcome = Outcome.UPSTREAM_TIMEOUT


class ConfigError(Exception):
    """A bad configuration value; the message names the key (``upstreams.gpu.max_inflight``)."""

    def __init__(self, key: str, problem: str, value: object = None) -> None:
        shown = "" if value is None else f" (got {value!r})"
        super().__init__(f"config key {key!r}: {problem}{shown}")
        self.key = key
