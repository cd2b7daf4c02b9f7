"""Two replicas with pools on a real redis-server, driven by hypothesis: requests of two lanes and two profiles
(one capped) arrive at either replica and end in any order.

After every step the replicas must settle where no waiting request could run (by the caps, counting running
requests only: an idle lease kept at one replica while a request it could serve waits at the other is a stuck
state), and at every moment: never more running than the cap or the capped profile's cap,
never more leases in Redis than the cap, every running request's lease in Redis. After the run, closing the
replicas leaves no lease.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from redis.asyncio import Redis

from gateway_guard.admission.cluster.gate import ClusterGate
from gateway_guard.admission.cluster.spec import ClusterSpec
from gateway_guard.admission.cluster.store import LeaseStore, connect, prefix_for
from gateway_guard.admission.gate import Permit
from gateway_guard.admission.limit import FixedLimit
from gateway_guard.admission.policy import LanePolicy, ProfilePolicy
from tests.support.redis import RedisServer

CAP = 3
LANES = [
    LanePolicy(name="interactive", priority=0, queue_timeout=60),
    LanePolicy(name="batch", priority=1, queue_timeout=60),
]
LANE_CAP = {"interactive": CAP, "batch": CAP}
PROFILES = {"p": ProfilePolicy(max_inflight=1)}
PROFILE_CAP = {"p": 1, "q": CAP}
SETTLE = 5.0  # seconds a waiting request that could run may take to run (a message, a poll, a round trip)
_names = itertools.count()


class Request:
    def __init__(self, replica: int, lane: str, profile: str, task: asyncio.Task[Permit]) -> None:
        self.replica, self.lane, self.profile, self.task = replica, lane, profile, task

    @property
    def running(self) -> bool:
        return self.task.done()


class PoolMachine(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.name = f"pool{next(_names)}"
        self.prefix = prefix_for(self.name)
        self.redis: Redis = self.run(self._connect())
        self.gates: list[ClusterGate] = []
        self.requests: list[Request] = []
        self.most = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _connect(self) -> Redis:
        redis = connect(ClusterSpec(redis_url=self.url, lease_seconds=3))
        await redis.set(f"{self.prefix}:epoch", 0)  # as if booted long ago: no quiet period
        return redis

    @precondition(lambda self: not self.gates)
    @rule(keep=st.lists(st.sampled_from([0.0, 0.05, 60.0]), min_size=2, max_size=2))
    def start(self, keep: list[float]) -> None:
        """Two replicas; each keeps idle leases for none, a moment or a minute (then only waiting sends them)."""
        for i, keep_idle in enumerate(keep):
            store = LeaseStore(self.redis, self.name, f"r{i}", lease_ms=3000)
            gate = ClusterGate(self.name, FixedLimit(CAP), LANES, PROFILES, store=store, keep_idle=keep_idle)
            self.gates.append(gate)

        async def listening() -> None:
            for gate in self.gates:
                gate.start()
            async with asyncio.timeout(SETTLE):
                while not all(gate.listening for gate in self.gates):
                    await asyncio.sleep(0.005)

        self.run(listening())

    @precondition(lambda self: self.gates)
    @rule(replica=st.integers(0, 1), lane=st.sampled_from(sorted(LANE_CAP)), profile=st.sampled_from(["p", "q"]))
    def arrive(self, replica: int, lane: str, profile: str) -> None:
        """At most the cap at a replica at once: a request waiting for a lease holds a place in its replica's
        own line (step 1, whose limit is the cap), so more could wait there behind one the profile cap holds."""
        if sum(r.replica == replica for r in self.requests) >= CAP:
            return

        async def acquire() -> Permit:
            permit = await self.gates[replica].acquire(lane, profile, max_wait=60)
            self._check_caps()
            return permit

        task = self.loop.create_task(acquire())
        self.requests.append(Request(replica, lane, profile, task))
        self.run(self._settle())

    @precondition(lambda self: any(r.running for r in self.requests))
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        running = [r for r in self.requests if r.running]
        request = data.draw(st.sampled_from(running))
        self.requests.remove(request)
        request.task.result().release()
        self.run(self._settle())

    @precondition(lambda self: self.gates)
    @rule(seconds=st.sampled_from([0.01, 0.1]))
    def time_passes(self, seconds: float) -> None:
        """Idle leases may go stale, polls and messages run."""
        self.run(asyncio.sleep(seconds))
        self.run(self._settle())

    # -- checks ---------------------------------------------------------------------------------------------

    def _running(self, key: str | None = None, value: str | None = None) -> int:
        return sum(
            1 for r in self.requests if r.running and (key is None or (r.lane if key == "lane" else r.profile) == value)
        )

    def _check_caps(self) -> None:
        running = sum(1 for r in self.requests if r.task.done()) + 1  # the one just granted is not done yet
        self.most = max(self.most, running)
        assert running <= CAP

    def _could_run(self, request: Request) -> bool:
        return (
            self._running() < CAP
            and self._running("lane", request.lane) < LANE_CAP[request.lane]
            and self._running("profile", request.profile) < PROFILE_CAP[request.profile]
        )

    async def _settle(self) -> None:
        try:
            async with asyncio.timeout(SETTLE):
                while any(not r.running and self._could_run(r) for r in self.requests):
                    await asyncio.sleep(0.005)  # polling the replicas' state: no event says "nothing can run"
        except TimeoutError:
            state = [(r.replica, r.lane, r.profile, r.running) for r in self.requests]
            raise AssertionError(f"a request that could run still waits: {state}") from None

    async def _drain(self) -> None:
        """Every request runs and ends, the running ones first."""
        async with asyncio.timeout(SETTLE):
            while self.requests:
                for request in [r for r in self.requests if r.running]:
                    self.requests.remove(request)
                    request.task.result().release()
                if self.requests:
                    await asyncio.wait([r.task for r in self.requests], return_when=asyncio.FIRST_COMPLETED)

    @invariant()
    def the_caps_hold(self) -> None:
        assert self._running() <= CAP
        assert self._running("profile", "p") <= 1
        leases = {m.decode() for m in self.run(self.redis.zrange(f"{self.prefix}:leases", 0, -1))}
        assert len(leases) <= CAP
        held = sum(gate.status.held for gate in self.gates)
        assert held == self._running() and len(leases) >= held

    def teardown(self) -> None:
        drained = False
        try:
            self.run(self._drain())
            drained = True
        finally:
            try:
                for gate in self.gates:
                    self.run(gate.aclose())  # gives back what is idle
                if drained:
                    assert self.run(self.redis.zcard(f"{self.prefix}:leases")) == 0
            finally:
                tasks = [r.task for r in self.requests if not r.task.done()]
                for task in tasks:
                    task.cancel()
                if tasks:
                    self.run(asyncio.wait(tasks))
                self.run(self.redis.aclose())
                self.loop.close()


def test_pools_hold_the_caps_and_let_every_request_run(shared_redis: RedisServer) -> None:
    PoolMachine.url = shared_redis.url
    run_state_machine_as_test(
        PoolMachine,
        settings=settings(
            max_examples=30, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )
