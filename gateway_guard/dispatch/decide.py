"""How many cards may start now: the pure decision of one tick (no I/O, plain values in and out).

The answer is ``min(guard free slots, target - running)``, then walked down the ready queue in the order
Hermes' dispatcher claims cards (priority descending, then oldest first). Hermes cannot be told to skip a
card, so when pools or the guard's per-profile limits are in force the walk stops before the first card
that would not fit: a full pool at the head of the queue holds back the cards behind it.

Cards that tie on (priority, created_at) may be claimed in any order, so a tie group is taken only as far
as *every* choice of that many cards fits.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from gateway_guard.dispatch.windows import Schedule, Target


class Stop(StrEnum):
    """What bounded the number a tick asks for (the ``stopped=`` field of the tick log line)."""

    GUARD_FULL = "guard_full"
    AT_TARGET = "at_target"
    GUARD_FREE = "guard_free"
    TARGET = "target"
    POOL = "pool"
    PROFILE_FREE = "profile_free"
    QUEUE_EMPTY = "queue_empty"
    GUARD_QUEUED = "guard_queued"
    STARTING = "starting"


@dataclass(frozen=True, slots=True, kw_only=True)
class Pool:
    """At most ``limit`` cards assigned to any of ``profiles`` run at once."""

    name: str
    profiles: frozenset[str]
    limit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """``auto``: the target is the schedule's (``max_running``, the host's bound), and cards start while the
    batch requests the guard holds or will soon get -- queued, plus one per card whose worker is still
    starting -- fall short of its free batch slots plus a standing queue of ``queue_per_slot`` requests per
    batch slot (see ``auto_room``)."""

    schedule: Schedule
    pools: tuple[Pool, ...] = ()
    auto: bool = False
    queue_per_slot: float = 2.0

    def without_queue(self) -> Policy:
        """This policy with no standing queue: for deciders that cannot see starting workers (a tick)."""
        return dataclasses.replace(self, queue_per_slot=0.0)

    def pool_of(self, profile: str | None) -> Pool | None:
        for pool in self.pools:
            if profile in pool.profiles:
                return pool
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadyCard:
    task_id: str
    assignee: str | None
    priority: int = 0
    created_at: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """What a tick saw: the guard's free batch slots, running cards per profile, the ready queue.

    ``ready`` is None when the queue was not read (no pool or per-profile limit needs it).
    ``profile_free`` holds the guard's free slots for the profiles it limits; others are unlimited.
    Only the automatic target reads the rest: ``queued`` and ``in_flight``, the guard's batch requests waiting
    and served; ``slots``, its batch slots; ``starting``, running cards whose worker has not asked for a slot
    yet.
    """

    free: int
    running: Mapping[str, int]
    ready: Sequence[ReadyCard] | None = None
    profile_free: Mapping[str, int] = field(default_factory=dict)
    queued: int = 0
    in_flight: int = 0
    slots: int = 0
    starting: int = 0

    @property
    def running_total(self) -> int:
        return sum(self.running.values())


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    add: int
    target: Target
    running: int
    free: int
    stop: Stop
    detail: str = ""
    pool_room: Mapping[str, int] = field(default_factory=dict)

    @property
    def stopped(self) -> str:
        return f"{self.stop}:{self.detail}" if self.detail else str(self.stop)


def auto_room(snapshot: Snapshot, queue_per_slot: float) -> int:
    """Cards the automatic target may start: enough that the guard's free batch slots fill and, once its batch
    lane is serving, ``queue_per_slot`` requests per batch slot wait behind them, counting each starting card
    as one request to come.

    A worker asks for its first slot 3-16 s after its card starts; counting only the slots free now (and
    stopping at the first queued request) leaves the GPU idle that long after every finished card. A short
    standing batch queue covers the start-up instead. Interactive requests still go first: the gate serves
    the interactive lane first (until a batch request has waited ``aging_seconds``), and the batch lane's
    headroom keeps slots batch never takes. No queue is aimed at
    while nothing is served yet: workers that start together share the host's CPUs, so a cold start of
    free-slots-plus-queue workers reaches the GPU later than one of free-slots workers.
    """
    queue = math.ceil(queue_per_slot * max(0, snapshot.slots)) if snapshot.in_flight > 0 else 0
    return max(0, max(0, snapshot.free) + queue - max(0, snapshot.queued) - max(0, snapshot.starting))


def needs_queue(policy: Policy, profile_free: Mapping[str, int]) -> bool:
    """Whether the decision must walk the ready queue (pools or per-profile guard limits in force)."""
    return bool(policy.pools) or bool(profile_free)


def decide(policy: Policy, snapshot: Snapshot, now: datetime) -> Decision:
    target = policy.schedule.target_at(now)
    free = max(0, snapshot.free)
    running = snapshot.running_total
    room = max(0, target.value - running)
    base = min(free, room)
    if policy.auto:
        want = auto_room(snapshot, policy.queue_per_slot)
        base = min(want, room)
        if room == 0:
            base_stop = Stop.AT_TARGET
        elif want == 0:
            base_stop = Stop.GUARD_QUEUED if snapshot.queued > 0 else Stop.STARTING
        else:
            base_stop = Stop.GUARD_FREE if want < room else Stop.TARGET
    elif free == 0:
        base_stop = Stop.GUARD_FULL
    elif room == 0:
        base_stop = Stop.AT_TARGET
    elif free < room:
        base_stop = Stop.GUARD_FREE
    else:
        base_stop = Stop.TARGET
    pool_room = {
        pool.name: max(0, pool.limit - sum(snapshot.running.get(p, 0) for p in pool.profiles))
        for pool in policy.pools
    }

    def decision(add: int, stop: Stop, detail: str = "") -> Decision:
        return Decision(
            add=add, target=target, running=running, free=free, stop=stop, detail=detail,
            pool_room=pool_room,
        )

    if snapshot.ready is None:
        if needs_queue(policy, snapshot.profile_free):
            raise ValueError("pools and per-profile limits need the ready queue (Snapshot.ready)")
        return decision(base, base_stop)
    if base == 0:
        return decision(0, base_stop)
    add, stop, detail = _walk_queue(policy, snapshot, base, base_stop, dict(pool_room))
    return decision(add, stop, detail)


def _walk_queue(
    policy: Policy, snapshot: Snapshot, base: int, base_stop: Stop, pool_room: dict[str, int]
) -> tuple[int, Stop, str]:
    assert snapshot.ready is not None
    profile_room = {p: max(0, n) for p, n in snapshot.profile_free.items()}
    order = sorted(snapshot.ready, key=lambda c: (-c.priority, c.created_at))
    remaining = base
    added = 0
    for _, tied in itertools.groupby(order, key=lambda c: (c.priority, c.created_at)):
        # Hermes skips unassigned cards (unless kanban.default_assignee is set; see docs/dispatch.md).
        group = [c for c in tied if c.assignee]
        if not group:
            continue
        if remaining == 0:
            return added, base_stop, ""
        take = min(remaining, len(group))
        stop, detail = base_stop, ""
        for name, pool_members in _members(policy, group).items():
            if pool_members > pool_room[name] and pool_room[name] < take:
                pool = next(p for p in policy.pools if p.name == name)
                take = pool_room[name]
                stop, detail = Stop.POOL, f"{name}({pool.limit - pool_room[name]}/{pool.limit})"
        for profile, room in profile_room.items():
            wanted = sum(1 for c in group if c.assignee == profile)
            if wanted > room and room < take:
                take = room
                stop, detail = Stop.PROFILE_FREE, f"{profile}({room} free)"
        added += take
        remaining -= take
        if take < len(group):
            return added, stop, detail
        for card in group:
            owner = policy.pool_of(card.assignee)
            if owner is not None:
                pool_room[owner.name] -= 1
            if card.assignee in profile_room:
                profile_room[card.assignee] -= 1
    if remaining == 0:
        return added, base_stop, ""
    return added, Stop.QUEUE_EMPTY, ""


def _members(policy: Policy, group: Sequence[ReadyCard]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for card in group:
        pool = policy.pool_of(card.assignee)
        if pool is not None:
            counts[pool.name] = counts.get(pool.name, 0) + 1
    return counts


def pool_overshoot(policy: Policy, decision: Decision, spawned: Sequence[str | None]) -> dict[str, int]:
    """Pools that got more spawns than they had room for (a race with cards created or promoted meanwhile).

    Returns ``{pool: spawned_in_pool}`` for each pool over its room; empty when every pool held.
    """
    counts: dict[str, int] = {}
    for assignee in spawned:
        pool = policy.pool_of(assignee)
        if pool is not None:
            counts[pool.name] = counts.get(pool.name, 0) + 1
    return {name: n for name, n in counts.items() if n > decision.pool_room.get(name, 0)}
