"""The read-only SQLite board reader against real Hermes boards (and a board whose schema it does not know)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gateway_guard.dispatch.board import BoardReader, SchemaUnknown, crash_grace_s, pid_alive
from tests.dispatch.conftest import HermesBoard

PRIORITIES = [1, 5, 5, 0]


def test_schema_it_does_not_know_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "kanban.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE tasks (id TEXT PRIMARY KEY, status TEXT)")
        conn.execute("CREATE TABLE task_links (parent_id TEXT, child_id TEXT)")
    conn.close()
    with pytest.raises(SchemaUnknown, match="tasks lacks .*assignee"):
        BoardReader(db)
    with pytest.raises(SchemaUnknown, match="cannot open"):
        BoardReader(tmp_path / "missing" / "kanban.db")


def test_crash_grace_as_hermes_reads_it() -> None:
    assert crash_grace_s({}) == 30
    assert crash_grace_s({"HERMES_KANBAN_CRASH_GRACE_SECONDS": "0"}) == 0
    assert crash_grace_s({"HERMES_KANBAN_CRASH_GRACE_SECONDS": "-1"}) == 30
    assert crash_grace_s({"HERMES_KANBAN_CRASH_GRACE_SECONDS": "x"}) == 30


def test_pid_alive() -> None:
    import os
    import subprocess

    assert pid_alive(os.getpid())
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not pid_alive(proc.pid)  # reaped: gone
    assert not pid_alive(0)


@pytest.mark.hermes
def test_reads_a_real_board_and_notices_its_changes(board: HermesBoard) -> None:
    ids = board.create(["worker1", "worker2", "worker1", "worker2"], priorities=PRIORITIES)
    parent, child = ids[3], board.create(["worker1"])[0]
    board.cli("kanban", "link", parent, child)
    with BoardReader(board.db) as reader:
        state = reader.read()
        assert [c.task_id for c in state.ready][:1] in ([ids[1]], [ids[2]])  # priority 5 first
        assert {c.task_id for c in state.ready} == set(ids)  # the linked child went to todo
        assert state.promotable == 0 and state.running == () and state.spawnable == 4
        version = reader.data_version()
        assert reader.data_version() == version  # nothing changed
        board.cli("kanban", "dispatch", "--max", "1", "--json")
        assert reader.data_version() != version
        state = reader.read()
        assert len(state.running) == 1
        card = state.running[0]
        assert card.task_id in (ids[1], ids[2]) and card.worker_pid and card.alive
        board.crash(card.task_id)
        board.wait_until("the worker to exit", lambda: not pid_alive(card.worker_pid or 0))
        dead = reader.read().running[0]
        assert not dead.alive
        now = time.time()
        assert dead.reclaimable(now, 0) and not dead.reclaimable(float(dead.started_at or 0), 30)
        assert reader.read().next_reclaim_at(30) == (dead.started_at or 0) + 30
        board.release(*ids)
        board.cli("kanban", "complete", parent, "--result", "done by test")
        state = reader.read()
        # its parent is done: ready now (Hermes' complete promotes it), or promotable by the next pass
        assert child in {c.task_id for c in state.ready} or state.promotable == 1
