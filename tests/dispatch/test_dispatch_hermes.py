"""guard-dispatch against the real ``hermes`` CLI on real boards, with a real HTTP capacity server.

Workers are replaced through ``HERMES_BIN`` by a script that holds its card until the test releases it
(a file appears) and then runs ``hermes kanban complete``. A monitor thread samples the board's running
cards every 10 ms, so a brief overshoot between two ticks would be seen too.
"""

from __future__ import annotations

import fcntl
import functools
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway_guard.dispatch.cli import ExitCode, Options, run
from tests.dispatch.conftest import REPO, CapacityServer, HermesBoard, RunningMonitor

pytestmark = pytest.mark.hermes


def tick(
    board: HermesBoard, guard_url: str, *, sleep: Callable[[float], None] | None = None, **options: Any
) -> tuple[ExitCode, list[dict[str, Any]], str]:
    """Run guard-dispatch in-process (``run()``); returns the exit code, the JSON tick lines, all output."""
    out, err = io.StringIO(), io.StringIO()
    opts = Options(hermes=str(board.hermes), guard_url=guard_url, log_json=True, interval=0, **options)
    code = run(opts, env=board.env, out=out, err=err, sleep=sleep or (lambda _s: None))
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    return code, [line for line in lines if "tick" in line], out.getvalue() + err.getvalue()


def test_twelve_cards_target_three_never_more_than_three_running(
    board: HermesBoard, capacity_server: CapacityServer, monitor: RunningMonitor
) -> None:
    board.create(["worker1", "worker2"] * 6)
    capacity_server.report_free(3)
    after_tick: list[int] = []

    def between(_seconds: float) -> None:
        running = [task for task, _ in board.running()]
        after_tick.append(len(running))
        # Alternate: finish one card (the next tick must add exactly one), then all of them.
        chosen = running[:1] if len(after_tick) % 2 else running
        board.release(*chosen)
        board.wait_done(*chosen)

    code, lines, output = tick(board, capacity_server.url, target=3, ticks=7, sleep=between)

    assert code is ExitCode.OK, output
    assert board.counts() == {"done": 12}, output
    assert monitor.max_running == 3
    assert after_tick == [3, 3, 3, 3, 3, 3]
    assert [line["spawned"] for line in lines] == [3, 1, 3, 1, 3, 1, 0]
    for line in lines:
        assert line["running"] + line["asked"] <= 3
        assert line["asked"] == min(line["free"], 3 - line["running"])
        assert line["max_meaning"] == "running_cap"
        assert line["max"] == (line["running"] + line["asked"] if line["asked"] else 0)
    assert lines[-1]["stopped"] == "target"  # asked 3 but the queue was empty: Hermes spawned none
    stats = json.loads(board.cli("kanban", "stats", "--json"))
    assert stats["by_status"] == {"done": 12}


def test_one_free_slot_adds_at_most_one_card_per_tick(
    board: HermesBoard, capacity_server: CapacityServer, monitor: RunningMonitor
) -> None:
    board.create(["worker1", "worker2", "worker1", "worker2", "worker1"])
    capacity_server.report_free(1)
    running_after: list[int] = []

    code, lines, output = tick(board, capacity_server.url, target=6, ticks=3,
                               sleep=lambda _s: running_after.append(len(board.running())))

    assert code is ExitCode.OK, output
    assert [(line["asked"], line["spawned"], line["stopped"]) for line in lines] == [(1, 1, "guard_free")] * 3
    assert running_after == [1, 2]
    assert len(board.running()) == 3
    assert monitor.max_running == 3


def test_guard_down_dispatches_nothing_and_says_where(
    board: HermesBoard, refused_url: str, monitor: RunningMonitor
) -> None:
    board.create(["worker1", "worker2", "worker1"])

    code, lines, output = tick(board, refused_url, target=3)

    assert code is ExitCode.GUARD_UNAVAILABLE
    assert lines[0]["stopped"] == "guard_unavailable"
    assert f"{refused_url}/guard/capacity" in lines[0]["error"]
    assert board.counts() == {"ready": 3}
    assert monitor.max_running == 0
    assert not board.started_log.exists()


def test_guard_going_down_between_ticks_stops_dispatch(
    board: HermesBoard, capacity_server: CapacityServer
) -> None:
    board.create(["worker1", "worker2", "worker1", "worker2"])
    capacity_server.report_free(1)

    code, lines, _ = tick(board, capacity_server.url, target=4, ticks=2, sleep=lambda _s: capacity_server.close())

    assert code is ExitCode.GUARD_UNAVAILABLE
    assert [line["stopped"] for line in lines] == ["guard_free", "guard_unavailable"]
    assert len(board.running()) == 1


def test_two_ticks_at_once_one_runs_the_other_exits_cleanly(
    board: HermesBoard, capacity_server: CapacityServer, monitor: RunningMonitor
) -> None:
    board.create(["worker1", "worker2", "worker1", "worker2"])
    capacity_server.report_free(2)
    env = dict(board.env, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "gateway_guard.dispatch.cli", "--hermes", str(board.hermes),
            "--guard-url", capacity_server.url, "--target", "2"]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]

    assert [p.returncode for p in procs] == [0, 0], results
    outputs = [out + err for out, err in results]
    skipped = [o for o in outputs if "another guard-dispatch is running" in o]
    ran = [o for o in outputs if "tick=1/1" in o]
    assert len(skipped) == 1 and len(ran) == 1, outputs
    assert "spawned=2" in ran[0]
    assert "guard-dispatch.lock" in skipped[0]
    assert len(board.running()) == 2
    assert monitor.max_running == 2


def test_board_locked_by_another_dispatcher_is_reported_not_retried(
    board: HermesBoard, capacity_server: CapacityServer
) -> None:
    board.create(["worker1", "worker2"])
    lock_path = board.db.with_name("kanban.db.dispatch.lock")  # Hermes' own dispatch lock
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, lines, _ = tick(board, capacity_server.url, target=2)
    finally:
        os.close(fd)

    assert code is ExitCode.BOARD_LOCKED
    assert (lines[0]["stopped"], lines[0]["asked"], lines[0]["spawned"]) == ("board_locked", 0, None)
    assert str(lock_path) in lines[0]["error"]
    assert board.counts() == {"ready": 2}


def test_crashed_workers_are_reclaimed_before_counting_so_free_slots_still_bound_the_spawns(
    board: HermesBoard, capacity_server: CapacityServer, monitor: RunningMonitor
) -> None:
    board.env["HERMES_KANBAN_CRASH_GRACE_SECONDS"] = "0"
    board.create(["worker1", "worker2", "worker1", "worker2"], priorities=[4, 3, 2, 1])
    capacity_server.report_free(2)
    assert tick(board, capacity_server.url, target=2)[0] is ExitCode.OK
    dead = [task for task, _ in board.running()]
    assert len(dead) == 2
    board.crash(*dead)
    board.wait_until("both workers gone", lambda: not _alive_workers(board), timeout=15)
    capacity_server.report_free(1)

    code, lines, output = tick(board, capacity_server.url, target=3)

    # Two dead cards still count as running until a pass reclaims them; counting before that pass would
    # give --max 2 + 1 = 3 and Hermes, finding none running, would start 3 workers into 1 free slot.
    assert code is ExitCode.OK, output
    assert (lines[0]["crashed"], lines[0]["running"], lines[0]["asked"], lines[0]["spawned"]) == (2, 0, 1, 1)
    assert len(board.running()) == 1


def _alive_workers(board: HermesBoard) -> bool:
    proc = subprocess.run(["pgrep", "-f", str(board.worker)], capture_output=True, text=True, check=False)
    return bool(proc.stdout.strip())


def test_pools_hold_the_reasoning_profile_to_one_card(
    board: HermesBoard, capacity_server: CapacityServer, monitor: RunningMonitor, tmp_path: Path
) -> None:
    config = tmp_path / "dispatch.toml"
    config.write_text('target = 6\n[pools.reasoning]\nprofiles = ["worker1"]\nlimit = 1\n'
                      '[pools.lightweight]\nprofiles = ["worker2"]\nlimit = 3\n')
    # Claim order is priority first: w1, w2, w1, w2, w2.
    ids = board.create(["worker1", "worker2", "worker1", "worker2", "worker2"], priorities=[9, 8, 7, 6, 5])
    capacity_server.report_free(6)
    seen: list[set[str]] = []

    def between(_seconds: float) -> None:
        seen.append({task for task, _ in board.running()})
        if len(seen) == 2:
            board.release(ids[0])
            board.wait_done(ids[0])

    code, lines, output = tick(board, capacity_server.url, config=config, ticks=3, sleep=between)

    assert code is ExitCode.OK, output
    assert [(line["asked"], line["spawned"], line["stopped"]) for line in lines] == [
        (2, 2, "pool:reasoning(1/1)"),  # the second worker1 card waits, and the cards behind it with it
        (0, 0, "pool:reasoning(1/1)"),
        (3, 3, "queue_empty"),
    ]
    assert seen == [{ids[0], ids[1]}, {ids[0], ids[1]}]
    assert {task for task, _ in board.running()} == {ids[1], ids[2], ids[3], ids[4]}
    assert monitor.max_by_profile == {"worker1": 1, "worker2": 3}


def test_dry_run_follows_the_time_window_of_the_injected_clock_and_dispatches_nothing(
    board: HermesBoard, capacity_server: CapacityServer, tmp_path: Path
) -> None:
    config = tmp_path / "dispatch.toml"
    config.write_text('target = 2\ntimezone = "Europe/Berlin"\n'
                      '[[window]]\nname = "day"\nstart = "08:00"\nend = "20:00"\ntarget = 1\n'
                      '[[window]]\nname = "night"\nstart = "20:00"\nend = "08:00"\ntarget = 6\n')
    board.create(["worker1", "worker2", "worker1", "worker2"])
    capacity_server.report_free(3)
    seen = []
    for utc_hour in (10, 23):  # 11:00 and 00:00 in Berlin
        out = io.StringIO()
        code = run(Options(hermes=str(board.hermes), guard_url=capacity_server.url, config=config, dry_run=True,
                           log_json=True), env=board.env, out=out, err=out, clock=functools.partial(
                               datetime, 2026, 11, 23, utc_hour, 0, tzinfo=UTC))
        assert code is ExitCode.OK, out.getvalue()
        line = json.loads(out.getvalue().splitlines()[-1])
        seen.append((line["window"], line["target"], line["asked"], line["max"], line["spawned"], line["dry_run"]))

    assert seen == [("day", 1, 1, 1, None, True), ("night", 6, 3, 3, None, True)]
    assert board.counts() == {"ready": 4}


def test_status_with_the_guard_down_still_shows_the_board(board: HermesBoard, refused_url: str) -> None:
    board.create(["worker1"])

    code, _, output = tick(board, refused_url, target=2, command="status")

    assert code is ExitCode.GUARD_UNAVAILABLE
    assert f"{refused_url}  UNREACHABLE" in output
    assert any(line.split()[:4] == ["worker1", "-", "1", "0"] for line in output.splitlines()), output
    assert "a tick now would dispatch nothing (guard unreachable: fail closed)" in output


def test_status_shows_the_board_beside_the_guard(board: HermesBoard, capacity_server: CapacityServer) -> None:
    board.create(["worker1", "worker2", "worker1"], priorities=[3, 2, 1])
    capacity_server.report_free(2, {"worker1": 1})
    assert tick(board, capacity_server.url, target=2)[0] is ExitCode.OK  # starts worker1 (guard: 1 free) + worker2

    code, _, output = tick(board, capacity_server.url, target=2, command="status")

    assert code is ExitCode.OK, output
    rows = {line.split()[0]: line.split() for line in output.splitlines() if line.startswith(("worker", "total"))}
    assert rows["worker1"][1:] == ["-", "1", "1", "1"]  # pool, ready, running, guard free
    assert rows["worker2"][1:] == ["-", "0", "1", "-"]
    assert rows["total"][1:] == ["1", "2"]
    assert "free batch slots: 2" in output
    assert "a tick now would ask for 0 (stopped=at_target)" in output


def test_a_broken_board_is_a_hermes_failure_with_its_stderr(
    board: HermesBoard, capacity_server: CapacityServer
) -> None:
    for path in board.home.glob("kanban.db*"):
        path.unlink()
    board.db.write_text("this is not a database\n")

    code, lines, _ = tick(board, capacity_server.url, target=2)

    assert code is ExitCode.HERMES_FAILED
    assert lines[0]["stopped"] == "hermes_failed"
    assert "file is not a database" in lines[0]["error"]


def test_no_hermes_executable_names_what_was_tried(capacity_server: CapacityServer, tmp_path: Path) -> None:
    err = io.StringIO()
    code = run(Options(guard_url=capacity_server.url), env={"PATH": str(tmp_path)}, out=io.StringIO(), err=err)
    assert code is ExitCode.HERMES_NOT_FOUND
    assert f"'hermes' on PATH={tmp_path}" in err.getvalue()
