"""The board's state read straight from its SQLite file: read-only, WAL-safe, a few milliseconds a read.

``guard-dispatch run`` reads the board here instead of running ``hermes kanban list`` (about a second of
CLI start-up each) and notices changes with ``PRAGMA data_version``, which moves whenever another
connection commits. The connection is opened with ``mode=ro`` and kept for the reader's whole life: a
read-only descriptor cannot take the write lock SQLite needs to checkpoint and delete the WAL on close,
and a connection held open keeps the shared lock that stops another closer from deleting it (see
docs/dispatch.md, "a closing reader can lose the dispatcher's writes").

The schema checked is Hermes 0.19.0's (``hermes_cli/kanban_db.py``). A board without the columns read
here raises :class:`SchemaUnknown`, and the run falls back to the CLI.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway_guard.dispatch.decide import ReadyCard

NEEDED_COLUMNS: Mapping[str, frozenset[str]] = {
    "tasks": frozenset({
        "id", "assignee", "status", "priority", "created_at", "started_at", "worker_pid", "claim_lock",
        "claim_expires", "max_runtime_seconds",
    }),
    "task_links": frozenset({"parent_id", "child_id"}),
}
# Read when present: a run's first heartbeat tells a worker that reached its agent loop (about to ask for
# its first LLM slot) from one still starting. Without them no card counts as starting.
HEARTBEAT_COLUMNS: Mapping[str, frozenset[str]] = {
    "tasks": frozenset({"current_run_id"}),
    "task_runs": frozenset({"id", "started_at", "last_heartbeat_at"}),
}
DEFAULT_CRASH_GRACE_S = 30  # hermes_cli.kanban_db.DEFAULT_CRASH_GRACE_SECONDS
STARTING_MAX_S = 60  # a worker silent this long after its claim no longer counts as "about to ask"


class SchemaUnknown(Exception):
    """The board's tables are not the ones this reader knows; use the CLI instead."""


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host and is no zombie (as Hermes' own ``_pid_alive`` decides)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("State:"):
                    return "Z" not in line.split(":", 1)[1].split()[0]
    except OSError:
        pass
    return True


def crash_grace_s(env: Mapping[str, str]) -> int:
    """``HERMES_KANBAN_CRASH_GRACE_SECONDS`` as Hermes reads it (default 30; bad or negative: default)."""
    raw = env.get("HERMES_KANBAN_CRASH_GRACE_SECONDS", "").strip()
    try:
        value = int(raw)
    except ValueError:
        return DEFAULT_CRASH_GRACE_S
    return value if value >= 0 else DEFAULT_CRASH_GRACE_S


@dataclass(frozen=True, slots=True, kw_only=True)
class RunningCard:
    task_id: str
    assignee: str
    started_at: int | None
    worker_pid: int | None
    alive: bool  # False only for a worker of this host whose process is gone
    starting: bool = False  # claimed, worker not yet in its agent loop (no heartbeat on this run yet)

    def reclaimable(self, now: float, grace_s: float) -> bool:
        """Dead, and past the grace Hermes waits before it reclaims a crashed worker's card."""
        return not self.alive and (self.started_at is None or now - self.started_at >= grace_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class BoardState:
    running: tuple[RunningCard, ...] = ()
    ready: tuple[ReadyCard, ...] = ()
    promotable: int = 0  # todo cards whose parents are all done: the next dispatch pass makes them ready
    overdue: int = 0  # running cards past their max runtime: the next pass reclaims them
    read_ms: float = 0.0
    extra: Mapping[str, int] = field(default_factory=dict)

    def running_by_profile(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for card in self.running:
            counts[card.assignee] = counts.get(card.assignee, 0) + 1
        return counts

    def reclaimable(self, now: float, grace_s: float) -> tuple[RunningCard, ...]:
        return tuple(c for c in self.running if c.reclaimable(now, grace_s))

    def next_reclaim_at(self, grace_s: float) -> float | None:
        """When the earliest dead worker's card becomes reclaimable (epoch seconds), if any is dead."""
        times = [(c.started_at or 0) + grace_s for c in self.running if not c.alive]
        return min(times) if times else None

    @property
    def starting(self) -> int:
        """Running cards whose worker has not asked for an LLM slot yet (it will in a few seconds)."""
        return sum(1 for c in self.running if c.starting and c.alive)

    @property
    def spawnable(self) -> int:
        return sum(1 for c in self.ready if c.assignee) + self.promotable


class BoardReader:
    """One read-only connection to ``kanban.db`` for the reader's life; ``read()`` is one read transaction."""

    def __init__(
        self, db_path: Path, *, alive: Callable[[int], bool] = pid_alive, hostname: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db_path = db_path
        self._alive = alive
        self._host_prefix = f"{hostname or socket.gethostname() or 'unknown'}:"
        self._clock = clock
        uri = "file:" + urllib.parse.quote(str(db_path.absolute())) + "?mode=ro"
        try:
            self._conn = sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None,
                                         check_same_thread=False)
        except sqlite3.Error as exc:
            raise SchemaUnknown(f"cannot open {db_path} read-only: {exc}") from exc
        try:
            self._check_schema()
            self.heartbeats = self._has_columns(HEARTBEAT_COLUMNS)
        except BaseException:
            self._conn.close()
            raise

    def _columns(self, table: str) -> set[str]:
        try:
            return {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
        except sqlite3.Error as exc:
            raise SchemaUnknown(f"{self.db_path}: cannot read table {table}: {exc}") from exc

    def _check_schema(self) -> None:
        for table, needed in NEEDED_COLUMNS.items():
            missing = needed - self._columns(table)
            if missing:
                raise SchemaUnknown(f"{self.db_path}: table {table} lacks {', '.join(sorted(missing))}")

    def _has_columns(self, wanted: Mapping[str, frozenset[str]]) -> bool:
        return all(needed <= self._columns(table) for table, needed in wanted.items())

    def data_version(self) -> int:
        """Moves whenever another connection commits to the board (SQLite's ``PRAGMA data_version``)."""
        row = self._conn.execute("PRAGMA data_version").fetchone()
        return int(row[0])

    def read(self) -> BoardState:
        started = time.perf_counter()
        now = int(self._clock())
        self._conn.execute("BEGIN")
        try:
            running_rows = self._conn.execute(
                "SELECT t.id, t.assignee, t.started_at, t.worker_pid, t.claim_lock, t.max_runtime_seconds, "
                + ("r.started_at, r.last_heartbeat_at FROM tasks t LEFT JOIN task_runs r ON r.id = t.current_run_id "
                   if self.heartbeats else "NULL, 0 FROM tasks t ")
                + "WHERE t.status = 'running' ORDER BY t.started_at, t.id"
            ).fetchall()
            ready_rows = self._conn.execute(
                "SELECT id, assignee, priority, created_at FROM tasks "
                "WHERE status = 'ready' AND claim_lock IS NULL ORDER BY priority DESC, created_at ASC"
            ).fetchall()
            promotable = self._conn.execute(
                "SELECT COUNT(*) FROM tasks t WHERE t.status = 'todo' AND NOT EXISTS ("
                " SELECT 1 FROM task_links l JOIN tasks p ON p.id = l.parent_id"
                " WHERE l.child_id = t.id AND p.status NOT IN ('done', 'archived'))"
            ).fetchone()[0]
        finally:
            self._conn.execute("COMMIT")
        running = []
        overdue = 0
        for task_id, assignee, started_at, pid, claim_lock, max_runtime, run_start, heartbeat in running_rows:
            local = str(claim_lock or "").startswith(self._host_prefix)
            alive = not (local and pid) or self._alive(int(pid))
            claimed = _int_or_none(run_start) or _int_or_none(started_at) or now
            running.append(RunningCard(
                task_id=str(task_id), assignee=str(assignee or ""), started_at=_int_or_none(started_at),
                worker_pid=_int_or_none(pid), alive=alive,
                starting=heartbeat is None and now - claimed < STARTING_MAX_S,
            ))
            if max_runtime and started_at and now - int(started_at) > int(max_runtime):
                overdue += 1
        ready = tuple(
            ReadyCard(task_id=str(i), assignee=(str(a) if a else None), priority=int(p or 0),
                      created_at=int(c or 0))
            for i, a, p, c in ready_rows
        )
        return BoardState(
            running=tuple(running), ready=ready, promotable=int(promotable), overdue=overdue,
            read_ms=(time.perf_counter() - started) * 1000,
        )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> BoardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None
