"""The read-only SQLite board reader against real Hermes boards (and a board whose schema it does not know)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gateway_guard.dispatch.board import STARTING_MAX_S, BoardReader, SchemaUnknown, crash_grace_s, pid_alive
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


@pytest.mark.hermes
def test_a_card_counts_as_starting_until_its_worker_first_heartbeats(board: HermesBoard) -> None:
    """Hermes 0.19.0 workers heartbeat on their first activity, just before their first LLM request; the
    stand-in workers never do, so the test gives the heartbeat by hand with ``hermes kanban heartbeat``."""
    board.create(["worker1", "worker2"])
    with BoardReader(board.db) as reader:
        assert reader.heartbeats  # Hermes 0.19.0's task_runs carry them
        board.cli("kanban", "dispatch", "--max", "2", "--json")
        state = reader.read()
        assert len(state.running) == 2 and state.starting == 2
        first = state.running[0].task_id
        version = reader.data_version()
        board.cli("kanban", "heartbeat", first)
        assert reader.data_version() != version  # a heartbeat wakes guard-dispatch run
        state = reader.read()
        assert state.starting == 1
        assert [c.task_id for c in state.running if not c.starting] == [first]
        later = BoardReader(board.db, clock=lambda: time.time() + STARTING_MAX_S + 1)
        try:  # a worker silent for a minute after its claim is no longer counted as about to ask
            assert later.read().starting == 0
        finally:
            later.close()
        board.release_all()


def test_without_heartbeat_columns_no_card_counts_as_starting(tmp_path: Path) -> None:
    db = tmp_path / "kanban.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE tasks (id TEXT PRIMARY KEY, assignee TEXT, status TEXT, priority INTEGER, "
                     "created_at INTEGER, started_at INTEGER, worker_pid INTEGER, claim_lock TEXT, "
                     "claim_expires INTEGER, max_runtime_seconds INTEGER)")
        conn.execute("CREATE TABLE task_links (parent_id TEXT, child_id TEXT)")
        conn.execute("INSERT INTO tasks VALUES ('t1', 'w', 'running', 0, 0, ?, NULL, NULL, NULL, NULL)",
                     (int(time.time()),))
    conn.close()
    with BoardReader(db) as reader:
        assert not reader.heartbeats
        state = reader.read()
        assert len(state.running) == 1 and state.starting == 0
