"""The shared gate's local fast path (``admission/cluster/pool.py``) on a real redis-server: a released lease
serves the next local request of its lane and profile without a call to Redis, and goes back to Redis as soon as
another replica waits (for the cap, its lane or its profile), so that the cap, the ranking and the per-profile caps
hold across replicas as without it.

Pools keep their leases for a minute here (``keep_idle=60``): a lease that reaches another replica within the
tests' bounded waits got there because that replica waits, not because the lease went stale.
"""

from __future__ import annotations

import asyncio

from gateway_guard.admission.cluster.gate import ClusterGate
from gateway_guard.admission.gate import Permit
from gateway_guard.admission.policy import ProfilePolicy
from tests.cluster.test_cluster_gate import cluster, until
from tests.support.redis import RedisServer

KEEP = 60.0


async def listening(*gates: ClusterGate) -> None:
    """Started and subscribed: a replica keeps no idle lease before (it could not hear who waits)."""
    for gate in gates:
        gate.start()
    await until(lambda: all(gate.listening for gate in gates))


async def test_a_released_lease_serves_the_next_local_request(shared_redis: RedisServer, upstream_name: str) -> None:
    async with cluster(shared_redis, upstream_name) as c:
        a = c.replica("a", 2, keep_idle=KEEP)
        await listening(a)
        first = await a.acquire("batch", "p")
        (lease,) = await c.members()
        first.release()
        assert (a.status.held, a.status.idle, a.in_flight) == (0, 1, 0)
        assert await c.members() == {lease}  # still counted against the cap in Redis
        second = await a.acquire("batch", "p")
        assert await c.members() == {lease} and a.status.idle == 0  # the same lease: nothing asked of Redis
        second.release()
        other = await a.acquire("interactive", "p")  # counted under another lane: the pooled lease goes back
        (fresh,) = await c.members()
        assert fresh != lease
        other.release()
        assert a.status.idle == 1
        await a.aclose()  # closing gives the pooled lease back at once
        assert await c.leases() == 0


async def test_a_pooled_lease_nobody_takes_goes_back(shared_redis: RedisServer, upstream_name: str) -> None:
    async with cluster(shared_redis, upstream_name) as c:
        a = c.replica("a", 2, keep_idle=0.05)
        await listening(a)
        (await a.acquire("batch", "p")).release()
        await c.no_leases_left()
        assert a.status.idle == 0


async def test_a_pooled_lease_goes_to_a_waiter_at_another_replica(
    shared_redis: RedisServer, upstream_name: str
) -> None:
    async with cluster(shared_redis, upstream_name) as c:
        a, b = c.replica("a", 1, keep_idle=KEEP), c.replica("b", 1, keep_idle=KEEP)
        await listening(a, b)
        (await a.acquire("batch", "p")).release()
        assert a.status.idle == 1
        permit = await asyncio.wait_for(b.acquire("batch", "p"), 10)
        assert a.status.idle == 0 and a.status.others_waiting
        permit.release()


async def test_a_pooled_lease_of_a_capped_profile_goes_to_another_replica(
    shared_redis: RedisServer, upstream_name: str
) -> None:
    """B's request is refused for its profile's cap, not the total's: B publishes no ranked demand, but it is
    marked waiting, and A's pool gives the lease back."""
    async with cluster(shared_redis, upstream_name) as c:
        caps = {"p": ProfilePolicy(max_inflight=1)}
        a = c.replica("a", 4, profiles=caps, keep_idle=KEEP)
        b = c.replica("b", 4, profiles=caps, keep_idle=KEEP)
        await listening(a, b)
        (await a.acquire("batch", "p")).release()
        assert a.status.idle == 1 and await c.leases() == 1
        permit = await asyncio.wait_for(b.acquire("batch", "p"), 10)
        assert a.status.idle == 0
        permit.release()


async def test_interactive_at_another_replica_goes_before_a_pooled_lease_is_reused(
    shared_redis: RedisServer, upstream_name: str
) -> None:
    """A runs batch requests in a closed loop at the cap; an interactive request waits at B. The lease A's
    request gives back must go to B's interactive request, not to A's next batch request."""
    async with cluster(shared_redis, upstream_name) as c:
        a, b = c.replica("a", 2, keep_idle=KEEP), c.replica("b", 2, keep_idle=KEEP)
        await listening(a, b)
        held = [await a.acquire("batch", "p") for _ in range(2)]
        order: list[str] = []

        async def take(gate: ClusterGate, lane: str) -> Permit:
            permit = await gate.acquire(lane, "p")
            order.append(lane)
            return permit

        interactive = asyncio.create_task(take(b, "interactive"))
        await until(lambda: a.status.others_waiting)  # A heard that B waits
        held.pop().release()
        batch = asyncio.create_task(take(a, "batch"))  # A's next request comes at once
        granted = await asyncio.wait_for(interactive, 10)
        assert order == ["interactive"]
        granted.release()
        (await asyncio.wait_for(batch, 10)).release()
        assert order == ["interactive", "batch"]
        held.pop().release()


async def test_closed_loops_at_two_replicas_hold_the_cap_and_leave_nothing(
    shared_redis: RedisServer, upstream_name: str
) -> None:
    """Pools at both replicas under closed-loop load (more clients than the cap, two lanes, a capped profile):
    never more running than the cap, the profile cap held across replicas, every lease back after."""
    async with cluster(shared_redis, upstream_name) as c:
        caps = {"p0": ProfilePolicy(max_inflight=1)}
        gates = [c.replica(name, 3, profiles=caps, keep_idle=0.2) for name in "ab"]
        await listening(*gates)
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + 3.0
        running: dict[str, int] = {"p0": 0, "p1": 0}
        most = {"all": 0, "p0": 0}
        served = 0

        async def client(i: int) -> None:
            nonlocal served
            gate, lane, profile = gates[i % 2], "interactive" if i % 3 == 0 else "batch", f"p{i % 2}"
            for _ in range(100_000):  # bound; the deadline ends it long before
                if loop.time() > stop_at:
                    return
                permit = await gate.acquire(lane, profile, max_wait=30)
                running[profile] += 1
                most["all"] = max(most["all"], sum(running.values()))
                most["p0"] = max(most["p0"], running["p0"])
                await asyncio.sleep(0.002 * (i % 3))  # the request's work: 0 to 4 ms
                running[profile] -= 1
                permit.release()
                served += 1

        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(7))), 60)
        assert served > 0 and most == {"all": 3, "p0": 1}
        await until(lambda: all(not g.status.held and not g.status.idle for g in gates))
        await c.no_leases_left()
