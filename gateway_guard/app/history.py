"""What the status page shows of the recent past, kept in memory and bounded whatever the uptime.

* One point per ``resolution`` seconds per upstream (the most in flight and queued seen in that step, the last
  limit), for the last ``window`` seconds: a ring buffer of ``window / resolution`` points.
* Each upstream's state (up / down / loading, since when, why), from its prober and from how requests ended.
* The last ``max_refusals`` refusals and upstream failures (status, lane, profile, upstream, reason).
* Tokens per minute per profile: a sliding minute of ``TOKEN_STEP``-second buckets.

Pure: every call takes ``now`` (wall-clock seconds, ``time.time()`` in the guard), so tests drive a fake clock.
``sample_forever`` is the guard's loop around it (the one function here that awaits).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway_guard.errors import Outcome
from gateway_guard.telemetry import RequestRecord

log = logging.getLogger("gateway_guard")

REFUSALS = frozenset(
    {
        Outcome.REJECTED_QUEUE_FULL,
        Outcome.REJECTED_PROFILE_QUEUE,
        Outcome.EXPIRED_DEADLINE,
        Outcome.REJECTED_RATE,
        Outcome.UPSTREAM_ERROR,
        Outcome.UPSTREAM_TIMEOUT,
    }
)
TOKEN_STEP = 10  # seconds per tokens bucket; six of them make the sliding minute
MAX_PROFILES = 64  # profiles tracked for tokens; more (a config with hundreds) are summed under OTHER
OTHER = "(other)"
MAX_UPSTREAMS = 64
REASON_CHARS = 200


@dataclass(slots=True)
class _Step:
    """One point of the chart: the most seen during ``resolution`` seconds starting at ``at``."""

    at: float
    in_flight: int
    queued: int
    limit: int

    def as_list(self) -> list[float | int]:
        return [round(self.at, 1), self.in_flight, self.queued, self.limit]


@dataclass(slots=True)
class _UpstreamState:
    state: str = "unknown"  # up / down / loading, as the prober says; unknown before its first word
    since: float | None = None
    detail: str = ""

    def set(self, state: str, detail: str, now: float) -> None:
        if state != self.state:
            self.state, self.since = state, now
        self.detail = detail[:REASON_CHARS]


class History:
    """Bounded ring buffers behind ``GET /guard/history`` and the status page."""

    def __init__(self, *, window: float = 3600.0, resolution: float = 10.0, max_refusals: int = 10) -> None:
        if not 0 < resolution <= window:
            raise ValueError(f"resolution must be in (0, window]: got {resolution!r} for window {window!r}")
        self.window = window
        self.resolution = resolution
        self._points: dict[str, deque[_Step]] = {}
        self._states: dict[str, _UpstreamState] = {}
        self._refusals: deque[dict[str, Any]] = deque(maxlen=max_refusals)
        self._tokens: deque[tuple[int, dict[str, int]]] = deque(maxlen=60 // TOKEN_STEP + 1)
        self._max_points = math.ceil(window / resolution)

    # -- writing ---------------------------------------------------------------------------------------------

    def sample(self, capacity: Mapping[str, Any], now: float) -> None:
        """Fold one ``/guard/capacity`` payload into the chart (call it about once a second)."""
        for name, up in capacity.get("upstreams", {}).items():
            points = self._points.get(name)
            if points is None:
                if len(self._points) >= MAX_UPSTREAMS:
                    continue
                points = self._points[name] = deque(maxlen=self._max_points)
            start = now - now % self.resolution
            in_flight, queued, limit = int(up["in_flight"]), int(up["queued"]), int(up["limit"])
            if points and points[-1].at == start:
                last = points[-1]
                last.in_flight, last.queued = max(last.in_flight, in_flight), max(last.queued, queued)
                last.limit = limit
            else:
                points.append(_Step(start, in_flight, queued, limit))
        for name in list(self._points):  # an upstream removed by a reload leaves the chart
            if name not in capacity.get("upstreams", {}):
                del self._points[name]
                self._states.pop(name, None)

    def set_state(self, upstream: str, state: str, detail: str, now: float) -> None:
        """The upstream's state as its prober says (up / down / loading; ``detail`` names no URL)."""
        if upstream in self._states or len(self._states) < MAX_UPSTREAMS:
            self._states.setdefault(upstream, _UpstreamState()).set(state, detail, now)

    def observe(self, record: RequestRecord, now: float) -> None:
        """One finished request (``Telemetry.on_finished``): refusals, tokens, and the upstream's state."""
        if record.outcome in REFUSALS:
            self._refusals.append(
                {
                    "at": round(now, 3),
                    "status": record.status,
                    "lane": record.lane,
                    "profile": record.profile,
                    "upstream": record.upstream,
                    "outcome": str(record.outcome),
                    "reason": (record.error or "")[:REASON_CHARS],
                }
            )
        if record.upstream is not None:
            if record.outcome in (Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_TIMEOUT):
                self.set_state(record.upstream, "down", record.error or str(record.outcome), now)
            elif record.outcome in (Outcome.ADMITTED, Outcome.PASSTHROUGH) and 0 < record.status < 500:
                known = self._states.get(record.upstream)
                if known is None or known.state != "up":  # else the probe's own words stay
                    self.set_state(record.upstream, "up", f"answered {record.status}", now)
        tokens = (record.prompt_tokens or 0) + (record.completion_tokens or 0)
        if tokens > 0:
            self._add_tokens(record.profile or "default", tokens, now)

    def _add_tokens(self, profile: str, tokens: int, now: float) -> None:
        step = int(now // TOKEN_STEP)
        if not self._tokens or self._tokens[-1][0] != step:
            self._tokens.append((step, {}))
        bucket = self._tokens[-1][1]
        if profile not in bucket and len(bucket) >= MAX_PROFILES:
            profile = OTHER
        bucket[profile] = bucket.get(profile, 0) + tokens

    # -- reading ---------------------------------------------------------------------------------------------

    def tokens_per_minute(self, now: float) -> dict[str, int]:
        """Prompt + completion tokens per profile over the last 60 s (to ``TOKEN_STEP`` s)."""
        oldest = int(now // TOKEN_STEP) - 60 // TOKEN_STEP + 1
        totals: dict[str, int] = {}
        for step, bucket in self._tokens:
            if step >= oldest:
                for profile, n in bucket.items():
                    totals[profile] = totals.get(profile, 0) + n
        return dict(sorted(totals.items()))

    def points(self, upstream: str, now: float) -> list[list[float | int]]:
        """``[at, in_flight, queued, limit]`` per step in the last ``window`` seconds, oldest first."""
        return [p.as_list() for p in self._points.get(upstream, ()) if p.at > now - self.window - self.resolution]

    def as_dict(self, now: float) -> dict[str, Any]:
        """The JSON of ``GET /guard/history``."""
        names = sorted(set(self._points) | set(self._states))
        upstreams: dict[str, Any] = {}
        for name in names:
            st = self._states.get(name, _UpstreamState())
            upstreams[name] = {
                "state": st.state,
                "since": None if st.since is None else round(st.since, 3),
                "detail": st.detail,
                "points": self.points(name, now),
            }
        return {
            "now": round(now, 3),
            "window_s": self.window,
            "resolution_s": self.resolution,
            "upstreams": upstreams,
            "refusals": list(reversed(self._refusals)),  # newest first
            "tokens_per_minute": self.tokens_per_minute(now),
        }


async def sample_forever(
    history: History,
    read_capacity: Callable[[], Mapping[str, Any]],
    read_states: Callable[[], Mapping[str, tuple[str, str]]],
    clock: Callable[[], float],
    *,
    every: float = 1.0,
) -> None:
    """The guard's sampler: every ``every`` s, the capacity view and each upstream's last readiness reading
    (what the probers already saw: nothing here calls an upstream)."""
    while True:
        now = clock()
        try:
            history.sample(read_capacity(), now)
            for name, (state, detail) in read_states().items():
                history.set_state(name, state, detail, now)
        except Exception:  # the page's history must never take the guard down
            log.exception("status history sampler failed; trying again")
        await asyncio.sleep(every)
