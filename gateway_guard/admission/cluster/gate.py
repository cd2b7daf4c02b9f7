"""The shared gate: the in-memory ``Gate`` for local order, a Redis lease for the cap every replica shares.

A request passes two steps:

1. **The local gate** (``admission/gate.py``): lanes, aging, fair turns between profiles, queue bounds and
   deadlines. Its limit is the cap (``ShareLimit``), so a replica never has more requests past this step than the
   whole cluster may run; its token budget only sizes each request's need (``shared``: checked in step 2).
2. **A lease** in Redis (``leases.py``, ``store.py``): one task per upstream (the *pump*) asks for a lease for the
   best-ranked request past step 1, then the next, until Redis says the cap (``FULL``), or a better-ranked request
   waiting at another replica (``YIELD``, from the demand replicas publish), or the token budget (``TOKENS``: the
   leases' token needs summed in Redis) stands in the way; a lane or profile at its cluster-wide cap skips to the
   next request. Waiters wake on the release channel, or on a jittered poll.

The lease is held as long as the permit, renewed every lease/3 (``keeper``). When the permit is released, the
lease goes to the replica's pool (``pool.py``) while no other replica waits: the next local request of the same
lane and profile takes it with no call to Redis; else (or when nobody takes it soon) it goes back to Redis with the
pump's next round trip.

**When Redis is gone** (an error or timeout of any call) or quiet after a restart, the replica falls back: it
keeps the requests it holds and may replace one that ends, never add one (``link.py``), logs it and shows it in
``status``; the keeper keeps trying, and when a
renewal goes through it puts back every lease held (those taken in fallback too: upserts, never counted twice)
and starts a quiet period of one lease so that the others do the same before anyone is granted past them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Mapping
from functools import partial
from typing import Any

from gateway_guard.admission.budget import TokenBudget
from gateway_guard.admission.cluster.leases import Leases
from gateway_guard.admission.cluster.link import FALLBACK, SHARED, ClusterStatus
from gateway_guard.admission.cluster.share import ShareLimit
from gateway_guard.admission.cluster.store import Lease, LeaseStore
from gateway_guard.admission.gate import Gate, GateSnapshot, Permit, SlotView
from gateway_guard.admission.limit import Limit
from gateway_guard.admission.policy import LanePolicy, ProfilePolicy, Result, UpstreamPolicy
from gateway_guard.errors import DeadlineExceeded
from gateway_guard.upstream.saturation import Saturation

__all__ = ["FALLBACK", "SHARED", "ClusterGate", "ClusterStatus"]


class ClusterGate:
    """Same surface as ``Gate``; the cap is shared with every replica using the same Redis and upstream name."""

    def __init__(
        self,
        name: str,
        limit: Limit,
        lanes: Iterable[LanePolicy],
        profiles: Mapping[str, ProfilePolicy] | None = None,
        *,
        store: LeaseStore,
        aging_seconds: float = 10.0,
        default_profile_policy: ProfilePolicy | None = None,
        budget: TokenBudget | None = None,
        keep_idle: float | None = None,
    ) -> None:
        """``keep_idle``: how long a released lease waits in the pool for a local taker (default: half the poll,
        1/20 of a lease at most 0.125 s); 0 sends every lease back to Redis at once."""
        self.name = name
        self._cap = limit
        self._share = ShareLimit(limit)
        self._local = Gate(
            name,
            self._share,
            lanes,
            profiles,
            aging_seconds=aging_seconds,
            default_profile_policy=default_profile_policy,
            budget=budget,
        )
        self._default_profile = default_profile_policy or ProfilePolicy()
        self._store = store
        self._listeners: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._leases = Leases(
            name,
            store,
            self._share,
            keep_idle=keep_idle,
            queued=lambda: self._local.snapshot().queued,
            changed=self._changed,
            budget=lambda: self._local.budget,
        )
        self._leases.configure(limit, profiles or {}, self._default_profile, aging_seconds)
        self._link = self._leases.link
        self._local.watch(self._changed)
        self._share_budget()

    # -- the AdmissionGate surface ------------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        return self._cap.limit

    @property
    def limit_source(self) -> Limit:
        return self._cap

    @property
    def in_flight(self) -> int:
        return self._leases.in_use

    @property
    def budget(self) -> TokenBudget | None:
        return self._local.budget

    def lane_names(self) -> Iterable[str]:
        return self._local.lane_names()

    def lane_policy(self, lane: str) -> LanePolicy:
        return self._local.lane_policy(lane)

    def queue_timeout(self, lane: str) -> float:
        return self._local.queue_timeout(lane)

    def retry_after(self, lane: str) -> float:
        return self._local.retry_after(lane)

    def on_saturation(self, sat: Saturation) -> None:
        self._local.on_saturation(sat)

    def watch(self, listener: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(listener)

        def unwatch() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unwatch

    def hold(self, reason: str) -> None:
        """The upstream is down: the local line grants nothing, so no lease is asked for (see Gate.hold)."""
        self._local.hold(reason)

    def resume(self) -> None:
        self._local.resume()

    async def acquire(
        self,
        lane: str,
        profile: str,
        *,
        max_wait: float | None = None,
        prompt_tokens: int = 0,
        since: float | None = None,
    ) -> Permit:
        timeout = self._local.queue_timeout(lane)  # UnknownLane for a lane that does not exist
        policy = self._local.lane_policy(lane)
        wait = timeout if max_wait is None else max_wait
        loop = asyncio.get_running_loop()
        self.start()
        started = loop.time() if since is None else since
        inner = await self._local.acquire(lane, profile, max_wait=max_wait, prompt_tokens=prompt_tokens, since=since)
        lease = self._leases.take(policy, profile, inner.tokens)
        if lease is None:
            try:
                lease = await self._leases.lease(policy, profile, inner.tokens, started, started + wait)
            except BaseException as exc:
                inner.release(Result.IGNORED)
                if isinstance(exc, TimeoutError):
                    raise DeadlineExceeded(
                        f"waited {loop.time() - started:.1f}s in the {lane!r} queue of upstream {self.name!r} "
                        "without a free slot in the cluster (queue deadline passed)",
                        lane=lane,
                        retry_after=self.retry_after(lane),
                    ) from None
                raise
        now = loop.time()
        inner.acquired_at = now  # the slot is held from the lease on: that is what the hold time measures
        return Permit(
            partial(self._release, inner, lease),
            lane,
            profile,
            now,
            now - started,
            tokens=inner.tokens,
            prompt_estimate=inner.prompt_estimate,
        )

    def snapshot(self) -> GateSnapshot:
        """Cluster-wide in-flight (leases, as last seen) with this replica's queues."""
        local = self._local.snapshot()
        limit = self._cap.limit
        waiting: dict[str, int] = {}
        waiting_profiles: dict[str, int] = {}
        for want in self._leases.wants:
            waiting[want.lane.name] = waiting.get(want.lane.name, 0) + 1
            waiting_profiles[want.profile] = waiting_profiles.get(want.profile, 0) + 1
        leases = self._leases
        in_flight = max(self._link.counts.total, self._link.total, len(leases.held)) - len(leases.pool)
        tokens = None
        if local.tokens_in_flight is not None:  # the cluster-wide figure, as last seen, less our idle leases'
            held_tokens = sum(lease.tokens for lease in leases.held.values())
            idle_tokens = sum(lease.tokens for lease in leases.held.values() if lease.member in leases.pool)
            tokens = max(self._link.tokens, held_tokens) - idle_tokens
        me = self._store.replica
        queued = local.queued + len(leases.wants) + sum(n for r, n in self._link.counts.queued.items() if r != me)
        open_slots = max(0, limit - in_flight)
        lanes = {}
        for name, view in local.lanes.items():
            cap = max(1, limit - self._local.lane_policy(name).headroom)
            busy = max(self._link.counts.lanes.get(name, 0), leases.in_use_by("lane", name))
            lane_queued = view.queued + waiting.get(name, 0)
            lanes[name] = SlotView(cap, busy, lane_queued, max(0, min(cap - busy, open_slots) - lane_queued))
        profiles = {}
        for name, view in local.profiles.items():
            busy = max(self._link.counts.profiles.get(name, 0), leases.in_use_by("profile", name))
            pq = view.queued + waiting_profiles.get(name, 0)
            pfree = None if view.limit is None else max(0, view.limit - busy - pq)
            profiles[name] = SlotView(view.limit, busy, pq, pfree)
        return GateSnapshot(
            self.name,
            limit,
            in_flight,
            queued,
            0 if local.held else max(0, open_slots - queued),
            lanes,
            profiles,
            tokens_in_flight=tokens,
            max_context_tokens=local.max_context_tokens,
            held=local.held,
        )

    def reconfigure(
        self, policy: UpstreamPolicy, *, profiles: Mapping[str, ProfilePolicy], aging_seconds: float, limit: Limit
    ) -> None:
        if limit is not self._cap:
            self._cap = limit
            self._share.follow(limit)
        self._local.reconfigure(policy, profiles=profiles, aging_seconds=aging_seconds, limit=self._share)
        self._share_budget()
        self._leases.configure(limit, profiles, self._default_profile, aging_seconds)

    # -- the cluster part ---------------------------------------------------------------------------------------

    @property
    def status(self) -> ClusterStatus:
        return self._link.status

    @property
    def listening(self) -> bool:
        """Subscribed to the release channel: from then on it hears other replicas' demand (and may pool)."""
        return self._link.listening

    def start(self) -> None:
        """Start renewing, listening and granting, in the running loop (the first ``acquire`` does it too)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._leases.start(self._loop)
        for work in (self._link.keep(), self._leases.pump(), self._link.listen()):
            self._spawn(work)

    async def aclose(self) -> None:
        """Stop the background work. The loops also check ``closed``: a client library may turn a cancellation
        that meets its own timeout into an error, and a loop that caught it would otherwise go on."""
        self._link.closed = True
        tasks, self._tasks = list(self._tasks), set()
        for _ in range(20):  # bounded: each round cancels what is left and gives it half a second
            pending = [task for task in tasks if not task.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.5)
        await self._leases.flush()
        self._loop = None

    def _release(self, inner: Permit, lease: Lease, outer: Permit, result: Result) -> None:
        inner.report_usage(prompt_tokens=outer.prompt_tokens, output_tokens=outer.output_tokens)
        inner.release(result)
        self._leases.give_back(lease)

    def _share_budget(self) -> None:
        """The local gate sizes each request's token need; the budget is checked in Redis, in rank order across
        replicas (a request waiting there for its profile's cap must not hold back the others here)."""
        if self._local.budget is not None:
            self._local.budget.shared = True

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed(self) -> None:
        for listener in tuple(self._listeners):
            listener()
