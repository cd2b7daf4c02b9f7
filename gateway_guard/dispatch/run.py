"""``guard-dispatch run``: the long-running, event-driven dispatcher.

It wakes when something changed -- the guard's capacity (``GET /guard/events``), the board
(``PRAGMA data_version`` on a read-only SQLite connection), a dead worker's card becoming reclaimable, a
time window's edge -- decides with the same pure ``decide()`` as a tick, and runs ``hermes kanban
dispatch --json --max M`` only when a card may start or a dead worker's card must be reclaimed. While
nothing changes it runs no hermes command at all. Fail closed: no capacity from the guard, no dispatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TextIO

from gateway_guard.dispatch.board import BoardReader, BoardState, RunningCard
from gateway_guard.dispatch.capacity import Capacity, Slots
from gateway_guard.dispatch.decide import Decision, Policy, ReadyCard, Snapshot, decide, needs_queue
from gateway_guard.dispatch.hermes import Board, BoardLocked, DispatchOutcome, Hermes, HermesError, MaxMeaning
from gateway_guard.dispatch.reserve import Booking, BookingFailed, Reserver
from gateway_guard.dispatch.tick import format_line
from gateway_guard.dispatch.watch import GuardWatch

CLI_REFRESH_S = 5.0  # board reads through the CLI (unknown schema) at most this often
STALL_HOLD_S = 15.0  # after a pass that spawned less than asked, wait this long for the board to change
IDLE_WAKE_S = 30.0  # look again at least this often (time windows move the target)
RETRY_S = (1.0, 30.0)  # after a failed dispatch or booking: wait, doubling up to the second figure


@dataclass(slots=True)
class RunStats:
    dispatches: int = 0
    spawned: int = 0
    hermes_calls: int = 0
    failures: int = 0
    steps: int = 0
    lines: list[dict[str, object]] = field(default_factory=list)


class Runner:
    def __init__(
        self, *, hermes: Hermes, board: Board, meaning: MaxMeaning, policy: Policy, guard_url: str,
        upstream: str | None, reader: BoardReader | None, reserver: Reserver | None, grace_s: float,
        clock: Callable[[], datetime], out: TextIO, log_json: bool = False, board_poll_s: float = 0.1,
        guard_timeout_s: float = 2.0, watch: GuardWatch | None = None,
    ) -> None:
        self.hermes, self.board, self.meaning, self.policy = hermes, board, meaning, policy
        self.upstream, self.reader, self.reserver, self.grace_s = upstream, reader, reserver, grace_s
        self.clock, self.out, self.log_json, self.board_poll_s = clock, out, log_json, board_poll_s
        self.wake = asyncio.Event()
        self.watch = watch or GuardWatch(guard_url, on_change=self.wake.set, timeout_s=guard_timeout_s)
        self.stats = RunStats()
        self._guard_up: bool | None = None
        self._stalled: tuple[int, float] | None = None  # (board version, monotonic time) of a short pass
        self._housekept: dict[str, float] = {}
        self._cli_state: tuple[float, BoardState] | None = None
        self._version = -1
        self._retry_at = 0.0
        self._retry_s = RETRY_S[0]

    def log(self, fields: dict[str, object]) -> None:
        self.stats.lines.append(fields)
        print(format_line(fields, as_json=self.log_json), file=self.out, flush=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set; a dispatch already running is finished first (its workers get their pids)."""
        tasks = [asyncio.create_task(self.watch.run(), name="guard-watch")]
        if self.reader is not None:
            tasks.append(asyncio.create_task(self._poll_board(), name="board-poll"))
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                self.wake.clear()
                timeout = await self.step()
                waiter = asyncio.create_task(self.wake.wait())
                await asyncio.wait({waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        finally:
            stopper.cancel()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self.reserver is not None:
                await self.reserver.aclose()

    async def _poll_board(self) -> None:
        assert self.reader is not None
        while True:
            version = self.reader.data_version()
            if version != self._version:
                self._version = version
                self.wake.set()
            await asyncio.sleep(self.board_poll_s)

    async def _board_state(self) -> BoardState:
        if self.reader is not None:
            return self.reader.read()
        now = time.monotonic()
        if self._cli_state is None or now - self._cli_state[0] >= CLI_REFRESH_S:
            running, ready = await asyncio.to_thread(self._cli_read)
            self._cli_state = (now, BoardState(running=running, ready=ready))
        return self._cli_state[1]

    def _cli_read(self) -> tuple[tuple[RunningCard, ...], tuple[ReadyCard, ...]]:
        cards = tuple(
            RunningCard(task_id="", assignee=who, started_at=None, worker_pid=None, alive=True)
            for who, n in self.hermes.running().items() for _ in range(n)
        )
        return cards, tuple(self.hermes.ready())

    def _guard_changed(self, capacity: Capacity | None) -> None:
        up = capacity is not None
        if self.watch.updates == 0:
            return  # not connected yet: nothing to report
        if up != self._guard_up:
            self._guard_up = up
            fields: dict[str, object] = {"event": "guard_up" if up else "guard_down", "board": self.board.slug,
                                         "mode": self.watch.mode}
            if not up:
                fields["error"] = self.watch.error
            self.log(fields)

    async def step(self) -> float:
        """Look once and dispatch if a card may start or a dead worker's card is due; returns how long the
        caller may sleep before looking again (it also wakes on any change)."""
        self.stats.steps += 1
        capacity = self.watch.current
        self._guard_changed(capacity)
        try:
            state = await self._board_state()
        except HermesError as exc:
            self.stats.failures += 1
            self.log({"event": "board_unreadable", "board": self.board.slug, "error": str(exc)})
            return CLI_REFRESH_S
        now = time.time()
        due = [c for c in state.reclaimable(now, self.grace_s) if c.task_id not in self._housekept]
        next_reclaim = state.next_reclaim_at(self.grace_s)
        timeout = IDLE_WAKE_S if next_reclaim is None or due else max(0.05, next_reclaim - now + 0.2)
        if capacity is None:
            return timeout  # fail closed
        try:
            free = capacity.batch_free(self.upstream)
            profile_free = capacity.profile_free(self.upstream)
            lane = _batch_lane(capacity, self.upstream)
        except ValueError as exc:
            self.log({"event": "guard_bad_capacity", "board": self.board.slug, "error": str(exc)})
            return timeout
        reclaim = {c.task_id for c in state.reclaimable(now, self.grace_s)}
        running: dict[str, int] = {}
        for card in state.running:
            if card.task_id not in reclaim:  # this pass reclaims it before counting
                running[card.assignee] = running.get(card.assignee, 0) + 1
        ready = list(state.ready) if needs_queue(self.policy, profile_free) else None
        # Booked slots are off `free` already, and a booking needs a free slot: with reservations the automatic
        # target fills free slots only (a starting card holds its booking, so it is not counted again).
        booking = self.reserver is not None and self.reserver.enabled
        policy = self.policy.without_queue() if booking else self.policy
        decision = decide(policy, Snapshot(free=free, running=running, ready=ready, profile_free=profile_free,
                                           queued=lane.queued, in_flight=lane.in_flight, slots=lane.limit or 0,
                                           starting=0 if booking else state.starting), self.clock())
        add = min(decision.add, state.spawnable + len(due))  # a reclaimed card is ready again in the same pass
        if add > 0 and self._stalled is not None:
            version, at = self._stalled
            if self._version == version and time.monotonic() - at < STALL_HOLD_S:
                add = 0
            else:
                self._stalled = None
        if add == 0 and not due and not state.overdue:
            return timeout
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            return min(wait, timeout)
        if await self._dispatch(state, decision, add, due):
            self._retry_s = RETRY_S[0]
            return 0.0 if add > 0 else timeout
        self._retry_at = time.monotonic() + self._retry_s
        self._retry_s = min(RETRY_S[1], self._retry_s * 2)
        return self._retry_s

    async def _dispatch(self, state: BoardState, decision: Decision, add: int, due: list[RunningCard]) -> bool:
        """False when it failed (the caller backs off)."""
        started = time.perf_counter()
        bookings: list[Booking] = []
        fields: dict[str, object] = {
            "event": "dispatch", "board": self.board.slug, "running": decision.running, "free": decision.free,
            "target": "auto" if self.policy.auto else decision.target.value, "asked": add,
        }
        if self.policy.auto:
            fields["starting"] = state.starting
        try:
            if add > 0:
                bookings, add = await self._book(_claim_order(state, add, due), add)
                fields["reserved"] = sum(b.n for b in bookings)
            max_ = self.meaning.max_for(decision.running, add)
            if add == 0 and not due and not state.overdue:
                fields.update(max=0, spawned=0, stopped="guard_no_room")
                self.log(fields)
                return True
            self.stats.hermes_calls += 1
            outcome = await asyncio.to_thread(self.hermes.dispatch, self.board, max_)
        except BookingFailed as exc:
            fields.update(spawned=0, stopped="guard_unavailable", error=str(exc))
            self.stats.failures += 1
            self.log(fields)
            return False
        except (BoardLocked, HermesError) as exc:
            await self._cancel(bookings)
            self.stats.failures += 1
            fields.update(spawned=0, stopped="board_locked" if isinstance(exc, BoardLocked) else "hermes_failed",
                          error=str(exc))
            self.log(fields)
            return False
        still_running = {c.task_id for c in state.running}
        self._housekept = {k: v for k, v in self._housekept.items() if k in still_running}
        for card in due:
            self._housekept[card.task_id] = time.monotonic()
        await self._settle(bookings, outcome)
        self.stats.dispatches += 1
        self.stats.spawned += len(outcome.spawned)
        if len(outcome.spawned) < add and self.reader is not None:
            self._version = self.reader.data_version()  # the pass's own writes are no news
            self._stalled = (self._version, time.monotonic())
        fields.update(
            max=max_, spawned=len(outcome.spawned), stopped=decision.stopped, reclaimed=outcome.reclaimed,
            crashed=outcome.crashed, timed_out=outcome.timed_out, promoted=outcome.promoted,
            hermes_ms=round(sum(c.seconds for c in self.hermes.calls[-1:]) * 1000, 1),
            total_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        if outcome.skipped:
            fields["skipped"] = ",".join(f"{k}:{v}" for k, v in sorted(outcome.skipped.items()))
        self.log(fields)
        return True

    async def _book(self, profiles: list[str], add: int) -> tuple[list[Booking], int]:
        """One reservation per card about to start; ``add`` shrinks to what the guard granted."""
        if self.reserver is None or not self.reserver.enabled:
            return [], add
        bookings: list[Booking] = []
        for profile in profiles:
            booking = await self.reserver.book(profile)
            if booking is None:
                if not self.reserver.enabled:  # the guard does not know reservations: as tick does
                    return bookings, add
                break
            bookings.append(booking)
        return bookings, len(bookings)

    async def _settle(self, bookings: list[Booking], outcome: DispatchOutcome) -> None:
        """Keep one booking per spawned card (by profile); cancel the rest; book for unforeseen spawns."""
        if self.reserver is None or not self.reserver.enabled:
            return
        left = list(bookings)
        unmatched: list[str] = []
        for _, who in outcome.spawned:
            match = next((b for b in left if b.profile == (who or "")), None)
            if match is not None:
                left.remove(match)
            else:
                unmatched.append(who or "")
        await self._cancel(left)
        for who in unmatched:
            with contextlib.suppress(BookingFailed):
                await self.reserver.book(who)

    async def _cancel(self, bookings: list[Booking]) -> None:
        if self.reserver is not None:
            for booking in bookings:
                await self.reserver.cancel(booking)


def _claim_order(state: BoardState, add: int, reclaimed: list[RunningCard]) -> list[str]:
    """The profiles of the next ``add`` cards Hermes will claim (priority, then age; cards this pass reclaims
    after them); a promotable todo card's profile is unknown until the pass promotes it, so it books under
    the first ready profile."""
    order = sorted((c for c in state.ready if c.assignee), key=lambda c: (-c.priority, c.created_at))
    profiles = [str(c.assignee) for c in order[:add]] + [c.assignee for c in reclaimed if c.assignee]
    profiles = profiles[:add]
    while len(profiles) < add:
        profiles.append(profiles[0] if profiles else "")
    return profiles


def _batch_lane(capacity: Capacity, upstream: str | None) -> Slots:
    """The batch lane's slots (over all upstreams, or of one): what the automatic target reads."""
    if upstream is None:
        return capacity.lanes.get("batch") or Slots(limit=0, in_flight=0, queued=0, free=capacity.free)
    up = capacity.upstreams.get(upstream)
    if up is None:
        return Slots(limit=0, in_flight=0, queued=0, free=0)
    return up.lanes.get("batch") or up.slots
