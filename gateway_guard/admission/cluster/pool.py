"""Leases a replica keeps for its next requests: the local fast path of the shared gate.

A request that ends gives its lease back to the pool, not to Redis, while nobody else could use it: the next
request of the same lane and profile at this replica takes it with no call to Redis. A pooled lease is still in
Redis (counted against the cap, the lane's and the profile's caps there, renewed with the live ones), so the cap
holds whoever uses it. The gate sends pooled leases back to Redis when:

* no local request took one for ``keep`` seconds (``stale``);
* another replica is waiting (``others_waiting``: it published demand, heard on the release channel, or a script
  said so), so that interactive-first, aging and the per-profile caps rank requests across replicas as before;
* a request of another lane or profile comes (a lease is counted in Redis under its lane and profile), or one
  that needs more tokens than any idle lease is counted for (it might not fit in the budget beside them);
* the replica falls back, is closed, or the cap goes down.
"""

from __future__ import annotations

from gateway_guard.admission.cluster.store import Lease


class LeasePool:
    """Idle leases (member -> when it was given back), newest last; and what is known of other replicas' demand."""

    __slots__ = ("_idle", "heard", "keep", "others_waiting")

    def __init__(self, keep: float) -> None:
        self.keep = keep  # seconds a lease may wait for a local taker; 0 turns the pool off
        self._idle: dict[str, tuple[Lease, float]] = {}
        self.others_waiting = False
        self.heard = 0  # demand messages heard so far: a script's "nobody waits" older than the last one is stale

    def __len__(self) -> int:
        return len(self._idle)

    def __contains__(self, member: str) -> bool:
        return member in self._idle

    @property
    def open(self) -> bool:
        """Whether a lease given back may be kept now."""
        return self.keep > 0 and not self.others_waiting

    def put(self, lease: Lease, now: float) -> None:
        self._idle[lease.member] = (lease, now)

    def take(self, lane: str, profile: str, tokens: int = 0) -> Lease | None:
        """The most recently given back lease of this lane and profile counted for at least ``tokens`` (the older
        ones may go stale and leave)."""
        for member in reversed(self._idle):
            lease = self._idle[member][0]
            if lease.lane == lane and lease.profile == profile and lease.tokens >= tokens:
                del self._idle[member]
                return lease
        return None

    def stale(self, now: float) -> list[Lease]:
        """Removes and returns the leases nobody took for ``keep`` seconds."""
        old = [lease for lease, since in self._idle.values() if now - since >= self.keep]
        for lease in old:
            del self._idle[lease.member]
        return old

    def drain(self) -> list[Lease]:
        leases = [lease for lease, _ in self._idle.values()]
        self._idle.clear()
        return leases

    def demand_heard(self) -> None:
        """Another replica published a waiting request."""
        self.others_waiting = True
        self.heard += 1

    def demand_seen(self, others: int, heard_before: int) -> None:
        """A script saw ``others`` replicas' live demand; it started when ``heard_before`` messages were heard."""
        if others > 0:
            self.others_waiting = True
        elif self.heard == heard_before:
            self.others_waiting = False
