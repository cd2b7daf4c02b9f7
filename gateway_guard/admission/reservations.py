"""Batch slots booked ahead for workers that were just started (pure asyncio, no HTTP, fake-clock testable).

A Hermes worker takes 6-16 s from its spawn to its first LLM call. A dispatcher books a slot for it when
it starts the worker; the booked slot counts against ``free`` for every reader of the capacity (so two
dispatchers sharing one guard never both fill the same slot), the next admitted request of that profile
consumes it, and an unused booking expires after its TTL (by the loop's clock).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Listener = Callable[[], None]


class NoRoom(Exception):
    """Nothing left to book: every free slot is already in use or reserved."""


@dataclass(slots=True)
class Reservation:
    id: str
    profile: str
    n: int
    upstream: str | None
    expires_at: float  # loop time

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"id": self.id, "profile": self.profile, "n": self.n, "upstream": self.upstream,
                "expires_in": round(max(0.0, self.expires_at - now), 3)}


class Reservations:
    """The guard's bookings. ``watch(listener)`` hears every change (book, cancel, consume, expiry)."""

    __slots__ = ("_by_id", "_clock", "_ids", "_listeners", "_timer")

    def __init__(self, *, clock: Callable[[], float] | None = None) -> None:
        self._by_id: dict[str, Reservation] = {}
        self._clock = clock
        self._ids = itertools.count(1)
        self._listeners: list[Listener] = []
        self._timer: asyncio.TimerHandle | None = None

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def watch(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()

    def book(self, profile: str, n: int, ttl: float, upstream: str | None = None, *, room: int | None = None
             ) -> Reservation:
        """Book ``n`` slots for ``ttl`` seconds; with ``room`` (free unreserved slots) at most that many,
        and :class:`NoRoom` when there is none."""
        if not profile:
            raise ValueError("profile must be a non-empty string")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0 seconds, got {ttl}")
        self.prune()
        if room is not None:
            if room < 1:
                raise NoRoom(f"no free batch slot to reserve for {profile!r}")
            n = min(n, room)
        reservation = Reservation(id=f"r{next(self._ids)}", profile=profile, n=n, upstream=upstream,
                                  expires_at=self._now() + ttl)
        self._by_id[reservation.id] = reservation
        self._arm()
        self._changed()
        return reservation

    def cancel(self, reservation_id: str) -> bool:
        if self._by_id.pop(reservation_id, None) is None:
            return False
        self._changed()
        return True

    def consume(self, upstream: str, profile: str) -> bool:
        """Take one slot reserved for ``profile`` (on this upstream, or on none named); False if none."""
        if not self._by_id:
            return False
        self.prune()
        chosen = None
        for reservation in self._by_id.values():  # oldest first
            if reservation.profile == profile and reservation.upstream in (upstream, None):
                if reservation.upstream == upstream:
                    chosen = reservation
                    break
                chosen = chosen or reservation
        if chosen is None:
            return False
        chosen.n -= 1
        if chosen.n == 0:
            del self._by_id[chosen.id]
        self._changed()
        return True

    def reserved(self, upstream: str | None = None) -> int:
        """Slots booked: all of them, or those booked on the named upstream."""
        if not self._by_id:
            return 0
        self.prune()
        return sum(r.n for r in self._by_id.values() if upstream is None or r.upstream == upstream)

    def list(self) -> list[dict[str, Any]]:
        self.prune()
        now = self._now()
        return [r.as_dict(now) for r in self._by_id.values()]

    def get(self, reservation_id: str) -> Reservation | None:
        self.prune()
        return self._by_id.get(reservation_id)

    def prune(self) -> int:
        """Drop expired bookings (the clock decides); returns how many."""
        if not self._by_id:
            return 0
        now = self._now()
        expired = [rid for rid, r in self._by_id.items() if r.expires_at <= now]
        for rid in expired:
            del self._by_id[rid]
        if expired:
            self._changed()
        return len(expired)

    def _arm(self) -> None:
        """A loop timer at the earliest expiry, so listeners hear of it without anyone asking."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._by_id and self._clock is None:
            self._timer = loop.call_at(min(r.expires_at for r in self._by_id.values()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.prune()
        self._arm()


def apply_reservations(payload: dict[str, Any], reservations: Reservations) -> dict[str, Any]:
    """The capacity payload with booked slots taken off its free numbers, plus ``reserved`` counts.

    Top level and the batch lane: all bookings; an upstream (and its batch lane): the bookings naming it.
    Never below 0. The payload passed in is not changed.
    """
    total = reservations.reserved()
    out = copy.deepcopy(payload)
    out["reserved"] = total
    if total:
        out["free"] = max(0, int(out.get("free", 0)) - total)
        batch = out.get("lanes", {}).get("batch")
        if isinstance(batch, dict) and batch.get("free") is not None:
            batch["free"] = max(0, batch["free"] - total)
    for name, upstream in out.get("upstreams", {}).items():
        mine = reservations.reserved(name)
        upstream["reserved"] = mine
        if not mine:
            continue
        if upstream.get("free") is not None:
            upstream["free"] = max(0, upstream["free"] - mine)
        batch = upstream.get("lanes", {}).get("batch")
        if isinstance(batch, dict) and batch.get("free") is not None:
            batch["free"] = max(0, batch["free"] - mine)
    return out
