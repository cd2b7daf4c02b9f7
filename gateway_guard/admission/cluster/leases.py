"""Step 2 of the shared gate: a lease in Redis for each request past the local gate.

``Leases`` keeps this replica's leases (``held``: those with a request on them and the idle ones in the pool) and
its requests waiting for one (``wants``). One task (``pump``) makes one round trip per turn: the leases given back
since the last one, then asks for the best-ranked waiters (up to ``BATCH``), until Redis says the cap (``FULL``)
or a better-ranked request waiting at another replica (``YIELD``) stands in the way; a lane or profile at its
cluster-wide cap skips to the next request; one whose token need would pass the upstream's token budget
(``TOKENS``) ends the turn like ``FULL`` (nobody overtakes it, as in the local gate). Waiters wake on another
replica's release, or on a jittered poll.

Each lease carries its request's token need (counted in Redis against the budget). A lease given back goes to the
best local waiter of its lane and profile whose need it covers, else to the pool (``pool.py``) while no
other replica waits, else back to Redis with the pump's next round trip. In fallback the pump grants up to the
allowance (``link.py``), in requests and in tokens, instead of asking Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from redis.exceptions import RedisError

from gateway_guard.admission.budget import TokenBudget
from gateway_guard.admission.cluster import scripts
from gateway_guard.admission.cluster.link import FALLBACK, GONE, QUIET, SHARED, Link, wait_for_event
from gateway_guard.admission.cluster.pool import LeasePool
from gateway_guard.admission.cluster.share import ShareLimit
from gateway_guard.admission.cluster.store import Ask, Lease, LeaseStore
from gateway_guard.admission.limit import Limit
from gateway_guard.admission.policy import LanePolicy, ProfilePolicy

log = logging.getLogger("gateway_guard.cluster")

BATCH = 16  # waiters asked for in one round trip


class Want:
    """A request past the local gate, waiting for its lease."""

    __slots__ = ("enqueued_at", "future", "lane", "profile", "tokens")

    def __init__(
        self, lane: LanePolicy, profile: str, tokens: int, enqueued_at: float, future: asyncio.Future[Lease]
    ) -> None:
        self.lane, self.profile, self.tokens, self.enqueued_at, self.future = lane, profile, tokens, enqueued_at, future


class Leases:
    def __init__(
        self,
        name: str,
        store: LeaseStore,
        share: ShareLimit,
        *,
        keep_idle: float | None,
        queued: Callable[[], int],
        changed: Callable[[], None],
        budget: Callable[[], TokenBudget | None] = lambda: None,
    ) -> None:
        """``budget``: the upstream's token budget now (the local gate's; a reload may replace it)."""
        self.name, self.store, self.share, self._budget = name, store, share, budget
        lease_s = store.lease_ms / 1000
        self.poll = min(0.25, lease_s / 10)  # the fallback to the release channel
        self._demand_ttl_ms = max(1000, round(self.poll * 8000))
        self.pool = LeasePool(self.poll / 2 if keep_idle is None else keep_idle)
        self.wants: list[Want] = []
        self.held: dict[str, Lease] = {}
        self._releasing: list[Lease] = []  # given back, to be sent with the next round trip
        self._me = store.replica.encode()
        self._cap_seen = share.limit
        self._ids = itertools.count()
        self._demand = False  # this replica may have a demand published
        self._changed = changed
        self._wake = asyncio.Event()
        self._kicked = False  # the pump was woken for work, not by its poll
        self._loop: asyncio.AbstractEventLoop | None = None
        self.link = Link(
            name,
            store,
            share,
            self.held,
            self.pool,
            queued=lambda: queued() + len(self.wants),
            unsent=lambda: self._releasing,
            kick=self.kick,
            heard=self._heard,
            changed=changed,
        )
        share.subscribe(self._limit_changed)
        self.configure(share.inner, {}, ProfilePolicy(), 10.0)

    def configure(
        self, cap: Limit, profiles: Mapping[str, ProfilePolicy], default_profile: ProfilePolicy, aging: float
    ) -> None:
        self._cap, self._profiles, self._default_profile, self._aging = cap, dict(profiles), default_profile, aging
        self.kick()

    @property
    def in_use(self) -> int:
        """Leases with a request on them."""
        return len(self.held) - len(self.pool)

    def in_use_by(self, key: str, value: str) -> int:
        return sum(
            1
            for lease in self.held.values()
            if (lease.lane if key == "lane" else lease.profile) == value and lease.member not in self.pool
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # -- a request's lease ----------------------------------------------------------------------------------------

    def take(self, lane: LanePolicy, profile: str, tokens: int) -> Lease | None:
        """A pooled lease for this request (of its lane and profile, counted for at least its token need), when
        nobody waits ahead of it here or at another replica."""
        if not self.pool or not self._pooling() or any(not w.future.done() for w in self.wants):
            return None
        lease = self.pool.take(lane.name, profile, tokens)
        if lease is None:  # counted under another lane or profile, or for fewer tokens: this one asks for its own
            self._send_back(*self.pool.drain())
            return None
        return self._serve(lease, tokens)

    def _serve(self, lease: Lease, tokens: int) -> Lease:
        """A lease counted for more tokens than this request needs serves it; the next renewal says its need."""
        if lease.tokens != tokens:
            lease = self.held[lease.member] = replace(lease, tokens=tokens)
        return lease

    async def lease(self, lane: LanePolicy, profile: str, tokens: int, enqueued_at: float, deadline: float) -> Lease:
        """A lease from Redis (or the fallback); ``TimeoutError`` when ``deadline`` passes first."""
        assert self._loop is not None
        want = Want(lane, profile, tokens, enqueued_at, self._loop.create_future())
        self.wants.append(want)
        self.kick()
        try:
            async with asyncio.timeout_at(deadline):
                return await want.future
        except BaseException:
            future = want.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.give_back(future.result())  # granted just as the wait ended: give it back
            raise
        finally:
            self.wants.remove(want)
            self._changed()

    def give_back(self, lease: Lease) -> None:
        """A lease without a request: to the best local waiter if it is of the same lane and profile, else to
        the pool while nobody else could use it, else back to Redis (``_send_back``)."""
        if lease.member not in self.held:
            return
        if self._pooling():
            assert self._loop is not None
            pending = self._pending()
            if not pending:
                self.pool.put(lease, self._loop.time())
                return
            best = pending[0]
            if best.lane.name == lease.lane and best.profile == lease.profile and best.tokens <= lease.tokens:
                best.future.set_result(self._serve(lease, best.tokens))
                return
        self._send_back(lease)

    async def flush(self) -> None:
        """At close: what has no request on it goes back now (else it would expire within a lease)."""
        self._unpool(self.pool.drain())
        releases, self._releasing = self._releasing, []
        if releases and self.link.mode == SHARED:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(self.store.sync(releases, [], cap=0, aging_ms=1), 1.0)

    def kick(self) -> None:
        self._kicked = True
        self._wake.set()

    # -- the pump -------------------------------------------------------------------------------------------------

    async def pump(self) -> None:
        assert self._loop is not None
        while not self.link.closed:
            timed = self.wants or self.held  # held: a pooled lease may go stale, another replica may wait
            await wait_for_event(self._wake, self.poll * random.uniform(0.5, 1.5) if timed else None)
            woken, self._kicked = self._kicked, False
            self._wake.clear()
            try:
                if self.link.mode == FALLBACK:
                    self._unpool(self.pool.drain())
                    await self._grant_in_fallback()
                else:
                    self._unpool(self.pool.stale(self._loop.time()))
                    # a pool kept this long: ask whether another replica waits (a lost message is found so)
                    await self._sync(peek=not woken and bool(self.pool))
            except Exception:  # the pump must outlive anything: a request waits on it
                log.exception("upstream %s: the shared gate's pump failed; retrying", self.name)

    def _rank(self, want: Want, now: float) -> tuple[float, int, float]:
        return (want.lane.priority - (now - want.enqueued_at) / self._aging, want.lane.priority, want.enqueued_at)

    def _pending(self) -> list[Want]:
        assert self._loop is not None
        now = self._loop.time()
        return sorted((w for w in self.wants if not w.future.done()), key=lambda w: self._rank(w, now))

    async def _sync(self, *, peek: bool = False) -> None:
        """One round trip: the leases given back since the last one, then the best-ranked waiters (up to BATCH)."""
        assert self._loop is not None
        releases, self._releasing = self._releasing, []
        pending = self._pending()[:BATCH]
        if not pending and not releases and not peek:
            if self._demand:
                self._demand = False
                await self.store.clear_demand()
            return
        cap, now, budget = self._cap.limit, self._loop.time(), self._budget()
        asks = [
            Ask(
                lease=Lease(self.store.member(str(next(self._ids))), want.lane.name, want.profile, want.tokens),
                cap=cap,
                lane_cap=max(1, cap - want.lane.headroom),
                profile_cap=self._profiles.get(want.profile, self._default_profile).max_inflight,
                priority=want.lane.priority,
                waited_ms=round((now - want.enqueued_at) * 1000),
                aging_ms=round(self._aging * 1000),
                budget=None if budget is None else budget.capacity,
            )
            for want in pending
        ]
        heard = self.pool.heard
        try:
            synced = await self.store.sync(
                releases, asks, cap=cap, aging_ms=round(self._aging * 1000), demand_ttl_ms=self._demand_ttl_ms
            )
        except RedisError as exc:
            self._releasing = releases + self._releasing  # sent again when Redis is back (else they expire)
            self.link.reachable = False
            self.link.fall_back(f"{GONE}: {exc}")
            return
        self.link.reachable = True
        if synced.codes and synced.codes[-1] == scripts.QUIET:
            self.link.fall_back(QUIET)  # first: a quiet server's view is partial, it must not replace ours
        self.link.observe(synced.view)
        self.pool.demand_seen(synced.others, heard)
        if self.pool.others_waiting and self.pool:
            self._send_back(*self.pool.drain())
        for want, ask, code in zip(pending, asks, synced.codes, strict=False):
            if code != scripts.OK:
                continue
            self.held[ask.lease.member] = ask.lease
            if want.future.done():  # timed out or cancelled while we asked
                self.give_back(ask.lease)
            else:
                want.future.set_result(ask.lease)
        # FULL, YIELD, QUIET or TOKENS ended the call: its request is our demand now. Any refusal marks us waiting.
        ended = bool(synced.codes) and synced.codes[-1] in scripts.ENDS
        self._demand = any(code != scripts.OK for code in synced.codes)
        if len(pending) == BATCH and not ended:
            self.kick()  # there may be more behind the batch

    async def _grant_in_fallback(self) -> None:
        """Up to the share, in requests and in tokens (in rank order: nobody overtakes a request whose need does
        not fit). While Redis answers (a quiet period) the new leases are put there before the grant: a replica
        back on the shared gate must not be granted past them."""
        allowance, tokens = self.share.allowance or 0, self.share.tokens or 0
        held_tokens = sum(lease.tokens for lease in self.held.values())
        granted: list[tuple[Want, Lease]] = []
        for want in self._pending():
            if len(self.held) >= allowance or held_tokens + want.tokens > tokens:
                break
            held_tokens += want.tokens
            lease = Lease(self.store.member(str(next(self._ids))), want.lane.name, want.profile, want.tokens)
            self.held[lease.member] = lease
            granted.append((want, lease))
        if granted and self.link.reachable:
            await self.link.renew()
        for want, lease in granted:
            if want.future.done():  # timed out or cancelled meanwhile
                self.give_back(lease)
            else:
                want.future.set_result(lease)

    # -- the pool's ways back ---------------------------------------------------------------------------------------

    def _send_back(self, *leases: Lease) -> None:
        """The leases go back with the pump's next round trip (with the next grants); if Redis is gone by then
        they expire within one lease: the keeper no longer renews them."""
        self._unpool(leases)
        if leases:
            self.kick()

    def _unpool(self, leases: Iterable[Lease]) -> None:
        for lease in leases:
            if self.held.pop(lease.member, None) is not None:
                self._releasing.append(lease)

    def _pooling(self) -> bool:
        return self.pool.open and self.link.mode == SHARED and not self.link.closed

    def _heard(self, data: bytes) -> None:
        """A message on the release channel: another replica's new demand (``?<replica>``), or a release.
        ``?`` alone comes from the listener: it was not listening, so someone may wait."""
        if data[:1] == b"?":
            if data[1:] != self._me:
                self.pool.demand_heard()
                self._send_back(*self.pool.drain())
        elif data != self._me and any(not w.future.done() for w in self.wants):
            self.kick()  # our own releases went with our own asks: nothing to wake for

    def _limit_changed(self, limit: int) -> None:
        """A lower cap: pooled leases may be over it; they go back, and Redis decides again."""
        if limit < self._cap_seen:
            self._send_back(*self.pool.drain())
        self._cap_seen = limit
