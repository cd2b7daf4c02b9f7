"""The Redis-backed gate: one cap shared by every guard replica in front of an upstream (see docs/cluster.md).

``Cluster`` is all the rest of the guard needs: built from ``[cluster]`` (``ClusterSpec``) at start, it makes the
gates (``ClusterGate``, the same surface as ``Gate``) and the shared rate limiter, starts and stops their
background work, and says whether the cap is shared now (``status``: for /guard/ready and /metrics). Importing
this package imports redis; the guard does it only when ``[cluster]`` is set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gateway_guard.admission.budget import TokenBudget
from gateway_guard.admission.cluster.gate import ClusterGate
from gateway_guard.admission.cluster.link import FALLBACK, SHARED, ClusterStatus
from gateway_guard.admission.cluster.rates import SharedRateLimiter
from gateway_guard.admission.cluster.spec import ClusterSpec, replica_id
from gateway_guard.admission.cluster.store import LeaseStore, connect
from gateway_guard.admission.limit import Limit
from gateway_guard.admission.policy import LanePolicy, ProfilePolicy

__all__ = ["FALLBACK", "SHARED", "Cluster", "ClusterGate", "ClusterSpec", "ClusterStatus", "SharedRateLimiter"]


class Cluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.replica = replica_id(spec)
        self.redis = connect(spec)
        self.gates: dict[str, ClusterGate] = {}
        self.rates = SharedRateLimiter(self.redis, replicas=self._replicas_seen, namespace=spec.namespace)

    def gate(
        self,
        name: str,
        limit: Limit,
        lanes: Iterable[LanePolicy],
        profiles: Mapping[str, ProfilePolicy] | None = None,
        *,
        aging_seconds: float = 10.0,
        budget: TokenBudget | None = None,
    ) -> ClusterGate:
        store = LeaseStore(self.redis, name, self.replica, lease_ms=self.spec.lease_ms, namespace=self.spec.namespace)
        gate = ClusterGate(name, limit, lanes, profiles, store=store, aging_seconds=aging_seconds, budget=budget)
        self.gates[name] = gate
        return gate

    def start(self) -> None:
        """Renew, listen and grant from now on (in the running loop), so the replica counts as alive at once."""
        for gate in self.gates.values():
            gate.start()

    @property
    def status(self) -> dict[str, ClusterStatus]:
        return {name: gate.status for name, gate in self.gates.items()}

    @property
    def shared(self) -> bool:
        return all(s.shared for s in self.status.values())

    async def aclose(self) -> None:
        for gate in self.gates.values():
            await gate.aclose()
        await self.rates.aclose()
        await self.redis.aclose()

    def _replicas_seen(self) -> int:
        return max((len(s.replicas) for s in self.status.values()), default=1)
