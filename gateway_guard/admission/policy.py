"""The compiled, immutable policy: what the guard enforces, built once from ``Settings`` (``Settings.compile``).

A leaf: it imports nothing of the guard's, and every room reads it. ``GuardState.apply(policy)`` is the one
way gates, limits, budgets, rate limits and routing are built, at start and on reload alike.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class Result(enum.Enum):
    """How an admitted request ended, for everything that learns from it (Netflix concurrency-limits' three).

    * ``SUCCESS``: the server answered; its hold time and tokens teach the limit, the budget and Retry-After.
    * ``IGNORED``: says nothing of the server's capacity (the client left, or the request never reached it).
    * ``DROPPED``: the server failed it (timeout, error mid-way, overload): the adaptive limit backs off.
    """

    SUCCESS = "success"
    IGNORED = "ignored"
    DROPPED = "dropped"


@dataclass(frozen=True, slots=True, kw_only=True)
class LanePolicy:
    name: str
    priority: int = 0
    queue_size: int = 64
    queue_timeout: float = 30.0
    headroom: int = 0
    refusal_status: int = 429  # when the guard must say no to this lane: 429 (Hermes waits Retry-After) or 503


@dataclass(frozen=True, slots=True, kw_only=True)
class ProfilePolicy:
    max_inflight: int | None = None
    max_queued: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RatePolicy:
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FixedLimitSpec:
    value: int
    kind: str = "fixed"


@dataclass(frozen=True, slots=True, kw_only=True)
class AdaptiveLimitSpec:
    floor: int
    ceiling: int
    kind: str = "adaptive"


LimitSpec = FixedLimitSpec | AdaptiveLimitSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetSpec:
    max_context_tokens: int
    default_output_tokens: int = 512


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeSpec:
    """How the upstream's own load is read (``upstream/probe.py``): ``kind`` auto/llamacpp/vllm/ollama."""

    kind: str = "auto"
    interval: float = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamPolicy:
    name: str
    limit: LimitSpec
    lanes: Mapping[str, LanePolicy]
    budget: BudgetSpec | None = None
    probe: ProbeSpec | None = field(default_factory=ProbeSpec)  # None: never probed
    models: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Routing:
    """Who a request is and where it goes: keys, per-profile lanes and upstreams, models, lane header."""

    upstreams: tuple[str, ...]  # in config order; the first is the default
    lanes: frozenset[str]
    keys: Mapping[str, str] = field(default_factory=dict, repr=False)  # client API key -> profile
    profile_lane: Mapping[str, str] = field(default_factory=dict)
    profile_upstream: Mapping[str, str] = field(default_factory=dict)
    model_owner: Mapping[str, str] = field(default_factory=dict)
    all_models_listed: bool = False
    default_lane: str | None = "batch"
    lane_header: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    upstreams: Mapping[str, UpstreamPolicy]
    profiles: Mapping[str, ProfilePolicy]
    routing: Routing
    lane_rates: Mapping[str, RatePolicy] = field(default_factory=dict)
    profile_rates: Mapping[str, RatePolicy] = field(default_factory=dict)
    aging_seconds: float = 10.0

    def __post_init__(self) -> None:
        for name in ("upstreams", "profiles", "lane_rates", "profile_rates"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSpec:
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may carry a password
    replica_id: str | None = None  # default: host name; the process id and a random tag are always added
    lease_seconds: float = 10.0
    namespace: str = "gg"  # key prefix: guards sharing a Redis but not their caps use different ones

    @property
    def lease_ms(self) -> int:
        return max(300, round(self.lease_seconds * 1000))

    @property
    def redis_timeout(self) -> float:
        """A call slower than this counts as Redis gone (a quarter of a lease, at most one second)."""
        return min(1.0, self.lease_seconds / 4)
