"""The ``[cluster]`` part of the policy, and the Redis client it makes."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSpec:
    redis_url: str = "redis://127.0.0.1:6379/0"
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


def replica_id(spec: ClusterSpec) -> str:
    """Unique per process, so that ``--workers N`` and a restarted replica never share leases."""
    base = (spec.replica_id or socket.gethostname() or "guard").replace("|", "-")
    return f"{base}:{os.getpid()}:{secrets.token_hex(2)}"


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
