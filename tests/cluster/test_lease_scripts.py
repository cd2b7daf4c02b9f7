"""The Lua scripts against a real redis-server: random acquire / release / renew / replica death / lease expiry /
clock jump / server restart sequences, checked step by step against a model, token needs and budget included.

Time is never mocked: a lease that expires, or a server clock that jumps ahead of every lease, is made by writing
expired scores (what the server would hold after the time passed); a restart deletes every key and the script
cache (what a server without persistence comes back with).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from redis.asyncio import Redis

from gateway_guard.admission.cluster import scripts
from gateway_guard.admission.cluster.store import Ask, Lease, LeaseStore, prefix_for
from tests.support.redis import RedisServer

CAP = 3
LANES = {"interactive": (0, CAP), "batch": (1, CAP - 1)}  # priority, lane cap (the cap less the headroom)
PROFILE_CAPS = {"a": 1, "b": 2, "c": None}
LEASE_MS = 600_000  # nothing expires by itself during a run
AGING_MS = 3_600_000
WAITS = [0, 300_000, 600_000]  # ranks differ by >= 0.083; the seconds a run lasts move a rank by < 0.01
TIE = 0.02
BUDGET = 10  # tokens; a need of 12 is granted only alone
NEEDS = [1, 3, 6, 12]
LIVE = 1_000  # scores written to expire a lease are 1; a live lease's is Redis TIME in ms

_names = itertools.count()


@dataclass
class ModelLease:
    replica: str
    lane: str
    profile: str
    tokens: int = 0
    in_redis: bool = True


class LeaseMachine(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis: Redis = Redis.from_url(self.url)
        self.name = f"hyp{next(_names)}"
        self.prefix = prefix_for(self.name)
        self.run(self.redis.set(f"{self.prefix}:epoch", 0))  # as if booted long ago: no quiet period
        self.stores: dict[str, LeaseStore] = {}
        self.alive: set[str] = set()
        self.leases: dict[str, ModelLease] = {}
        self.demand: dict[str, tuple[float, str]] = {}  # replica -> (rank, lane) of its published waiter
        self.waiting: set[str] = set()  # replicas marked waiting: a refused ask lately (what pools give way to)
        self.booted, self.quiet = True, False
        self.renewed_since_restart: set[str] = set()
        self.renewed_since_jump: set[str] = set()
        self.breach_allowed = False
        self.ids = itertools.count()
        for _ in range(3):
            self._add_replica()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _add_replica(self) -> None:
        replica = f"r{len(self.stores)}"
        self.stores[replica] = LeaseStore(self.redis, self.name, replica, lease_ms=LEASE_MS)
        self.alive.add(replica)

    def _in_redis(self, key: str | None = None, value: str | None = None) -> int:
        def match(m: ModelLease) -> bool:
            return key is None or (m.lane if key == "lane" else m.profile) == value

        return sum(1 for m in self.leases.values() if m.in_redis and match(m))

    def _tokens(self) -> int:
        return sum(m.tokens for m in self.leases.values() if m.in_redis)

    def _boot(self) -> None:
        if not self.booted:
            self.booted, self.quiet = True, True
            self.renewed_since_restart = set()

    # -- rules ----------------------------------------------------------------------------------------------

    def _expect(self, replica: str, lane: str, profile: str, waited: int, need: int) -> set[int]:
        priority, lane_cap = LANES[lane]
        mine = priority - waited / AGING_MS
        profile_cap = PROFILE_CAPS[profile]
        if self.quiet:
            return {scripts.QUIET}
        if self._in_redis() >= CAP:
            return {scripts.FULL}
        if self._in_redis("lane", lane) >= lane_cap:
            return {scripts.LANE_FULL}
        if profile_cap is not None and self._in_redis("profile", profile) >= profile_cap:
            return {scripts.PROFILE_FULL}
        ranks = [
            rank
            for other, (rank, olane) in self.demand.items()
            if other != replica and self._in_redis("lane", olane) < LANES[olane][1]
        ]
        if any(rank < mine - TIE for rank in ranks):
            return {scripts.YIELD}
        held = self._tokens()
        fits = scripts.OK if held == 0 or held + need <= BUDGET else scripts.TOKENS  # a large one alone
        if any(abs(rank - mine) <= TIE for rank in ranks):
            return {scripts.YIELD, fits}  # same rank: the older publication wins, by ms
        return {fits}

    @precondition(lambda self: self.alive)
    @rule(
        data=st.data(),
        asks=st.lists(
            st.tuples(
                st.sampled_from(sorted(LANES)),
                st.sampled_from(sorted(PROFILE_CAPS)),
                st.sampled_from(WAITS),
                st.sampled_from(NEEDS),
            ),
            min_size=1,
            max_size=3,
        ),
        publish=st.booleans(),
        releases=st.integers(0, 2),
    )
    def sync(self, data: st.DataObject, asks: list[tuple[str, str, int, int]], publish: bool, releases: int) -> None:
        """Some of a replica's leases given back, then up to three asks, in one call (rank order is the caller's)."""
        replica = data.draw(st.sampled_from(sorted(self.alive)))
        store = self.stores[replica]
        mine_held = sorted(k for k, m in self.leases.items() if m.replica == replica)
        give_back = mine_held[:releases]
        was_there = sum(self.leases[k].in_redis for k in give_back)
        back = [Lease(k, self.leases[k].lane, self.leases[k].profile, self.leases[k].tokens) for k in give_back]
        for k in give_back:
            del self.leases[k]
        plan = []
        for lane, profile, waited, need in asks:
            priority, lane_cap = LANES[lane]
            lease = Lease(store.member(str(next(self.ids))), lane, profile, need)
            plan.append(
                Ask(
                    lease=lease,
                    cap=CAP,
                    lane_cap=lane_cap,
                    profile_cap=PROFILE_CAPS[profile],
                    priority=priority,
                    waited_ms=waited,
                    aging_ms=AGING_MS,
                    budget=BUDGET,
                )
            )
        synced = self.run(store.sync(back, plan, cap=CAP, aging_ms=AGING_MS, demand_ttl_ms=LEASE_MS if publish else 0))
        assert synced.released == was_there
        self._boot()
        assert 1 <= len(synced.codes) <= len(plan)
        for ask, code in zip(plan, synced.codes, strict=False):
            lease = ask.lease
            allowed = self._expect(replica, lease.lane, lease.profile, ask.waited_ms, lease.tokens)
            assert code in allowed, (code, allowed)
            if code == scripts.OK:
                assert self._in_redis() < CAP  # the cap, as Redis saw it, had room
                self.leases[lease.member] = ModelLease(replica, lease.lane, lease.profile, lease.tokens)
            if code in scripts.ENDS:
                if publish:
                    self.demand[replica] = (ask.priority - ask.waited_ms / AGING_MS, lease.lane)
                assert synced.codes[-1] == code  # it ended the call
                break
        else:
            assert len(synced.codes) == len(plan)
            if publish:
                self.demand.pop(replica, None)  # nobody left that a slot would serve: no demand
        if publish:
            if any(code != scripts.OK for code in synced.codes):
                self.waiting.add(replica)
            else:
                self.waiting.discard(replica)
        assert synced.view.total == self._in_redis()
        assert synced.view.tokens == self._tokens()
        assert synced.others == len(self.waiting - {replica})

    @precondition(lambda self: any(m.replica in self.alive for m in self.leases.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        member = data.draw(st.sampled_from(sorted(k for k, m in self.leases.items() if m.replica in self.alive)))
        lease = self.leases.pop(member)
        removed = self.run(self.stores[lease.replica].release(Lease(member, lease.lane, lease.profile, lease.tokens)))
        assert removed == lease.in_redis

    @precondition(lambda self: self.alive)
    @rule(data=st.data(), recovering=st.booleans())
    def renew(self, data: st.DataObject, recovering: bool) -> None:
        """Every lease of a replica upserted, some with a smaller need (a pooled lease serving a smaller request)."""
        replica = data.draw(st.sampled_from(sorted(self.alive)))
        mine = [(k, m) for k, m in self.leases.items() if m.replica == replica]
        for _, m in mine:
            m.tokens = data.draw(st.sampled_from([n for n in NEEDS if n <= m.tokens] or [m.tokens]))
        leases = [Lease(k, m.lane, m.profile, m.tokens) for k, m in mine]
        view = self.run(self.stores[replica].renew(leases, recovering=recovering))
        if recovering and not self.quiet:  # back from a fallback: everyone re-registers before new grants
            self.quiet, self.renewed_since_restart = True, set()
        self._boot()
        for _, m in mine:
            m.in_redis = True
        assert view.code == int(self.quiet)
        assert view.total == self._in_redis()
        assert view.tokens == self._tokens()
        assert view.per_replica.get(replica) == len(mine)
        self.renewed_since_restart.add(replica)
        self.renewed_since_jump.add(replica)

    @precondition(lambda self: len(self.alive) > 0)
    @rule(data=st.data())
    def die(self, data: st.DataObject) -> None:
        """Killed: its requests stop at the upstream; the leases it had in Redis stay until they expire."""
        replica = data.draw(st.sampled_from(sorted(self.alive)))
        self.alive.discard(replica)
        for k in [k for k, m in self.leases.items() if m.replica == replica and not m.in_redis]:
            del self.leases[k]

    @precondition(lambda self: len(self.stores) < 6)
    @rule()
    def new_replica(self) -> None:
        self._add_replica()

    @precondition(lambda self: any(r not in self.alive for r in self.stores))
    @rule(data=st.data())
    def dead_replica_expires(self, data: st.DataObject) -> None:
        """One lease after its last renewal: the server's clock passed its leases' and its demand's expiry."""
        replica = data.draw(st.sampled_from(sorted(r for r in self.stores if r not in self.alive)))
        members = [k for k, m in self.leases.items() if m.replica == replica]
        self.run(self._expire(members, [replica]))
        for k in members:
            del self.leases[k]
        self.demand.pop(replica, None)
        self.waiting.discard(replica)

    @rule()
    def clock_jumps_past_every_lease(self) -> None:
        members = [k.decode() for k in self.run(self.redis.zrange(f"{self.prefix}:leases", 0, -1))]
        self.run(self._expire(members, list(self.stores)))
        for k, m in list(self.leases.items()):
            if m.replica in self.alive:
                m.in_redis = False  # still running at its replica, until the next renewal puts it back
            else:
                del self.leases[k]
        self.demand.clear()
        self.waiting.clear()
        self.breach_allowed = True
        self.renewed_since_jump = set()

    @rule()
    def server_restarts_empty(self) -> None:
        async def wipe() -> None:
            keys = [k async for k in self.redis.scan_iter(match=f"{self.prefix}:*")]
            if keys:
                await self.redis.delete(*keys)
            await self.redis.script_flush()

        self.run(wipe())
        for k, m in list(self.leases.items()):
            if m.replica in self.alive:
                m.in_redis = False
            else:
                del self.leases[k]
        self.demand.clear()
        self.waiting.clear()
        self.booted = False

    @precondition(lambda self: self.quiet and self.alive <= self.renewed_since_restart)
    @rule()
    def quiet_period_ends(self) -> None:
        self.run(self.redis.delete(f"{self.prefix}:quiet"))
        self.quiet = False

    async def _expire(self, members: list[str], demand_of: list[str]) -> None:
        if members:
            await self.redis.zadd(f"{self.prefix}:leases", dict.fromkeys(members, 1), xx=True)
        for replica in demand_of:
            raw = await self.redis.hget(f"{self.prefix}:demand", replica)
            if raw is not None:
                fields = raw.decode().split("|")
                await self.redis.hset(f"{self.prefix}:demand", replica, "|".join([*fields[:-1], "1"]))
            if await self.redis.hexists(f"{self.prefix}:waiting", replica):
                await self.redis.hset(f"{self.prefix}:waiting", replica, 1)

    # -- invariants -----------------------------------------------------------------------------------------

    @invariant()
    def redis_holds_what_the_model_holds(self) -> None:
        live = self.run(self.redis.zrangebyscore(f"{self.prefix}:leases", LIVE, "+inf"))
        assert {k.decode() for k in live} == {k for k, m in self.leases.items() if m.in_redis}
        counts = self.run(self.stores[next(iter(self.stores))].counts())  # purges what expired, indexes too
        assert counts.total == self._in_redis()
        assert counts.tokens == self._tokens()  # the counter is the sum of the live leases' needs: no drift
        for lane in LANES:
            assert counts.lanes.get(lane, 0) == self._in_redis("lane", lane)
        for profile in PROFILE_CAPS:
            assert counts.profiles.get(profile, 0) == self._in_redis("profile", profile)

    @invariant()
    def the_cap_holds(self) -> None:
        """Requests running (the live replicas') never exceed the cap nor their token needs the budget (but for one
        request larger than it, alone), except after the server's clock jumped past
        every lease, until every live replica renewed and the excess drained."""
        running = [m for m in self.leases.values() if m.replica in self.alive]
        tokens = sum(m.tokens for m in running)
        within = len(running) <= CAP and (tokens <= BUDGET or len(running) == 1)  # a large request runs alone
        if self.breach_allowed and self.alive <= self.renewed_since_jump and within:
            self.breach_allowed = False
        if not self.breach_allowed:
            assert within, (len(running), tokens)

    def teardown(self) -> None:
        try:
            for k, m in list(self.leases.items()):
                if m.replica in self.alive:
                    self.run(self.stores[m.replica].release(Lease(k, m.lane, m.profile, m.tokens)))
                    del self.leases[k]
            self.run(self._expire(list(self.leases), list(self.stores)))
            self.leases.clear()
            counts = self.run(self.stores["r0"].counts())
            assert (counts.total, counts.tokens) == (0, 0)
            left = {k.decode() for k in self.run(self._keys())}
            suffixes = ("epoch", "quiet", "replicas", "demand", "queued", "waiting")
            allowed = {f"{self.prefix}:{suffix}" for suffix in suffixes}
            assert left <= allowed, f"leaked keys: {sorted(left - allowed)}"
        finally:
            self.run(self.redis.aclose())
            self.loop.close()

    async def _keys(self) -> list[bytes]:
        return [k async for k in self.redis.scan_iter(match=f"{self.prefix}:*")]


def test_lease_scripts_hold_the_cap_and_leak_nothing(shared_redis: RedisServer) -> None:
    LeaseMachine.url = shared_redis.url
    run_state_machine_as_test(
        LeaseMachine,
        settings=settings(
            max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )


async def test_a_fresh_server_grants_nothing_for_one_lease(shared_redis: RedisServer, upstream_name: str) -> None:
    """A restarted (empty) server holds new leases back for one lease, while replicas put theirs back."""
    redis = Redis.from_url(shared_redis.url)
    try:
        store = LeaseStore(redis, upstream_name, "a", lease_ms=300)
        ask = Ask(
            lease=Lease(store.member("1"), "batch", "p"),
            cap=2,
            lane_cap=2,
            profile_cap=None,
            priority=1,
            waited_ms=0,
            aging_ms=10_000,
        )
        assert (await store.acquire(ask)).code == scripts.QUIET
        view = await store.renew([Lease(store.member("0"), "batch", "p")])  # a survivor is put back at once
        assert (view.code, view.total) == (1, 1)
        ttl = await redis.pttl(f"{store.prefix}:quiet")
        assert 0 < ttl <= 300
        await asyncio.sleep(ttl / 1000 + 0.05)  # the quiet period is server time: wait it out, bounded
        assert (await store.renew([Lease(store.member("0"), "batch", "p")])).code == 0  # over; survivor renewed
        view = await store.acquire(ask)
        assert (view.code, view.total) == (scripts.OK, 2)
        assert view.per_replica == {"a": 2}
    finally:
        await redis.aclose()


async def test_a_lease_put_without_a_token_need_expires_cleanly(shared_redis: RedisServer, upstream_name: str) -> None:
    """A lease left by a version without token needs (``:info`` = lane and profile only) counts 0 tokens and is
    purged like any other (else every script would fail on it, and the replicas would stay in fallback)."""
    redis = Redis.from_url(shared_redis.url)
    try:
        store = LeaseStore(redis, upstream_name, "a", lease_ms=LEASE_MS)
        p = store.prefix
        await redis.set(f"{p}:epoch", 0)
        await redis.zadd(f"{p}:leases", {"old|1": 1, "old|2": 2**50})  # one expired, one live
        for member in ("old|1", "old|2"):
            await redis.hset(f"{p}:info", member, "batch\np")
            await redis.sadd(f"{p}:lane:batch", member)
            await redis.sadd(f"{p}:prof:p", member)
        counts = await store.counts()
        assert (counts.total, counts.tokens, dict(counts.lanes)) == (1, 0, {"batch": 1})
        ask = Ask(
            lease=Lease(store.member("1"), "batch", "p", 4),
            cap=3,
            lane_cap=3,
            profile_cap=None,
            priority=1,
            waited_ms=0,
            aging_ms=AGING_MS,
            budget=BUDGET,
        )
        view = await store.acquire(ask)
        assert (view.code, view.total, view.tokens) == (scripts.OK, 2, 4)
        assert await store.release(Lease("old|2", "batch", "p"))
        assert await store.release(ask.lease)
        assert (await store.counts()).tokens == 0
        assert not await redis.exists(f"{p}:tokens", f"{p}:info")
    finally:
        await redis.aclose()
