"""A rate limit on the guard's own read endpoints, applied by the edge before a request reaches the app.

``/metrics``, ``/guard/ready``, ``/guard/capacity`` and the status page (``/guard``, ``/guard/``,
``/guard/status``, ``/guard/history``, ``/guard/static/*``) each cost a request's worth of routing and
rendering. A real reader asks a few times a minute (Prometheus every 15 s, guard-dispatch every 15 s, a status
page tab every 1-2 s), so each endpoint gets a token bucket of ``server.read_rate`` requests a second (burst:
two seconds' worth), shared by all clients; past it the edge answers **429** + ``Retry-After`` itself, with a
canned body, without building an ASGI request (``app/edge.py``). A request that carries the metrics token (for
``/metrics``) or the admin token is never refused, so a flood cannot blind a scraper that authenticates.
``/guard/health`` is not limited (a liveness check must not fail under a flood).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from gateway_guard.app.asgi import bearer_is, is_admin
from gateway_guard.settings import ServerSettings

# the decoded path -> its bucket's name
READ_ENDPOINTS = {
    b"/metrics": "metrics",
    b"/guard/ready": "ready",
    b"/guard/capacity": "capacity",
    b"/guard": "status page",
    b"/guard/": "status page",
    b"/guard/status": "status page",
    b"/guard/history": "status page",
}
STATIC_PREFIX = b"/guard/static/"


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; ``take`` spends one or says how long until one."""

    __slots__ = ("at", "burst", "level", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.level, self.at = burst, 0.0

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until the next one."""
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate


class ReadLimit:
    """One bucket per read endpoint; ``check`` answers None (go on) or the 429 to send. ``server`` gives the
    live [server] settings (a reload may change the rate or the tokens)."""

    __slots__ = ("buckets", "rate", "refused", "server")

    def __init__(self, server: Callable[[], ServerSettings]) -> None:
        self.server = server
        self.rate = -1.0
        self.buckets: dict[str, TokenBucket] = {}
        self.refused = 0  # requests answered 429 (the edge's refusal log lines are rate-limited themselves)

    def check(
        self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], now: float, *, close: bool
    ) -> bytes | None:
        """The 429 response to send for a limited read (``close``: says ``connection: close``), or None to let
        the request through."""
        if method not in (b"GET", b"HEAD"):
            return None
        name = endpoint_of(url)
        if name is None:
            return None
        server = self.server()
        if server.read_rate != self.rate:
            self.rate, burst = server.read_rate, max(1.0, 2.0 * server.read_rate)
            self.buckets = {n: TokenBucket(self.rate, burst) for n in set(READ_ENDPOINTS.values())}
        if self.rate <= 0:
            return None
        wait = self.buckets[name].take(now)
        if not wait or self._exempt(name, headers, server):
            return None
        self.refused += 1
        return _response(name, self.rate, wait, head_only=method == b"HEAD", close=close)

    @staticmethod
    def _exempt(name: str, headers: list[tuple[bytes, bytes]], server: ServerSettings) -> bool:
        """The tokens as the app itself checks them (``app/asgi.py``): the admin token, or for ``/metrics`` the
        metrics token. Asked only of a request the bucket would refuse, so the hot path decodes nothing."""
        metrics_token = server.metrics_token if name == "metrics" else None
        if not server.admin_token and not metrics_token:
            return False
        given = {key.decode("latin-1"): value.decode("latin-1") for key, value in headers}
        if metrics_token and bearer_is(metrics_token, given.get("authorization")):
            return True
        return is_admin(server.admin_token, given)


def endpoint_of(url: bytes) -> str | None:
    """The bucket of a request target (decoded as the router decodes it), or None if it is not limited."""
    path = url.split(b"?", 1)[0].split(b"#", 1)[0] if url[:1] == b"/" else httptools.parse_url(url).path
    if b"%" in path:
        path = unquote_to_bytes(path)
    name = READ_ENDPOINTS.get(path)
    if name is None and path.startswith(STATIC_PREFIX):
        return "status page"
    return name


def _response(name: str, rate: float, wait: float, *, head_only: bool, close: bool) -> bytes:
    retry = max(1, math.ceil(wait))
    message = f"too many requests to the guard's {name} endpoint (server.read_rate = {rate:g}/s); retry shortly"
    error = {"message": message, "type": "rate_limit_error", "code": "read_rate_limited", "retry_after_seconds": retry}
    body = json.dumps({"error": error}).encode()
    head = b"content-type: application/json\r\ncontent-length: %d\r\nretry-after: %d\r\n" % (len(body), retry)
    if close:
        head += b"connection: close\r\n"
    return STATUS_LINE[429] + head + b"\r\n" + (b"" if head_only else body)
