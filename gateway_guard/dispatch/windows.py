"""Batch targets per time window, evaluated in a named timezone with an injected clock.

A window is a half-open range of wall-clock time ``[start, end)`` in the schedule's timezone. A window whose
end is not after its start crosses midnight (``20:00``-``08:00``). The first window that contains ``now``
gives the target; outside all windows the schedule's default target applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, time
from zoneinfo import ZoneInfo


@dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    name: str
    start: time
    end: time
    target: int

    def contains(self, moment: time) -> bool:
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end

    def describe(self) -> str:
        return f"{self.name} {self.start:%H:%M}-{self.end:%H:%M}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    value: int
    window: Window | None

    @property
    def label(self) -> str:
        return self.window.name if self.window is not None else "default"


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    default_target: int
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    windows: tuple[Window, ...] = ()

    def target_at(self, now: datetime) -> Target:
        """The target in force at ``now`` (an aware datetime, in any zone)."""
        if now.tzinfo is None:
            raise ValueError("Schedule.target_at needs an aware datetime (got a naive one)")
        local = now.astimezone(self.timezone).time().replace(tzinfo=None)
        for window in self.windows:
            if window.contains(local):
                return Target(value=window.target, window=window)
        return Target(value=self.default_target, window=None)

    def with_default(self, target: int) -> Schedule:
        """The same timezone, no windows: a fixed target (what ``--target`` asks for)."""
        return Schedule(default_target=target, timezone=self.timezone)
