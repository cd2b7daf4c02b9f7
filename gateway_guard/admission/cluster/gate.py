"""The shared gate: the in-memory ``Gate`` for local order, a Redis lease for the cap every replica shares.

A request passes two steps:

1. **The local gate** (``admission/gate.py``, unchanged): lanes, aging, fair turns between profiles, queue bounds
   and deadlines, the token budget. Its limit is the cap (``ShareLimit``), so a replica never has more requests
   past this step than the whole cluster may run.
2. **A lease** in Redis (``store.py``): one task per upstream (the *pump*) asks for a lease for the best-ranked
   request past step 1, then the next, until Redis says the cap (``FULL``), or a better-ranked request waiting at
   another replica (``YIELD``, from the demand replicas publish), stands in the way; a lane or profile at its
   cluster-wide cap skips to the next request. Waiters wake on the release channel, or on a jittered poll.

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
import contextlib
import itertools
import logging
import random
from collections.abc import Callable, Coroutine, Iterable, Mapping
from functools import partial
from typing import Any

from redis.exceptions import RedisError

from gateway_guard.admission.budget import TokenBudget
from gateway_guard.admission.cluster import scripts
from gateway_guard.admission.cluster.link import FALLBACK, GONE, QUIET, SHARED, ClusterStatus, Link, wait_for_event
from gateway_guard.admission.cluster.pool import LeasePool
from gateway_guard.admission.cluster.share import ShareLimit
from gateway_guard.admission.cluster.store import Ask, Lease, LeaseStore
from gateway_guard.admission.gate import Gate, GateSnapshot, Permit, SlotView
from gateway_guard.admission.limit import Limit
from gateway_guard.admission.policy import LanePolicy, ProfilePolicy, Result, UpstreamPolicy
from gateway_guard.errors import DeadlineExceeded
from gateway_guard.upstream.saturation import Saturation

log = logging.getLogger("gateway_guard.cluster")

__all__ = ["FALLBACK", "SHARED", "ClusterGate", "ClusterStatus"]

BATCH = 16  # waiters asked for in one round trip


class _Want:
    """A request past the local gate, waiting for its lease."""

    __slots__ = ("enqueued_at", "future", "lane", "profile")

    def __init__(self, lane: LanePolicy, profile: str, enqueued_at: float, future: asyncio.Future[Lease]) -> None:
        self.lane, self.profile, self.enqueued_at, self.future = lane, profile, enqueued_at, future


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
        self._profiles = dict(profiles or {})
        self._default_profile = default_profile_policy or ProfilePolicy()
        self._aging = aging_seconds
        self._store = store
        lease_s = store.lease_ms / 1000
        self._poll = min(0.25, lease_s / 10)  # the fallback to the release channel
        self._demand_ttl_ms = max(1000, round(self._poll * 8000))
        self._pool = LeasePool(self._poll / 2 if keep_idle is None else keep_idle)
        self._me = store.replica.encode()
        self._cap_seen = limit.limit
        self._wants: list[_Want] = []
        self._held: dict[str, Lease] = {}
        self._releasing: list[Lease] = []  # given back, to be sent with the next round trip
        self._ids = itertools.count()
        self._demand = False  # this replica may have a demand published
        self._listeners: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._kicked = False  # the pump was woken for work, not by its poll
        self._link = Link(
            name,
            store,
            self._share,
            self._held,
            self._pool,
            queued=self._queued,
            unsent=lambda: len(self._releasing),
            kick=self._kick,
            heard=self._heard,
            changed=self._changed,
        )
        self._local.watch(self._changed)
        self._share.subscribe(self._limit_changed)

    # -- the AdmissionGate surface ------------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        return self._cap.limit

    @property
    def limit_source(self) -> Limit:
        return self._cap

    @property
    def in_flight(self) -> int:
        return len(self._held) - len(self._pool)

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
        lease = self._from_pool(policy, profile)
        if lease is None:
            try:
                lease = await self._lease(policy, profile, started, started + wait)
            except BaseException:
                inner.release(Result.IGNORED)
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
        for want in self._wants:
            waiting[want.lane.name] = waiting.get(want.lane.name, 0) + 1
            waiting_profiles[want.profile] = waiting_profiles.get(want.profile, 0) + 1
        in_flight = max(self._link.counts.total, self._link.total, len(self._held)) - len(self._pool)
        me = self._store.replica
        queued = local.queued + len(self._wants) + sum(n for r, n in self._link.counts.queued.items() if r != me)
        open_slots = max(0, limit - in_flight)
        lanes = {}
        for name, view in local.lanes.items():
            cap = max(1, limit - self._local.lane_policy(name).headroom)
            busy = max(self._link.counts.lanes.get(name, 0), self._held_in("lane", name))
            lane_queued = view.queued + waiting.get(name, 0)
            lanes[name] = SlotView(cap, busy, lane_queued, max(0, min(cap - busy, open_slots) - lane_queued))
        profiles = {}
        for name, view in local.profiles.items():
            busy = max(self._link.counts.profiles.get(name, 0), self._held_in("profile", name))
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
            tokens_in_flight=local.tokens_in_flight,
            max_context_tokens=local.max_context_tokens,
            held=local.held,
        )

    def reconfigure(
        self, policy: UpstreamPolicy, *, profiles: Mapping[str, ProfilePolicy], aging_seconds: float, limit: Limit
    ) -> None:
        if limit is not self._cap:
            self._cap = limit
            self._share.follow(limit)
        self._profiles, self._aging = dict(profiles), aging_seconds
        self._local.reconfigure(policy, profiles=profiles, aging_seconds=aging_seconds, limit=self._share)
        self._kick()

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
        for work in (self._link.keep(), self._pump(), self._link.listen()):
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
        self._unpool(self._pool.drain())
        releases, self._releasing = self._releasing, []
        if releases and self._link.mode == SHARED:  # no request on them: back now (else they expire in a lease)
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(self._store.sync(releases, [], cap=0, aging_ms=1), 1.0)
        self._loop = None

    # -- step 2: leases -----------------------------------------------------------------------------------------

    async def _lease(self, lane: LanePolicy, profile: str, enqueued_at: float, deadline: float) -> Lease:
        assert self._loop is not None
        want = _Want(lane, profile, enqueued_at, self._loop.create_future())
        self._wants.append(want)
        self._kick()
        try:
            async with asyncio.timeout_at(deadline):
                return await want.future
        except BaseException as exc:
            future = want.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self._give_back(future.result())  # granted just as the wait ended: give it back
            if isinstance(exc, TimeoutError):
                waited = self._loop.time() - enqueued_at
                raise DeadlineExceeded(
                    f"waited {waited:.1f}s in the {lane.name!r} queue of upstream {self.name!r} without a free "
                    "slot in the cluster (queue deadline passed)",
                    lane=lane.name,
                    retry_after=self.retry_after(lane.name),
                ) from None
            raise
        finally:
            self._wants.remove(want)
            self._changed()

    def _rank(self, want: _Want, now: float) -> tuple[float, int, float]:
        return (want.lane.priority - (now - want.enqueued_at) / self._aging, want.lane.priority, want.enqueued_at)

    def _pending(self) -> list[_Want]:
        assert self._loop is not None
        now = self._loop.time()
        return sorted((w for w in self._wants if not w.future.done()), key=lambda w: self._rank(w, now))

    async def _pump(self) -> None:
        assert self._loop is not None
        while not self._link.closed:
            timed = self._wants or self._held  # held: a pooled lease may go stale, another replica may wait
            await wait_for_event(self._wake, self._poll * random.uniform(0.5, 1.5) if timed else None)
            woken, self._kicked = self._kicked, False
            self._wake.clear()
            try:
                if self._link.mode == FALLBACK:
                    self._unpool(self._pool.drain())
                    await self._grant_in_fallback()
                else:
                    self._unpool(self._pool.stale(self._loop.time()))
                    # a pool kept this long: ask whether another replica waits (a lost message is found so)
                    await self._sync(peek=not woken and bool(self._pool))
            except Exception:  # the pump must outlive anything: a request waits on it
                log.exception("upstream %s: the shared gate's pump failed; retrying", self.name)

    async def _sync(self, *, peek: bool = False) -> None:
        """One round trip: the leases given back since the last one, then the best-ranked waiters (up to BATCH)."""
        assert self._loop is not None
        releases, self._releasing = self._releasing, []
        pending = self._pending()[:BATCH]
        if not pending and not releases and not peek:
            if self._demand:
                self._demand = False
                await self._store.clear_demand()
            return
        cap, now = self._cap.limit, self._loop.time()
        asks = [
            Ask(
                lease=Lease(self._store.member(str(next(self._ids))), want.lane.name, want.profile),
                cap=cap,
                lane_cap=max(1, cap - want.lane.headroom),
                profile_cap=self._profiles.get(want.profile, self._default_profile).max_inflight,
                priority=want.lane.priority,
                waited_ms=round((now - want.enqueued_at) * 1000),
                aging_ms=round(self._aging * 1000),
            )
            for want in pending
        ]
        heard = self._pool.heard
        try:
            synced = await self._store.sync(
                releases, asks, cap=cap, aging_ms=round(self._aging * 1000), demand_ttl_ms=self._demand_ttl_ms
            )
        except RedisError as exc:
            self._releasing = releases + self._releasing  # sent again when Redis is back (else they expire)
            self._link.reachable = False
            self._link.fall_back(f"{GONE}: {exc}")
            return
        self._link.reachable = True
        if synced.codes and synced.codes[-1] == scripts.QUIET:
            self._link.fall_back(QUIET)  # first: a quiet server's view is partial, it must not replace ours
        self._link.observe(synced.view)
        self._pool.demand_seen(synced.others, heard)
        if self._pool.others_waiting and self._pool:
            self._send_back(*self._pool.drain())
        for want, ask, code in zip(pending, asks, synced.codes, strict=False):
            if code != scripts.OK:
                continue
            self._held[ask.lease.member] = ask.lease
            if want.future.done():  # timed out or cancelled while we asked
                self._give_back(ask.lease)
            else:
                want.future.set_result(ask.lease)
        # FULL, YIELD or QUIET ended the call: its request is our demand now. Any refusal marks us waiting.
        ended = bool(synced.codes) and synced.codes[-1] in (scripts.FULL, scripts.YIELD, scripts.QUIET)
        self._demand = any(code != scripts.OK for code in synced.codes)
        if len(pending) == BATCH and not ended:
            self._kick()  # there may be more behind the batch

    async def _grant_in_fallback(self) -> None:
        """Up to the share. While Redis answers (a quiet period) the new leases are put there before the grant:
        a replica back on the shared gate must not be granted past them."""
        allowance = self._share.allowance or 0
        granted: list[tuple[_Want, Lease]] = []
        for want in self._pending():
            if len(self._held) >= allowance:
                break
            lease = Lease(self._store.member(str(next(self._ids))), want.lane.name, want.profile)
            self._held[lease.member] = lease
            granted.append((want, lease))
        if granted and self._link.reachable:
            await self._link.renew()
        for want, lease in granted:
            if want.future.done():  # timed out or cancelled meanwhile
                self._give_back(lease)
            else:
                want.future.set_result(lease)

    def _release(self, inner: Permit, lease: Lease, outer: Permit, result: Result) -> None:
        inner.report_usage(prompt_tokens=outer.prompt_tokens, output_tokens=outer.output_tokens)
        inner.release(result)
        self._give_back(lease)

    def _give_back(self, lease: Lease) -> None:
        """A lease without a request: to the best local waiter if it is of the same lane and profile, else to
        the pool while nobody else could use it, else back to Redis (``_send_back``)."""
        if lease.member not in self._held:
            return
        if self._pooling():
            assert self._loop is not None
            pending = self._pending()
            if not pending:
                self._pool.put(lease, self._loop.time())
                return
            best = pending[0]
            if best.lane.name == lease.lane and best.profile == lease.profile:
                best.future.set_result(lease)
                return
        self._send_back(lease)

    def _send_back(self, *leases: Lease) -> None:
        """The leases go back with the pump's next round trip (with the next grants); if Redis is gone by then
        they expire within one lease: the keeper no longer renews them."""
        self._unpool(leases)
        if leases:
            self._kick()

    def _unpool(self, leases: Iterable[Lease]) -> None:
        for lease in leases:
            if self._held.pop(lease.member, None) is not None:
                self._releasing.append(lease)

    def _pooling(self) -> bool:
        return self._pool.open and self._link.mode == SHARED and not self._link.closed

    def _from_pool(self, lane: LanePolicy, profile: str) -> Lease | None:
        """A pooled lease for this request, when nobody waits ahead of it here or at another replica."""
        if not self._pool or not self._pooling() or any(not w.future.done() for w in self._wants):
            return None
        lease = self._pool.take(lane.name, profile)
        if lease is None:  # counted under another lane or profile in Redis: this request asks for its own
            self._send_back(*self._pool.drain())
        return lease

    def _heard(self, data: bytes) -> None:
        """A message on the release channel: another replica's new demand (``?<replica>``), or a release.
        ``?`` alone comes from the listener: it was not listening, so someone may wait."""
        if data[:1] == b"?":
            if data[1:] != self._me:
                self._pool.demand_heard()
                self._send_back(*self._pool.drain())
        elif data != self._me and any(not w.future.done() for w in self._wants):
            self._kick()  # our own releases went with our own asks: nothing to wake for

    def _limit_changed(self, limit: int) -> None:
        """A lower cap: pooled leases may be over it; they go back, and Redis decides again."""
        if limit < self._cap_seen:
            self._send_back(*self._pool.drain())
        self._cap_seen = limit

    # -- helpers --------------------------------------------------------------------------------------------------

    def _queued(self) -> int:
        return self._local.snapshot().queued + len(self._wants)

    def _held_in(self, key: str, value: str) -> int:
        return sum(
            1
            for lease in self._held.values()
            if (lease.lane if key == "lane" else lease.profile) == value and lease.member not in self._pool
        )

    def _kick(self) -> None:
        self._kicked = True
        self._wake.set()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed(self) -> None:
        for listener in tuple(self._listeners):
            listener()
