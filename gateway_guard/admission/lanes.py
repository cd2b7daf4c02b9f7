"""The waiting line of one lane: one FIFO per profile, profiles served in turns."""

from __future__ import annotations

import asyncio
from collections import deque

from gateway_guard.admission.permit import Permit
from gateway_guard.admission.policy import LanePolicy


class Waiter:
    __slots__ = ("enqueued_at", "future", "lane", "profile", "prompt_estimate", "timer", "tokens")

    def __init__(self, lane: str, profile: str, enqueued_at: float, future: asyncio.Future[Permit]) -> None:
        self.lane = lane
        self.profile = profile
        self.enqueued_at = enqueued_at
        self.future = future
        self.timer: asyncio.TimerHandle | None = None
        self.tokens = 0
        self.prompt_estimate = 0


class LaneQueue:
    """Waiters of one lane, one FIFO per profile, profiles served in round-robin order."""

    __slots__ = ("by_profile", "count", "in_flight", "policy", "turns")

    def __init__(self, policy: LanePolicy) -> None:
        self.policy = policy
        self.by_profile: dict[str, deque[Waiter]] = {}
        self.turns: deque[str] = deque()
        self.count = 0
        self.in_flight = 0

    def push(self, waiter: Waiter, *, front: bool = False) -> None:
        """At the back of its profile's line, or at the front (a request coming back to the line)."""
        fifo = self.by_profile.get(waiter.profile)
        if fifo is None:
            fifo = self.by_profile[waiter.profile] = deque()
            self.turns.append(waiter.profile)
        if front:
            fifo.appendleft(waiter)
        else:
            fifo.append(waiter)
        self.count += 1

    def remove(self, waiter: Waiter) -> None:
        fifo = self.by_profile[waiter.profile]
        fifo.remove(waiter)
        self.count -= 1
        if not fifo:
            del self.by_profile[waiter.profile]
            self.turns.remove(waiter.profile)

    def next_eligible(self, profile_ok: dict[str, bool]) -> tuple[Waiter, float] | None:
        """The waiter whose turn it is, and the oldest enqueue time among eligible heads (for aging)."""
        chosen: Waiter | None = None
        oldest = float("inf")
        for profile in self.turns:
            if not profile_ok.get(profile, True):
                continue
            head = self.by_profile[profile][0]
            if chosen is None:
                chosen = head
            oldest = min(oldest, head.enqueued_at)
        return None if chosen is None else (chosen, oldest)

    def pop(self, waiter: Waiter) -> None:
        fifo = self.by_profile[waiter.profile]
        fifo.popleft()
        self.count -= 1
        self.turns.remove(waiter.profile)
        if fifo:
            self.turns.append(waiter.profile)
        else:
            del self.by_profile[waiter.profile]
