"""Two replicas with pools on a real redis-server, driven by hypothesis: requests of two lanes and two profiles
(one capped), each with a token need (one larger than the budget), arrive at either replica and end in any order.

After every step the replicas must settle where no waiting request could run (by the caps and the token budget,
counting running requests only: an idle lease kept at one replica while a request it could serve waits at the
other is a stuck state; while a request waits for tokens, nobody overtakes it, so then only "nothing runs while
something waits" is stuck), and at every moment: never more running than the cap or the capped profile's cap,
never more tokens running (nor counted in Redis) than the budget but for one request alone, the token counter in
Redis equal to the sum of its leases' needs, never more leases in Redis than the cap, every running request's
lease in Redis. After the run, closing the replicas leaves no lease and no token counted.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from redis.asyncio import Redis

from gateway_guard.admission.budget import TokenBudget
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
BUDGET = 10  # context tokens; needs are the prompt sizes (no output estimate), 12 runs only alone
NEEDS = [1, 3, 6, 12]
SETTLE = 5.0  # seconds a waiting request that could run may take to run (a message, a poll, a round trip)
_names = itertools.count()


class Request:
    def __init__(self, replica: int, lane: str, profile: str, need: int, task: asyncio.Task[Permit]) -> None:
        self.replica, self.lane, self.profile, self.need, self.task = replica, lane, profile, need, task

    @property
    def running(self) -> bool:
        if self.task.done() and not self.task.cancelled() and self.task.exception() is not None:
            raise AssertionError("the request failed") from self.task.exception()
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
            budget = TokenBudget(BUDGET, default_output=0)
            gate = ClusterGate(
                self.name, FixedLimit(CAP), LANES, PROFILES, store=store, keep_idle=keep_idle, budget=budget
            )
            self.gates.append(gate)

        async def listening() -> None:
            for gate in self.gates:
                gate.start()
            async with asyncio.timeout(SETTLE):
                while not all(gate.listening for gate in self.gates):
                    await asyncio.sleep(0.005)

        self.run(listening())

    @precondition(lambda self: self.gates)
    @rule(
        replica=st.integers(0, 1),
        lane=st.sampled_from(sorted(LANE_CAP)),
        profile=st.sampled_from(["p", "q"]),
        need=st.sampled_from(NEEDS),
    )
    def arrive(self, replica: int, lane: str, profile: str, need: int) -> None:
        """At most the cap at a replica at once: a request waiting for a lease holds a place in its replica's
        own line (step 1, whose limit is the cap), so more could wait there behind one the profile cap holds."""
        if sum(r.replica == replica for r in self.requests) >= CAP:
            return

        async def acquire() -> Permit:
            permit = await self.gates[replica].acquire(lane, profile, max_wait=60, prompt_tokens=need)
            assert permit.tokens == need
            self._check_caps(need)
            return permit

        task = self.loop.create_task(acquire())
        self.requests.append(Request(replica, lane, profile, need, task))
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

    def _tokens(self) -> int:
        return sum(r.need for r in self.requests if r.running)

    def _check_caps(self, need: int) -> None:
        running = sum(1 for r in self.requests if r.task.done()) + 1  # the one just granted is not done yet
        self.most = max(self.most, running)
        assert running <= CAP
        assert running == 1 or self._tokens() + need <= BUDGET

    def _caps_allow(self, request: Request) -> bool:
        return (
            self._running() < CAP
            and self._running("lane", request.lane) < LANE_CAP[request.lane]
            and self._running("profile", request.profile) < PROFILE_CAP[request.profile]
        )

    def _fits(self, request: Request) -> bool:
        return self._running() == 0 or self._tokens() + request.need <= BUDGET

    def _waits_for_tokens(self) -> bool:
        return any(self._caps_allow(r) and not self._fits(r) for r in self.requests if not r.running)

    def _stuck(self) -> bool:
        if self._waits_for_tokens():
            return self._running() == 0  # one waits for tokens: nobody overtakes it, but it runs when all end
        return any(self._caps_allow(r) for r in self.requests if not r.running)

    async def _settle(self) -> None:
        try:
            async with asyncio.timeout(SETTLE):
                while self._stuck():
                    await asyncio.sleep(0.005)  # polling the replicas' state: no event says "nothing can run"
        except TimeoutError:
            state = [(r.replica, r.lane, r.profile, r.need, r.running) for r in self.requests]
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
        running, held, tokens = self._running(), sum(gate.status.held for gate in self.gates), self._tokens()
        settled = not self._waits_for_tokens()  # else a grant may be under way (reading Redis runs the loop)
        assert running <= CAP
        assert self._running("profile", "p") <= 1
        assert running <= 1 or tokens <= BUDGET
        leases, counted, needs = self.run(self._read_leases())
        assert len(leases) <= CAP
        assert counted == needs  # the counter never drifts from the leases it counts
        assert len(leases) <= 1 or counted <= BUDGET
        assert counted >= tokens  # read before: a running request's lease is counted for at least its need
        assert (held == running if settled else held >= running) and len(leases) >= held

    def _counted_tokens(self) -> int:
        return int(self.run(self.redis.get(f"{self.prefix}:tokens")) or 0)

    async def _read_leases(self) -> tuple[set[str], int, int]:
        """The leases, the token counter and the sum of the leases' needs, read at one moment (MULTI)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrange(f"{self.prefix}:leases", 0, -1)
            pipe.get(f"{self.prefix}:tokens")
            pipe.hvals(f"{self.prefix}:info")
            members, counter, infos = await pipe.execute()
        needs = sum(int(info.decode().rsplit("\n", 1)[1]) for info in infos)
        return {m.decode() for m in members}, int(counter or 0), needs

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
                    assert self._counted_tokens() == 0
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
