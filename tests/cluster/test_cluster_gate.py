"""The shared gate in one process: several ClusterGates (replicas) on one real redis-server.

Leases are short here (0.9 s) so that expiry and quiet periods pass within a test; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

import pytest
from redis.asyncio import Redis

from gateway_guard.admission.cluster.gate import FALLBACK, SHARED, ClusterGate
from gateway_guard.admission.cluster.spec import ClusterSpec
from gateway_guard.admission.cluster.store import LeaseStore, connect, prefix_for
from gateway_guard.admission.gate import Permit
from gateway_guard.admission.limit import FixedLimit
from gateway_guard.admission.policy import LanePolicy, ProfilePolicy, Result
from gateway_guard.errors import DeadlineExceeded
from tests.support.redis import RedisServer

LEASE = 0.9
LANES = [
    LanePolicy(name="interactive", priority=0, queue_timeout=20),
    LanePolicy(name="batch", priority=1, queue_timeout=60),
]


class Cluster:
    """Replicas of one upstream on one Redis; ``running`` counts permits held across all of them."""

    def __init__(self, redis: Redis, upstream: str, url: str) -> None:
        self.redis, self.upstream, self.url = redis, upstream, url
        self.gates: list[ClusterGate] = []
        self.running = 0
        self.most = 0

    def replica(
        self,
        name: str,
        cap: int,
        *,
        lanes: list[LanePolicy] = LANES,
        profiles: Mapping[str, ProfilePolicy] = {},
        keep_idle: float | None = None,
    ) -> ClusterGate:
        store = LeaseStore(self.redis, self.upstream, name, lease_ms=round(LEASE * 1000))
        gate = ClusterGate(
            self.upstream, FixedLimit(cap), lanes, profiles, store=store, aging_seconds=30, keep_idle=keep_idle
        )
        self.gates.append(gate)
        return gate

    async def hold(self, gate: ClusterGate, lane: str, profile: str, until: asyncio.Event) -> Permit:
        permit = await gate.acquire(lane, profile)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await until.wait()
        finally:
            self.running -= 1
            permit.release(Result.SUCCESS)
        return permit

    async def read(self, *command: str | int) -> object:
        """The test's own look at Redis, on a connection of its own: one pooled by the replicas' client before a
        Redis restart may be dead, and the replicas, not the test, are what must cope with that."""
        async with Redis.from_url(self.url) as redis:
            return await redis.execute_command(*command)

    async def leases(self) -> int:
        found = await self.read("ZCARD", f"{prefix_for(self.upstream)}:leases")
        assert isinstance(found, int)
        return found

    async def members(self) -> set[str]:
        found = await self.read("ZRANGE", f"{prefix_for(self.upstream)}:leases", 0, -1)
        assert isinstance(found, list)
        return {m.decode() for m in found}

    async def no_leases_left(self, timeout: float = 5.0) -> None:
        """A release rides on the pump's next round trip: give it that moment, then none may be left."""
        async with asyncio.timeout(timeout):
            while await self.leases():
                await asyncio.sleep(0.02)  # polling the server's state: no event to wait on


@contextlib.asynccontextmanager
async def cluster(server: RedisServer, upstream: str, *, booted: bool = True) -> AsyncIterator[Cluster]:
    redis = connect(ClusterSpec(redis_url=server.url, lease_seconds=LEASE))
    if booted:  # as if the cluster had run for a while: no first-start quiet period
        await redis.set(f"{prefix_for(upstream)}:epoch", 0)
    c = Cluster(redis, upstream, server.url)
    try:
        yield c
    finally:
        for gate in c.gates:
            await gate.aclose()
        await redis.aclose()


async def until(predicate: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_replicas_share_one_cap(shared_redis: RedisServer, upstream_name: str) -> None:
    async with cluster(shared_redis, upstream_name) as c:
        a, b, d = c.replica("a", 2), c.replica("b", 2), c.replica("c", 2)
        go = asyncio.Event()
        tasks = [asyncio.create_task(c.hold(g, "batch", "p", go)) for g in (a, b, d) * 3]
        await until(lambda: c.running == 2)
        await asyncio.sleep(0.3)  # a third one would have been let in by now
        assert c.running == 2 and await c.leases() == 2
        snap = a.snapshot()
        assert (snap.limit, snap.in_flight) == (2, 2)
        go.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert c.most == 2
        await until(lambda: all(not g.status.held for g in c.gates))
        await c.no_leases_left()
        assert all(g.status.mode == SHARED for g in c.gates)


async def test_interactive_at_one_replica_goes_before_batch_queued_at_another(
    shared_redis: RedisServer, upstream_name: str
) -> None:
    async with cluster(shared_redis, upstream_name) as c:
        a, b = c.replica("a", 1), c.replica("b", 1)
        first = await a.acquire("batch", "p")
        order: list[str] = []

        async def take(gate: ClusterGate, lane: str) -> None:
            permit = await gate.acquire(lane, "p")
            order.append(lane)
            permit.release()

        batch = asyncio.create_task(take(a, "batch"))
        await asyncio.sleep(0.3)  # the batch request waits (and is a's demand) before the interactive one comes
        interactive = asyncio.create_task(take(b, "interactive"))
        await asyncio.sleep(0.3)
        first.release()
        await asyncio.wait_for(asyncio.gather(batch, interactive), 20)
        assert order == ["interactive", "batch"]


async def test_a_profile_cap_holds_across_replicas(shared_redis: RedisServer, upstream_name: str) -> None:
    async with cluster(shared_redis, upstream_name) as c:
        caps = {"p": ProfilePolicy(max_inflight=1)}
        a, b = c.replica("a", 4, profiles=caps), c.replica("b", 4, profiles=caps)
        held = await a.acquire("batch", "p")
        second = asyncio.create_task(b.acquire("batch", "p"))
        other = await asyncio.wait_for(b.acquire("batch", "q"), 10)  # another profile passes meanwhile
        await asyncio.sleep(0.3)
        assert not second.done()
        held.release()
        (await asyncio.wait_for(second, 10)).release()
        other.release()


async def test_a_dead_replicas_slots_come_back_within_one_lease(shared_redis: RedisServer, upstream_name: str) -> None:
    async with cluster(shared_redis, upstream_name) as c:
        a, b = c.replica("a", 1), c.replica("b", 1)
        await a.acquire("batch", "p")
        await a.aclose()  # killed: no more renewals, never released
        loop = asyncio.get_running_loop()
        started = loop.time()
        permit = await asyncio.wait_for(b.acquire("batch", "p"), 10)
        assert loop.time() - started < LEASE + 1.0  # within one lease (plus a poll and a round trip)
        permit.release()


async def test_a_replica_that_never_reached_redis_admits_nothing(own_redis: RedisServer, upstream_name: str) -> None:
    own_redis.stop()
    async with cluster(own_redis, upstream_name, booted=False) as c:
        a = c.replica("a", 4)
        with pytest.raises(DeadlineExceeded):
            await a.acquire("batch", "p", max_wait=1.0)
        assert a.status.mode == FALLBACK and a.status.allowance == 0
        assert "unreachable" in a.status.reason


async def test_redis_restart_falls_back_to_a_share_and_comes_back_without_leaks(
    own_redis: RedisServer, upstream_name: str
) -> None:
    async with cluster(own_redis, upstream_name) as c:
        a, b = c.replica("a", 4), c.replica("b", 4)
        held_a = [await a.acquire("batch", "p") for _ in range(3)]
        held_b = [await b.acquire("batch", "p")]
        await until(lambda: a.status.replicas.keys() >= {b.status.replica} and b.status.replicas.get(a.status.replica))
        own_redis.stop()
        await until(lambda: a.status.mode == FALLBACK and b.status.mode == FALLBACK)
        # each keeps what it held: 3 and 1 of the 4
        assert (a.status.allowance, b.status.allowance) == (3, 1)
        late = asyncio.create_task(b.acquire("batch", "p"))
        await asyncio.sleep(0.3)
        assert not late.done()  # never above the cap while Redis is gone
        held_a.pop().release()
        held_a.pop().release()  # a is down to 1: it may replace them, b may not take them
        extra = await asyncio.wait_for(a.acquire("batch", "p"), 5)
        await asyncio.sleep(0.3)
        assert not late.done()
        own_redis.start()  # empty: the leases come back from the replicas' renewals, after a quiet period
        await until(lambda: a.status.mode == SHARED and b.status.mode == SHARED, timeout=15)
        granted = await asyncio.wait_for(late, 10)
        assert (a.status.held, b.status.held) == (2, 2)
        assert await c.leases() == 4  # each held request once: the survivors were put back, not added twice
        for permit in [*held_a, *held_b, extra, granted]:
            permit.release()
        await until(lambda: all(not g.status.held for g in c.gates))
        await c.no_leases_left()


async def test_under_load_a_redis_restart_never_lets_more_than_the_cap_through(
    own_redis: RedisServer, upstream_name: str
) -> None:
    """Three replicas, twelve clients in closed loops; Redis stopped mid-run and started again (empty)."""
    async with cluster(own_redis, upstream_name) as c:
        gates = [c.replica(name, 3) for name in "abc"]
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + 7.0
        served = 0

        async def client(i: int) -> None:
            nonlocal served
            gate = gates[i % 3]
            lane = "interactive" if i % 4 == 0 else "batch"
            while loop.time() < stop_at:
                permit = await gate.acquire(lane, f"p{i % 2}", max_wait=30)
                c.running += 1
                c.most = max(c.most, c.running)
                await asyncio.sleep(0.01 + (i % 5) * 0.01)
                c.running -= 1
                permit.release()
                served += 1

        clients = [asyncio.create_task(client(i)) for i in range(12)]
        await asyncio.sleep(1.5)
        own_redis.stop()
        await until(lambda: all(g.status.mode == FALLBACK for g in gates))
        fallback_served = served
        await asyncio.sleep(1.0)
        assert served > fallback_served  # the replicas kept serving from their shares
        own_redis.start()
        await asyncio.wait_for(asyncio.gather(*clients), 60)
        assert c.most <= 3
        await until(lambda: all(g.status.mode == SHARED for g in gates), timeout=15)
        await until(lambda: all(not g.status.held for g in gates))
        await c.no_leases_left()
