"""The lease tables of one upstream in Redis, through the Lua scripts of ``scripts.py`` (redis-py's asyncio client).

Every method is one round trip running one script; a ``redis.exceptions.RedisError`` (connection refused, timeout,
a server that is loading) is the caller's sign that the shared gate cannot be used now.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway_guard.admission.cluster import scripts
from gateway_guard.admission.cluster.spec import ClusterSpec


@dataclass(frozen=True, slots=True)
class Lease:
    """One request's lease: ``member`` is ``<replica>|<request>``; ``tokens``: the token need it is counted for
    against the upstream's budget (0 without one)."""

    member: str
    lane: str
    profile: str
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class View:
    """What a script saw: its code, the leases in total and per replica (replicas alive lately with 0 included),
    and the sum of their token needs."""

    code: int
    total: int
    per_replica: Mapping[str, int] = field(default_factory=dict)
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class Synced:
    """What one ``sync`` did: a code per ask it got to (fewer than asked when one ended the call), how many of
    the releases were still there, the view after, and how many other replicas are marked waiting (an ask of
    theirs refused lately, for any reason)."""

    codes: list[int]
    released: int
    view: View
    others: int = 0


@dataclass(frozen=True, slots=True)
class Counts:
    """Cluster-wide: leases in total, per lane and per profile; requests waiting per live replica; the leases'
    token needs summed."""

    total: int
    lanes: Mapping[str, int]
    profiles: Mapping[str, int]
    queued: Mapping[str, int] = field(default_factory=dict)
    tokens: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Ask:
    """One acquire: the request's lease and what decides it (caps, rank for cross-replica ordering)."""

    lease: Lease
    cap: int
    lane_cap: int
    profile_cap: int | None
    priority: int
    waited_ms: int
    aging_ms: int
    demand_ttl_ms: int = 0  # > 0: when refused, publish this request as the replica's demand
    budget: int | None = None  # the upstream's token budget (max context tokens); the need is ``lease.tokens``


def connect(spec: ClusterSpec) -> Redis:
    """A pooled asyncio client that fails fast (no retries, short timeouts): a slow Redis is a gone Redis."""
    timeout = spec.redis_timeout
    return Redis.from_url(
        spec.redis_url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def prefix_for(upstream: str, namespace: str = "gg") -> str:
    return f"{namespace}:{{{upstream}}}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(items: list[Any]) -> dict[str, int]:
    return {_text(items[i]): int(items[i + 1]) for i in range(0, len(items), 2)}


def _view(raw: list[Any]) -> View:
    return View(int(raw[0]), int(raw[1]), _pairs(raw[3:]), int(raw[2]))


class LeaseStore:
    """The leases of one upstream; ``replica`` is this process's id (no ``|`` in it)."""

    def __init__(self, redis: Redis, upstream: str, replica: str, *, lease_ms: int, namespace: str = "gg") -> None:
        if "|" in replica or not replica:
            raise ValueError(f"a replica id must be non-empty and without '|' (got {replica!r})")
        self.redis = redis
        self.upstream = upstream
        self.replica = replica
        self.lease_ms = lease_ms
        self.prefix = prefix_for(upstream, namespace)
        self.channel = f"{self.prefix}:released"
        self._sync = redis.register_script(scripts.SYNC)
        self._renew = redis.register_script(scripts.RENEW)
        self._clear = redis.register_script(scripts.CLEAR_DEMAND)
        self._global = redis.register_script(scripts.GLOBAL_VIEW)

    def member(self, request_id: str) -> str:
        return f"{self.replica}|{request_id}"

    async def sync(
        self, releases: Sequence[Lease], asks: Sequence[Ask], *, cap: int, aging_ms: int, demand_ttl_ms: int = 0
    ) -> Synced:
        """Give back ``releases``, then ask for ``asks`` in order (rank order: the best first), in one script."""
        args: list[str | int] = [self.prefix, self.replica, self.channel, cap, self.lease_ms, aging_ms]
        args += [demand_ttl_ms, len(releases), *(lease.member for lease in releases)]
        for ask in asks:
            lease = ask.lease
            pcap = -1 if ask.profile_cap is None else ask.profile_cap
            budget = -1 if ask.budget is None else ask.budget
            args += [lease.member, lease.lane, lease.profile, ask.lane_cap, pcap, ask.priority, ask.waited_ms]
            args += [lease.tokens, budget]
        raw = await self._sync(args=args)
        codes = [int(c) for c in raw[0]]
        return Synced(codes, int(raw[1]), _view([codes[-1] if codes else scripts.OK, *raw[3:]]), int(raw[2]))

    async def acquire(self, ask: Ask) -> View:
        """One ask alone: ``View.code`` is its code."""
        synced = await self.sync([], [ask], cap=ask.cap, aging_ms=ask.aging_ms, demand_ttl_ms=ask.demand_ttl_ms)
        return synced.view

    async def release(self, lease: Lease) -> bool:
        synced = await self.sync([lease], [], cap=0, aging_ms=1)
        return synced.released == 1

    async def renew(self, leases: Iterable[Lease], *, recovering: bool = False, queued: int = 0) -> View:
        """Upsert every lease held now (put back any that expired or were lost) and beat the heart; ``recovering``
        (back from the fallback) starts a quiet period. ``View.code`` is 1 while the server is quiet."""
        args: list[str | int] = [self.prefix, self.replica, self.lease_ms, int(recovering), queued]
        for lease in leases:
            args += [lease.member, lease.lane, lease.profile, lease.tokens]
        return _view(await self._renew(args=args))

    async def clear_demand(self) -> None:
        await self._clear(args=[self.prefix, self.replica])

    async def counts(self) -> Counts:
        raw = await self._global(args=[self.prefix])
        return Counts(int(raw[0]), _pairs(raw[1]), _pairs(raw[2]), _pairs(raw[3]), int(raw[4]))
