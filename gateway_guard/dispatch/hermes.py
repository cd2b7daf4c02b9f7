"""The only code that runs the ``hermes`` CLI, and the only place that knows what its ``--max`` means.

Every board read uses ``--json`` (the text forms change with the number of boards). ``dispatch --max N``
has meant "the board's total running cards stop at N" in every release on PyPI (0.13.0 to 0.19.0 were
checked: ``running_count + spawned >= max_spawn`` in ``kanban_db.dispatch_once``); development builds
before 0.13.0 capped the spawns of one pass instead (``spawned >= max_spawn``), which is what the
community's capped-dispatch scripts assume. The meaning is chosen from ``hermes --version``; a version
that cannot be read falls back to the per-pass meaning, which under-dispatches on newer releases rather
than over-dispatching on older ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from gateway_guard.dispatch import lock
from gateway_guard.dispatch.decide import ReadyCard

RUNNING_CAP_SINCE = (0, 13, 0)
_VERSION_RE = re.compile(r"\bv?(\d+)\.(\d+)\.(\d+)")


class MaxMeaning(StrEnum):
    RUNNING_CAP = "running_cap"
    PER_PASS = "per_pass"

    def max_for(self, running: int, add: int) -> int:
        """The ``--max`` that lets ``add`` more cards start. 0 when nothing may start: it never spawns."""
        if add <= 0:
            return 0
        return running + add if self is MaxMeaning.RUNNING_CAP else add


class HermesNotFound(Exception):
    def __init__(self, tried: Sequence[str]) -> None:
        super().__init__("hermes CLI not found; tried: " + "; ".join(tried))
        self.tried = tuple(tried)


class HermesError(Exception):
    """A hermes command failed; the message carries the command, exit status and stderr."""


class BoardLocked(Exception):
    def __init__(self, lock_path: Path) -> None:
        super().__init__(f"board is locked by another dispatcher ({lock_path} is held); not dispatching")
        self.lock_path = lock_path


def resolve_hermes(explicit: str | None, env: Mapping[str, str]) -> Path:
    """``--hermes PATH``, else ``$HERMES_BIN``, else ``hermes`` on ``$PATH``; an absolute, executable path.

    The first of the three that is given is used; if it is no executable the error names what was tried.
    """
    path_var = env.get("PATH", os.defpath)
    if explicit:
        candidates = [(f"--hermes {explicit}", explicit)]
    elif env.get("HERMES_BIN"):
        candidates = [(f"HERMES_BIN={env['HERMES_BIN']}", env["HERMES_BIN"])]
    else:
        candidates = [(f"'hermes' on PATH={path_var}", "hermes")]
    tried = []
    for label, name in candidates:
        found = shutil.which(name, path=path_var) if os.sep not in name else _executable(name)
        if found is not None:
            return Path(found).absolute()
        tried.append(f"{label} (not found or not executable)")
    raise HermesNotFound(tried)


def _executable(name: str) -> str | None:
    return name if os.path.isfile(name) and os.access(name, os.X_OK) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class HermesVersion:
    text: str
    number: tuple[int, int, int] | None

    @property
    def meaning(self) -> MaxMeaning:
        if self.number is not None and self.number >= RUNNING_CAP_SINCE:
            return MaxMeaning.RUNNING_CAP
        return MaxMeaning.PER_PASS

    @property
    def label(self) -> str:
        return ".".join(map(str, self.number)) if self.number else "unknown"


def parse_version(text: str) -> HermesVersion:
    first = text.strip().splitlines()[0] if text.strip() else ""
    match = _VERSION_RE.search(first)
    number = (int(match[1]), int(match[2]), int(match[3])) if match else None
    return HermesVersion(text=first, number=number)


@dataclass(frozen=True, slots=True, kw_only=True)
class Board:
    slug: str
    db_path: Path

    @property
    def dispatch_lock(self) -> Path:
        """Hermes' own non-blocking dispatch lock, a sibling of the board's database."""
        return self.db_path.with_name(self.db_path.name + ".dispatch.lock")


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchOutcome:
    max: int
    spawned: tuple[tuple[str, str | None], ...]
    reclaimed: int = 0
    crashed: int = 0
    timed_out: int = 0
    promoted: int = 0
    skipped: Mapping[str, int] = field(default_factory=dict)

    def then(self, later: DispatchOutcome) -> DispatchOutcome:
        """Two passes of one tick as one: the later pass's --max and skips, both passes' counts."""
        return DispatchOutcome(
            max=later.max, spawned=self.spawned + later.spawned, reclaimed=self.reclaimed + later.reclaimed,
            crashed=self.crashed + later.crashed, timed_out=self.timed_out + later.timed_out,
            promoted=self.promoted + later.promoted, skipped=later.skipped,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    what: str
    seconds: float


class Hermes:
    """Runs ``hermes kanban`` commands for one board (``--board``, else the CLI's current board)."""

    def __init__(
        self, path: Path, *, board: str | None = None, env: Mapping[str, str] | None = None,
        timeout_s: float = 180.0,
    ) -> None:
        self.path = path
        self.board_slug = board
        self.env = dict(os.environ if env is None else env)
        self.timeout_s = timeout_s
        self.calls: list[Call] = []

    def version(self) -> HermesVersion:
        return parse_version(self._run(["--version"], "version")[0])

    def board(self) -> Board:
        boards = self._json(["kanban", "boards", "list", "--json"], "boards")
        if not isinstance(boards, list):
            raise HermesError(f"`hermes kanban boards list --json` gave no list: {boards!r:.200}")
        for entry in boards:
            if not isinstance(entry, dict):
                continue
            chosen = entry.get("slug") == self.board_slug if self.board_slug else entry.get("is_current")
            if chosen:
                return Board(slug=str(entry["slug"]), db_path=Path(str(entry["db_path"])))
        known = ", ".join(str(b.get("slug")) for b in boards if isinstance(b, dict)) or "none"
        wanted = repr(self.board_slug) if self.board_slug else "the current board"
        raise HermesError(f"hermes has no board {wanted} (boards: {known})")

    def running(self) -> dict[str, int]:
        """Running cards per assignee (``""`` for a card with none)."""
        counts: dict[str, int] = {}
        for task in self._tasks("running"):
            who = str(task.get("assignee") or "")
            counts[who] = counts.get(who, 0) + 1
        return counts

    def ready(self) -> list[ReadyCard]:
        return [
            ReadyCard(
                task_id=str(t["id"]), assignee=(str(t["assignee"]) if t.get("assignee") else None),
                priority=int(t.get("priority") or 0), created_at=int(t.get("created_at") or 0),
            )
            for t in self._tasks("ready")
        ]

    def stats(self) -> dict[str, dict[str, int]]:
        """Card counts per assignee and status (``kanban stats --json``'s ``by_assignee``)."""
        body = self._json(self._kanban("stats", "--json"), "stats")
        by_assignee = body.get("by_assignee", {}) if isinstance(body, dict) else {}
        return {
            str(who): {str(status): int(n) for status, n in counts.items()}
            for who, counts in by_assignee.items() if isinstance(counts, dict)
        }

    def dispatch(self, board: Board, max_: int) -> DispatchOutcome:
        """One dispatcher pass capped by ``--max max_``; refuses if another dispatcher holds the board."""
        if lock.is_held(board.dispatch_lock):
            raise BoardLocked(board.dispatch_lock)
        body = self._json(self._kanban("dispatch", "--json", "--max", str(max_)), "dispatch")
        if not isinstance(body, dict):
            raise HermesError(f"`hermes kanban dispatch --json` gave no object: {body!r:.200}")
        spawned = tuple(
            (str(s.get("task_id")), (str(s["assignee"]) if s.get("assignee") else None))
            for s in body.get("spawned", []) if isinstance(s, dict)
        )
        skipped = {
            key.removeprefix("skipped_"): len(value)
            for key, value in body.items()
            if key.startswith("skipped_") and isinstance(value, list) and value
        }
        return DispatchOutcome(
            max=max_, spawned=spawned, reclaimed=_count(body.get("reclaimed")),
            crashed=_count(body.get("crashed")), timed_out=_count(body.get("timed_out")),
            promoted=_count(body.get("promoted")), skipped=skipped,
        )

    def _tasks(self, status: str) -> list[dict[str, Any]]:
        body = self._json(self._kanban("list", "--status", status, "--json"), f"list-{status}")
        if not isinstance(body, list):
            raise HermesError(f"`hermes kanban list --status {status} --json` gave no list: {body!r:.200}")
        return [t for t in body if isinstance(t, dict)]

    def _kanban(self, *args: str) -> list[str]:
        board = ["--board", self.board_slug] if self.board_slug else []
        return ["kanban", *board, *args]

    def _json(self, args: list[str], what: str) -> Any:
        out, err = self._run(args, what)
        try:
            return json.loads(out)
        except ValueError:
            # Tolerate a stray line before the JSON (a warning printed to stdout).
            start = min((i for i in (out.find("\n["), out.find("\n{")) if i >= 0), default=-1)
            if start >= 0:
                try:
                    return json.loads(out[start:])
                except ValueError:
                    pass
            # hermes 0.19.0 exits 0 with an empty stdout when it cannot open the board: say why.
            stderr = f"; stderr: {err.strip()[-800:]}" if err.strip() else ""
            raise HermesError(f"`hermes {' '.join(args)}` printed no JSON: {out[:300]!r}{stderr}") from None

    def _run(self, args: list[str], what: str) -> tuple[str, str]:
        argv = [str(self.path), *args]
        shown = "hermes " + " ".join(args)
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, env=self.env, timeout=self.timeout_s,
                stdin=subprocess.DEVNULL, check=False,
            )
        except subprocess.TimeoutExpired:
            raise HermesError(f"`{shown}` timed out after {self.timeout_s:g}s") from None
        except OSError as exc:
            raise HermesError(f"`{shown}` could not start: {exc}") from exc
        finally:
            self.calls.append(Call(what=what, seconds=time.perf_counter() - started))
        if proc.returncode != 0:
            stderr = proc.stderr.strip()[-800:] or proc.stdout.strip()[-800:]
            raise HermesError(f"`{shown}` exited {proc.returncode}: {stderr}")
        return proc.stdout, proc.stderr


def _count(value: Any) -> int:
    if isinstance(value, list):
        return len(value)
    return int(value) if isinstance(value, int) else 0
