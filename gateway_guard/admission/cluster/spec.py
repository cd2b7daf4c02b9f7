"""The ``[cluster]`` settings: a leaf (nothing but the standard library), read by ``settings.py``."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field


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


def replica_id(spec: ClusterSpec) -> str:
    """Unique per process, so that ``--workers N`` and a restarted replica never share leases."""
    base = (spec.replica_id or socket.gethostname() or "guard").replace("|", "-")
    return f"{base}:{os.getpid()}:{secrets.token_hex(2)}"
