"""One tick: ask the guard, count the board, decide, dispatch; report it as one structured log line."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from gateway_guard.dispatch.capacity import CapacityClient, CapacityUnavailable
from gateway_guard.dispatch.decide import Decision, Policy, Snapshot, decide, needs_queue, pool_overshoot
from gateway_guard.dispatch.hermes import Board, BoardLocked, DispatchOutcome, Hermes, HermesError, MaxMeaning


class Failure(StrEnum):
    GUARD_UNAVAILABLE = "guard_unavailable"
    HERMES_FAILED = "hermes_failed"
    BOARD_LOCKED = "board_locked"


@dataclass(slots=True, kw_only=True)
class TickReport:
    """What one tick saw and did. ``fields()`` is the log line, in a stable order."""

    tick: str
    board: str
    meaning: MaxMeaning
    decision: Decision | None = None
    max: int | None = None
    outcome: DispatchOutcome | None = None
    dry_run: bool = False
    failure: Failure | None = None
    stopped: str = ""
    error: str = ""
    guard_s: float = 0.0
    hermes_s: float = 0.0
    total_s: float = 0.0
    overshoot: dict[str, int] = field(default_factory=dict)

    @property
    def spawned(self) -> int | None:
        return len(self.outcome.spawned) if self.outcome is not None else None

    def fields(self) -> dict[str, object]:
        d = self.decision
        out: dict[str, object] = {"tick": self.tick, "board": self.board}
        out["running"] = d.running if d else None
        out["free"] = d.free if d else None
        out["target"] = d.target.value if d else None
        out["window"] = d.target.label if d else None
        out["asked"] = d.add if d else 0
        out["max"] = self.max
        out["max_meaning"] = str(self.meaning)
        out["spawned"] = self.spawned if not self.dry_run else None
        out["stopped"] = self.stopped
        if self.dry_run:
            out["dry_run"] = True
        if self.outcome is not None:
            o = self.outcome
            out.update(reclaimed=o.reclaimed, crashed=o.crashed, timed_out=o.timed_out, promoted=o.promoted)
            if o.skipped:
                out["skipped"] = ",".join(f"{k}:{v}" for k, v in sorted(o.skipped.items()))
        if self.overshoot:
            out["pool_overshoot"] = ",".join(f"{k}:{v}" for k, v in sorted(self.overshoot.items()))
        out.update(guard_ms=round(self.guard_s * 1000, 1), hermes_ms=round(self.hermes_s * 1000, 1),
                   total_ms=round(self.total_s * 1000, 1))
        if self.error:
            out["error"] = self.error
        return out

    def line(self, *, as_json: bool = False) -> str:
        return format_line(self.fields(), as_json=as_json)


def format_line(fields: Mapping[str, object], *, as_json: bool = False) -> str:
    if as_json:
        return json.dumps(fields, separators=(",", ":"))
    parts = []
    for key, value in fields.items():
        if value is None:
            text = "-"
        elif isinstance(value, bool):
            text = "1" if value else "0"
        else:
            text = str(value)
        if not text or any(c in text for c in ' "=\n\t'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class Ticker:
    """Holds what stays the same between ticks of one run: the CLI adapter, board, guard client, policy."""

    def __init__(
        self, *, hermes: Hermes, board: Board, meaning: MaxMeaning, capacity: CapacityClient, policy: Policy,
        upstream: str | None = None, clock: Callable[[], datetime], dry_run: bool = False,
    ) -> None:
        self.hermes = hermes
        self.board = board
        self.meaning = meaning
        self.capacity = capacity
        self.policy = policy
        self.upstream = upstream
        self.clock = clock
        self.dry_run = dry_run

    def tick(self, label: str = "1/1") -> TickReport:
        started = time.perf_counter()
        first_call = len(self.hermes.calls)
        report = TickReport(tick=label, board=self.board.slug, meaning=self.meaning, dry_run=self.dry_run)
        try:
            self._tick(report)
        finally:
            report.hermes_s = sum(c.seconds for c in self.hermes.calls[first_call:])
            report.total_s = time.perf_counter() - started
        return report

    def _tick(self, report: TickReport) -> None:
        guard_started = time.perf_counter()
        try:
            capacity = self.capacity.fetch()
            free = capacity.batch_free(self.upstream)
            profile_free = capacity.profile_free(self.upstream)
        except CapacityUnavailable as exc:
            report.failure, report.stopped, report.error = Failure.GUARD_UNAVAILABLE, "guard_unavailable", str(exc)
            return
        except ValueError as exc:
            report.failure, report.stopped = Failure.GUARD_UNAVAILABLE, "guard_unavailable"
            report.error = f"guard capacity at {self.capacity.url}: {exc}"
            return
        finally:
            report.guard_s = time.perf_counter() - guard_started
        try:
            # Reclaim first (crashed, timed-out, stale workers; todo -> ready promotions), then count: a pass
            # that reclaimed cards while spawning would otherwise start more than the guard has room for,
            # because --max counts the cards still running when Hermes gets to the spawning.
            housekeeping = None if self.dry_run else self.hermes.dispatch(self.board, 0)
            running = self.hermes.running()
            ready = self.hermes.ready() if needs_queue(self.policy, profile_free) else None
            decision = decide(
                self.policy.without_queue(),
                Snapshot(free=free, running=running, ready=ready, profile_free=profile_free),
                self.clock(),
            )
            report.decision, report.stopped = decision, decision.stopped
            report.max = self.meaning.max_for(decision.running, decision.add)
            report.outcome = housekeeping
            if self.dry_run or decision.add == 0:
                return
            outcome = self.hermes.dispatch(self.board, report.max)
        except BoardLocked as exc:
            report.failure, report.stopped, report.error = Failure.BOARD_LOCKED, "board_locked", str(exc)
            return
        except HermesError as exc:
            report.failure, report.stopped, report.error = Failure.HERMES_FAILED, "hermes_failed", str(exc)
            return
        report.outcome = outcome if housekeeping is None else housekeeping.then(outcome)
        report.overshoot = pool_overshoot(self.policy, decision, [who for _, who in outcome.spawned])
