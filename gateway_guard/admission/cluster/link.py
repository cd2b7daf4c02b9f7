"""One replica's standing with Redis for one upstream: shared or in fallback, what it last saw, its renewals.

* ``keep()`` renews every lease the replica holds every lease/3 (upserts: a lease Redis lost comes back, never
  twice), beats its heart, and reads the cluster-wide counts; in fallback it retries every half second at most.
* ``listen()`` hands each message of the release channel to the gate (``heard``): another replica's release, or
  its new demand.
* ``fall_back(reason)`` restricts the local gate to what the replica holds at that moment, in requests and in
  token needs (it may replace a request that ends, not add one), logs it once, and marks the replica
  *recovering* if Redis was gone: its first renewal back starts a quiet period, so that no replica is granted a
  lease past those the others took in fallback before they too have put them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from redis.exceptions import RedisError

from gateway_guard.admission.cluster.pool import LeasePool
from gateway_guard.admission.cluster.share import ShareLimit
from gateway_guard.admission.cluster.store import Counts, Lease, LeaseStore, View

log = logging.getLogger("gateway_guard.cluster")

SHARED, FALLBACK = "shared", "fallback"
GONE = "Redis unreachable"
QUIET = "Redis is in a quiet period (restarted, or a replica is back from its fallback)"
RETRY_SECONDS = 0.5  # the most a replica in fallback waits between two tries


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """For /guard/ready and /metrics: whether the cap is shared now, and who holds what."""

    mode: str  # SHARED or FALLBACK
    reason: str  # why in fallback ("" when shared)
    allowance: int | None  # what this replica may hold while in fallback
    replica: str
    held: int  # this replica's requests past both steps
    in_flight: int  # leases cluster-wide, last seen
    replicas: Mapping[str, int]  # leases per live replica, last seen
    idle: int = 0  # leases this replica keeps for its next requests (pool.py): in Redis, no request on them
    others_waiting: bool = False  # another replica has a request waiting: this one keeps no idle lease

    @property
    def shared(self) -> bool:
        return self.mode == SHARED


async def wait_for_event(event: asyncio.Event, timeout: float | None) -> None:
    """Until ``event`` is set or ``timeout`` passes. Not ``asyncio.timeout``: on 3.11 a cancel arriving as its
    deadline fires can be taken for the timeout and lost, and a loop that must stop would not."""
    timer = None if timeout is None else asyncio.get_running_loop().call_later(timeout, event.set)
    try:
        await event.wait()
    finally:
        if timer is not None:
            timer.cancel()


class Link:
    def __init__(
        self,
        name: str,
        store: LeaseStore,
        share: ShareLimit,
        held: dict[str, Lease],
        pool: LeasePool,
        *,
        queued: Callable[[], int],
        unsent: Callable[[], list[Lease]],
        kick: Callable[[], None],
        heard: Callable[[bytes], None],
        changed: Callable[[], None],
    ) -> None:
        self.name, self.store, self.share, self.held = name, store, share, held
        self._queued, self._unsent, self._kick, self._changed = queued, unsent, kick, changed
        self._heard, self.pool = heard, pool
        self.mode, self.reason = SHARED, ""
        self.seen: dict[str, int] | None = None  # leases per live replica at the last look; None: never looked
        self.total = 0
        self.tokens = 0  # the leases' token needs summed, cluster-wide, at the last look
        self.counts = Counts(0, {}, {})
        self.recovering = False
        self.renew_now = asyncio.Event()
        self._renew_every = store.lease_ms / 3000
        self.closed = False
        self.reachable = False  # the last call to Redis went through
        self.listening = False  # subscribed to the release channel

    @property
    def status(self) -> ClusterStatus:
        idle = len(self.pool)
        return ClusterStatus(
            self.mode, self.reason, self.share.allowance, self.store.replica, len(self.held) - idle,
            max(self.total, len(self.held)), dict(self.seen or {}), idle, self.pool.others_waiting,
        )  # fmt: skip

    async def keep(self) -> None:
        while not self.closed:
            every = self._renew_every if self.mode == SHARED else min(self._renew_every, RETRY_SECONDS)
            await wait_for_event(self.renew_now, every * random.uniform(0.8, 1.0))
            self.renew_now.clear()
            await self.renew()

    async def renew(self) -> None:
        recovering = self.mode == FALLBACK and self.recovering
        try:
            view = await self.store.renew(list(self.held.values()), recovering=recovering, queued=self._queued())
            self.counts = await self.store.counts()
        except RedisError as exc:
            self.reachable = False
            self.fall_back(f"{GONE}: {exc}")
            return
        self.reachable = True
        self.recovering = False
        if view.code == 1:
            self.fall_back(QUIET)  # first: a quiet server's view is partial, it must not replace ours
            self.observe(view)
        elif self.mode == FALLBACK:
            self.mode, self.reason = SHARED, ""
            self.observe(view)
            self.share.restrict(None)
            log.warning("upstream %s: back on the shared gate (replica %s)", self.name, self.store.replica)
            self._kick()
        else:
            self.observe(view)
        self._changed()

    def fall_back(self, reason: str) -> None:
        """Keep what it holds: the replica goes on with as many requests at once as it held when it lost the
        shared gate (a finished one may be replaced, no more). The leases held then were granted under the cap,
        so the replicas together stay under it whatever they last saw of each other; a share of the cap
        computed from what they last saw could be one too many (the others' last grants were not in it)."""
        if self.mode != FALLBACK:
            unsent = self._unsent()  # as Redis counted them: idle and unsent ones included
            allowance = len(self.held) + len(unsent)
            tokens = sum(lease.tokens for lease in (*self.held.values(), *unsent))
            self.renew_now.set()  # try Redis again soon (then every RETRY_SECONDS at most)
            log.warning(
                "upstream %s: shared gate unavailable (%s); replica %s keeps the %d requests it holds (cap %d)",
                self.name, reason, self.store.replica, allowance, self.share.inner.limit,
            )  # fmt: skip
            self.share.restrict(allowance, tokens)
        self.mode, self.reason = FALLBACK, reason
        if reason.startswith(GONE):
            self.recovering = True  # what we grant now, Redis learns only when back: hold the others till then
        self._kick()
        self._changed()

    def observe(self, view: View) -> None:
        """In fallback a view may be partial (a restarted server knows only the replicas back so far): keep the
        most each replica was seen holding, until the shared gate is back."""
        seen = dict(view.per_replica)
        self.total, self.tokens = view.total, view.tokens
        if self.mode == FALLBACK:
            if self.seen is None:  # a replica that never saw the whole cluster learns nothing from a part
                return
            seen = {r: max(self.seen.get(r, 0), seen.get(r, 0)) for r in set(seen) | set(self.seen)}
        self.seen = seen

    async def listen(self) -> None:
        while not self.closed:
            pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.store.channel)
                self._heard(b"?")  # what was said before is lost: as if someone waited, until a script says
                self.listening = True
                while not self.closed:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._heard(message["data"])
            except (RedisError, OSError):
                self.listening = False
                self._heard(b"?")  # deaf meanwhile: keep no idle lease
                await asyncio.sleep(random.uniform(0.5, 1.0))  # the poll covers the gap; the keeper notices
            finally:
                self.listening = False
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
