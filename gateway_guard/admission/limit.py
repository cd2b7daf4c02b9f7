"""How the cap is chosen, apart from the gate that enforces it (Netflix concurrency-limits' Limit/Limiter split).

A ``Limit`` knows the current cap and hears how each admitted request ended; the gate asks it for the number
and subscribes to changes. ``FixedLimit`` never moves; adaptive rules live beside it and the gate is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Limit(Protocol):
    @property
    def limit(self) -> int: ...

    def on_sample(self, *, rtt: float, in_flight: int, dropped: bool) -> None:
        """One admitted request ended after ``rtt`` seconds with ``in_flight`` requests in flight."""

    def subscribe(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(new_limit)`` whenever the limit changes."""


class FixedLimit:
    __slots__ = ("_limit", "_listeners", "reason")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._limit = limit
        self._listeners: list[Callable[[int], None]] = []
        self.reason = "fixed"

    @property
    def limit(self) -> int:
        return self._limit

    def set(self, limit: int, reason: str = "set by operator") -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._limit = limit
        self.reason = reason
        for listener in self._listeners:
            listener(limit)

    def on_sample(self, *, rtt: float, in_flight: int, dropped: bool) -> None:
        return None

    def subscribe(self, listener: Callable[[int], None]) -> None:
        self._listeners.append(listener)
