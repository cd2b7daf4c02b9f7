"""The token budget (``max_context_tokens``) shared by replicas on one real redis-server: each lease carries its
request's token need, summed in Redis; a grant that would pass the budget waits (but for one request alone).

Leases are short here (0.9 s, as in test_cluster_gate.py); every wait is bounded. The caps are left wide (8) so
that only the budget (10 tokens) holds requests back; a request's need is its prompt size (no output estimate).
"""

from __future__ import annotations

import asyncio
import random

from gateway_guard.admission.budget import TokenBudget
from gateway_guard.admission.cluster.gate import FALLBACK, SHARED, ClusterGate
from gateway_guard.admission.cluster.store import LeaseStore, prefix_for
from gateway_guard.admission.gate import Permit
from gateway_guard.admission.limit import FixedLimit
from tests.cluster.test_cluster_gate import LANES, LEASE, Cluster, cluster, until
from tests.support.redis import RedisServer

BUDGET = 10
CAP = 8


def replica(c: Cluster, name: str) -> ClusterGate:
    store = LeaseStore(c.redis, c.upstream, name, lease_ms=round(LEASE * 1000))
    budget = TokenBudget(BUDGET, default_output=0)
    gate = ClusterGate(c.upstream, FixedLimit(CAP), LANES, {}, store=store, aging_seconds=30, budget=budget)
    c.gates.append(gate)
    return gate


async def take(gate: ClusterGate, need: int) -> Permit:
    permit = await asyncio.wait_for(gate.acquire("interactive", "p", prompt_tokens=need), 10)
    assert permit.tokens == need
    return permit


async def counted(c: Cluster) -> int:
    found = await c.read("GET", f"{prefix_for(c.upstream)}:tokens")
    assert found is None or isinstance(found, bytes)
    return int(found or 0)


async def test_replicas_share_one_token_budget_and_report_it(shared_redis: RedisServer, upstream_name: str) -> None:
    async with cluster(shared_redis, upstream_name) as c:
        a, b, d = replica(c, "a"), replica(c, "b"), replica(c, "c")
        four, three = await take(a, 4), await take(b, 3)
        # /guard/capacity's figure is the cluster's (as last seen: a renewal, lease/3, at most), not the replica's
        await until(lambda: a.snapshot().tokens_in_flight == 7 and b.snapshot().tokens_in_flight == 7)
        assert a.snapshot().max_context_tokens == BUDGET
        late = asyncio.create_task(take(d, 6))  # 7 + 6 > 10: it waits, though c itself holds nothing
        await asyncio.sleep(0.3)
        assert not late.done()
        four.release()
        six = await asyncio.wait_for(late, 10)  # 3 + 6 fits
        assert await counted(c) == 9
        big = asyncio.create_task(take(a, 12))  # larger than the budget: granted alone, once nothing holds tokens
        await asyncio.sleep(0.3)
        assert not big.done()
        three.release()
        six.release()
        twelve = await asyncio.wait_for(big, 10)
        assert await counted(c) == 12
        twelve.release()
        await until(lambda: all(not g.status.held for g in c.gates))
        await c.no_leases_left()
        assert await counted(c) == 0


async def test_replicas_under_load_never_hold_more_tokens_than_the_budget(
    shared_redis: RedisServer, upstream_name: str
) -> None:
    """Nine clients in closed loops on three replicas, needs from 1 to 12 (12: alone)."""
    async with cluster(shared_redis, upstream_name) as c:
        gates = [replica(c, name) for name in "abc"]
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + 3.0
        running: dict[int, int] = {}
        most, served, alone = 0, 0, 0

        async def client(i: int) -> None:
            nonlocal most, served, alone
            rng = random.Random(i)
            while loop.time() < stop_at:
                need = rng.choice([1, 2, 3, 5, 8] * 4 + [12])
                permit = await gate_of(i).acquire("interactive", "p", prompt_tokens=need, max_wait=30)
                running[i] = permit.tokens
                tokens = sum(running.values())
                assert tokens <= BUDGET or len(running) == 1, running
                most = max(most, tokens)
                alone += tokens > BUDGET
                await asyncio.sleep(0.005 + rng.random() * 0.02)
                del running[i]
                permit.release()
                served += 1

        def gate_of(i: int) -> ClusterGate:
            return gates[i % 3]

        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(9))), 60)
        assert served > 50 and alone > 0 and most > BUDGET // 2  # the load did reach the budget
        await until(lambda: all(not g.status.held for g in gates))
        await c.no_leases_left()
        assert await counted(c) == 0


async def test_a_dead_replicas_tokens_come_back_within_one_lease(shared_redis: RedisServer, upstream_name: str) -> None:
    async with cluster(shared_redis, upstream_name) as c:
        a, b = replica(c, "a"), replica(c, "b")
        await take(a, 8)
        await a.aclose()  # killed: no more renewals, never released
        loop = asyncio.get_running_loop()
        started = loop.time()
        permit = await take(b, 5)  # 8 + 5 > 10 until a's lease expires
        assert loop.time() - started < LEASE + 1.0
        assert await counted(c) == 5
        permit.release()


async def test_without_redis_a_replica_keeps_the_tokens_it_held(own_redis: RedisServer, upstream_name: str) -> None:
    """a holds 8 of the 10 tokens, b 2; Redis goes: b may replace a request that ends by one as small, not larger."""
    async with cluster(own_redis, upstream_name) as c:
        a, b = replica(c, "a"), replica(c, "b")
        held_a = [await take(a, 4), await take(a, 4)]
        held_b = [await take(b, 1), await take(b, 1)]
        await until(lambda: a.status.replicas.keys() >= {b.status.replica} and b.status.replicas.get(a.status.replica))
        own_redis.stop()
        await until(lambda: a.status.mode == FALLBACK and b.status.mode == FALLBACK)
        held_b.pop().release()
        larger = asyncio.create_task(take(b, 3))  # room for the request, not for its tokens: 1 + 3 > 2
        await asyncio.sleep(0.3)
        assert not larger.done()
        held_a.pop().release()
        smaller = await take(a, 2)  # 4 + 2 <= 8: a replaces its request by a smaller one
        await asyncio.sleep(0.3)
        assert not larger.done()  # never past the tokens held while Redis is gone
        own_redis.start()  # empty: the leases come back with their needs from the renewals, after a quiet period
        await until(lambda: a.status.mode == SHARED and b.status.mode == SHARED, timeout=15)
        granted = await asyncio.wait_for(larger, 10)  # 4 + 2 + 1 + 3 fits in the shared budget
        assert await counted(c) == 4 + 2 + 1 + 3  # each held request's need once
        for permit in [*held_a, *held_b, smaller, granted]:
            permit.release()
        await until(lambda: all(not g.status.held for g in c.gates))
        await c.no_leases_left()
        assert await counted(c) == 0
