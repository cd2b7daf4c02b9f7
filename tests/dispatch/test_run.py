"""``guard-dispatch run`` against the real hermes CLI, real boards and the real guard (its own process).

Workers are the test's stand-in script (``HERMES_BIN``): each holds its card until the test releases it,
so the test decides when a card finishes and reads from the board's own timestamps when the next started.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gateway_guard.dispatch import lock
from gateway_guard.dispatch.board import pid_alive
from gateway_guard.dispatch.cli import ExitCode, Options, run
from tests.dispatch.conftest import REPO, CapacityServer, HermesBoard, RunningMonitor, free_port, guard_process

pytestmark = pytest.mark.hermes
pytest.importorskip("gateway_guard.app.events", reason="the guard's event stream is not in this tree")

TOKEN = "dispatch-admin-token"
GUARD_CONFIG = """
[server]
host = "127.0.0.1"
default_lane = "batch"
admin_token = "{token}"

[lanes.batch]
headroom = 0

[upstreams.llm]
url = "{upstream}"
max_inflight = {slots}
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """An upstream that is up (the guard reports no free slot for one that is down); the stand-in workers
    never call it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@contextlib.contextmanager
def real_guard(tmp_path: Path, upstream: str, slots: int, port: int | None = None) -> Iterator[str]:
    config = tmp_path / "guard.toml"
    config.write_text(GUARD_CONFIG.format(token=TOKEN, slots=slots, upstream=upstream))
    with guard_process(["--config", str(config)], tmp_path / "guard.log", port=port or free_port()) as url:
        yield url


class Background:
    """``run()`` of guard-dispatch run in a thread until ``stop()``; its JSON log lines as they come."""

    def __init__(self, board: HermesBoard, guard_url: str, **options: Any) -> None:
        self.out = io.StringIO()
        self._stop = threading.Event()
        env = dict(board.env, GUARD_ADMIN_TOKEN=TOKEN)
        opts = Options(command="run", hermes=str(board.hermes), guard_url=guard_url, log_json=True, **options)
        self.code: ExitCode | None = None

        def target() -> None:
            self.code = run(opts, env=env, out=self.out, err=self.out, until=self._stop.is_set)

        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def lines(self, event: str | None = None) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in self.out.getvalue().splitlines() if line.startswith("{")]
        return [p for p in parsed if event is None or p.get("event") == event]

    def stop(self) -> ExitCode | None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), self.out.getvalue()
        return self.code


def wait(what: str, predicate: Callable[[], bool], timeout: float = 60.0, board: HermesBoard | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" +
                                 (f"; board {board.counts()}" if board else ""))
        time.sleep(0.05)


def times(board: HermesBoard) -> dict[str, tuple[int | None, int | None]]:
    rows = board._query("SELECT id, started_at, completed_at FROM tasks")
    return {str(i): (s, c) for i, s, c in rows}


def test_run_keeps_the_target_and_refills_a_finished_card_at_once(
    board: HermesBoard, monitor: RunningMonitor, tmp_path: Path, upstream: str
) -> None:
    ids = board.create(["worker1", "worker2"] * 2, priorities=[4, 3, 2, 1])
    with real_guard(tmp_path, upstream, slots=4) as url:
        bg = Background(board, url, target=2)
        try:
            wait("2 spawned", lambda: sum(int(d["spawned"]) for d in bg.lines("dispatch")) == 2, board=board)
            first = [task for task, _ in board.running()]
            idle_calls = len(bg.lines("dispatch"))
            time.sleep(1.5)  # nothing changes: no hermes call may happen meanwhile
            assert len(bg.lines("dispatch")) == idle_calls
            refills = []
            for task in first:
                board.release(task)
                board.wait_done(task)
                wait("a refill", lambda: len(board.running()) == 2, board=board)
                done_at = times(board)[task][1]
                newest = max((times(board)[t][0] or 0) for t, _ in board.running())
                refills.append(newest - (done_at or 0))
            board.release_all()
            board.wait_done(*ids, timeout=90)
        finally:
            code = bg.stop()
    assert code is ExitCode.OK
    assert monitor.max_running == 2
    print(f"refill latencies by the board's timestamps (s): {refills}")
    assert all(r <= 2 for r in refills), (refills, bg.out.getvalue())  # the next card started within 2 s
    dispatches = bg.lines("dispatch")
    assert sum(int(d["spawned"]) for d in dispatches) == 4
    assert len(dispatches) <= 4  # one hermes call per dispatch, none while idle
    assert all(int(d["running"]) + int(d["asked"]) <= 2 for d in dispatches)
    start = bg.lines("start")[0]
    assert start["board_read"] == "sqlite" and start["reserve"] == "on"
    assert bg.lines("stop")[0]["hermes_calls"] == len(dispatches)


def test_nothing_is_dispatched_while_the_guard_is_down(
    board: HermesBoard, capacity_server: CapacityServer
) -> None:
    """The capacity server has no /guard/events (404): guard-dispatch polls /guard/capacity instead."""
    capacity_server.report_free(3)
    ids = board.create(["worker1", "worker2", "worker1"])
    bg = Background(board, capacity_server.url, target=2)
    try:
        wait("2 running", lambda: len(board.running()) == 2, board=board)
        capacity_server.status = 503
        wait("the guard seen down", lambda: bool(bg.lines("guard_down")), timeout=30)
        running = [t for t, _ in board.running()]
        board.release(*running)
        board.wait_done(*running)
        time.sleep(2.0)  # a card finished and the target has room: still nothing may start
        assert board.running() == [], bg.out.getvalue()
        assert sum(int(d["spawned"]) for d in bg.lines("dispatch")) == 2
        capacity_server.status = 200
        wait("the last card started", lambda: len(board.running()) == 1, board=board)
        board.release_all()
        board.wait_done(*ids)
    finally:
        bg.stop()
    assert bg.lines("guard_up") and bg.lines("guard_down")


def test_the_guard_stopping_stops_dispatch_until_it_is_back(board: HermesBoard, tmp_path: Path, upstream: str) -> None:
    """The real guard, watched through its event stream: stopped (SIGTERM), then started again."""
    ids = board.create(["worker1", "worker2", "worker1"])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with real_guard(tmp_path, upstream, slots=4, port=port):
        bg = Background(board, url, target=2)
        try:
            wait("2 spawned", lambda: sum(int(d["spawned"]) for d in bg.lines("dispatch")) == 2, board=board)
        except BaseException:
            bg.stop()
            raise
    try:
        wait("the guard seen down", lambda: bool(bg.lines("guard_down")), timeout=30)
        running = [t for t, _ in board.running()]
        board.release(*running)
        board.wait_done(*running)
        time.sleep(2.0)  # a card finished and the target has room: nothing may start while the guard is away
        assert board.running() == [], bg.out.getvalue()
        with real_guard(tmp_path, upstream, slots=4, port=port):
            wait("the last card started", lambda: len(board.running()) == 1, board=board)
        board.release_all()
        board.wait_done(*ids)
    finally:
        bg.stop()
    assert [line["mode"] for line in bg.lines("guard_up")] == ["events", "events"]


def test_auto_counts_starting_workers_as_demand_and_keeps_a_short_queue(
    board: HermesBoard, monitor: RunningMonitor, capacity_server: CapacityServer
) -> None:
    """2 batch slots, --queue-per-slot 2, --max-running 8. The stand-in workers never ask for a slot, so they stay
    "starting" (no heartbeat) until the test heartbeats them by hand (``hermes kanban heartbeat``, as a Hermes
    worker does on its first activity), and the test sets what the guard reports. Cold (nothing served): the
    two free slots only. Serving with nothing queued: four more (two waiting per slot), then nothing while they
    start; each heartbeat turns a starting card into current demand and lets one more start, up to 8."""

    def report(in_flight: int) -> None:
        free = 2 - in_flight
        capacity_server.report_free(free)
        capacity_server.body["lanes"]["batch"].update(limit=2, in_flight=in_flight, queued=0, free=free)

    def heartbeat(*tasks: str) -> None:
        for task in tasks:
            board.cli("kanban", "heartbeat", task)

    report(0)
    ids = board.create(["worker1", "worker2"] * 5)
    bg = Background(board, capacity_server.url, target="auto", max_running=8, queue_per_slot=2)
    try:
        wait("2 spawned", lambda: sum(int(d["spawned"]) for d in bg.lines("dispatch")) == 2, board=board)
        time.sleep(1.5)  # the two are starting and nothing is served: no queue is aimed at yet
        assert len(board.running()) == 2, bg.out.getvalue()
        cold = [task for task, _ in board.running()]
        report(2)  # the two asked and are served
        heartbeat(*cold)
        wait("6 running", lambda: len(board.running()) == 6, board=board)
        time.sleep(1.5)  # four starting cards are the queue to come: nothing more
        assert len(board.running()) == 6, bg.out.getvalue()
        queue = [task for task, _ in board.running() if task not in cold]
        heartbeat(*queue[:2])
        wait("8 running", lambda: len(board.running()) == 8, board=board)
        heartbeat(*queue[2:])
        time.sleep(1.5)  # nobody starting, nothing queued, but max_running is reached
        assert len(board.running()) == 8, bg.out.getvalue()
        board.release_all()
        board.wait_done(*ids, timeout=90)
    finally:
        code = bg.stop()
    assert code is ExitCode.OK
    assert monitor.max_running == 8
    dispatches = bg.lines("dispatch")
    assert sum(int(d["spawned"]) for d in dispatches) == 10
    assert all(int(d["running"]) + int(d["asked"]) <= 8 for d in dispatches)
    assert dispatches[0]["asked"] == 2 and dispatches[0]["starting"] == 0, dispatches
    assert bg.lines("start")[0]["target"] == "auto(max_running=8,queue_per_slot=2)"


def test_a_dead_worker_is_reclaimed_once_its_grace_is_over(
    board: HermesBoard, capacity_server: CapacityServer
) -> None:
    capacity_server.report_free(3)
    board.env["HERMES_KANBAN_CRASH_GRACE_SECONDS"] = "2"
    (task,) = board.create(["worker1"])
    bg = Background(board, capacity_server.url, target=1)
    try:
        wait("the card running", lambda: sum(int(d["spawned"]) for d in bg.lines("dispatch")) == 1, board=board)
        board.crash(task)
        wait("the reclaim and respawn", lambda: any(d.get("crashed") for d in bg.lines("dispatch")), board=board)
        wait("the second run", lambda: len(board.running()) == 1, board=board)
        board.release_all()
        board.wait_done(task)
    finally:
        bg.stop()
    dispatches = bg.lines("dispatch")
    assert len(dispatches) == 2, bg.out.getvalue()  # the spawn, then one pass that reclaimed and started it again
    assert dispatches[1]["crashed"] == 1 and dispatches[1]["spawned"] == 1 and dispatches[1]["running"] == 0


def test_two_boards_sharing_one_guard_never_overbook(
    board: HermesBoard, hermes_bin: Path, hermes_template: Path, tmp_path: Path, upstream: str
) -> None:
    """Each dispatcher alone would fill all 3 slots; the reservations keep the two together at 3. Two processes,
    as in production (two threads each running asyncio.run in one CPython 3.11 process mixed up their running
    loops in CI runs)."""
    other = HermesBoard(hermes_bin, tmp_path / "other", hermes_template)
    total = {"max": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                total["max"] = max(total["max"], len(board.running()) + len(other.running()))
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        board.create(["worker1", "worker2"] * 2)
        other.create(["worker1", "worker2"] * 2)
        with real_guard(tmp_path, upstream, slots=3) as url:
            try:
                for b, log in zip((board, other), logs, strict=True):
                    with log.open("w") as out:
                        procs.append(
                            subprocess.Popen(
                                [sys.executable, "-m", "gateway_guard.dispatch.cli", "run", "--hermes",
                                 str(b.hermes), "--guard-url", url, "--target", "auto", "--max-running", "4",
                                 "--log-json"],
                                cwd=REPO, env=dict(b.env, GUARD_ADMIN_TOKEN=TOKEN), stdout=out,
                                stderr=subprocess.STDOUT,
                            )
                        )
                wait("3 running over both boards", lambda: len(board.running()) + len(other.running()) >= 3)
                time.sleep(3.0)  # both keep watching: neither may start a fourth
            finally:
                for proc in procs:
                    proc.send_signal(signal.SIGTERM)
                for proc in procs:
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    finally:
        stop.set()
        sampler.join(5)
        other.release_all()
        board.release_all()
        wait("both boards idle", lambda: not board.running() and not other.running())
        other.close()
    assert total["max"] == 3, [log.read_text()[-2000:] for log in logs]
    dispatches = [
        line for log in logs for raw in log.read_text().splitlines() if raw.startswith("{")
        if (line := json.loads(raw)).get("event") == "dispatch"
    ]
    assert dispatches and all(d.get("reserved", 0) == d["spawned"] for d in dispatches), dispatches


def test_sigterm_stops_at_once_and_leaves_no_orphan_and_no_lock(
    board: HermesBoard, tmp_path: Path, upstream: str
) -> None:
    ids = board.create(["worker1", "worker2", "worker1"])
    with real_guard(tmp_path, upstream, slots=4) as url:
        log = tmp_path / "dispatch.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway_guard.dispatch.cli", "run", "--hermes", str(board.hermes),
                 "--guard-url", url, "--target", "2", "--log-json"],
                cwd=REPO, env=dict(board.env, GUARD_ADMIN_TOKEN=TOKEN), stdout=out, stderr=subprocess.STDOUT,
            )
            try:
                wait("2 running", lambda: len(board.running()) == 2, board=board)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=30) == 0, log.read_text()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    lock_path = board.db.with_name(board.db.name + ".guard-dispatch.lock")
    assert not lock.is_held(lock_path) and not lock.is_held(board.db.with_name(board.db.name + ".dispatch.lock"))
    running = board._query("SELECT id, worker_pid FROM tasks WHERE status = 'running'")
    assert len(running) == 2 and all(pid and pid_alive(int(pid)) for _, pid in running)  # each card has its worker
    assert '"event":"stop"' in log.read_text()
    board.release_all()
    board.wait_done(*[str(t) for t, _ in running])
    assert board.counts().get("ready") == len(ids) - 2  # nothing started after the stop


def test_a_board_schema_it_does_not_know_is_read_through_the_cli(
    board: HermesBoard, capacity_server: CapacityServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway_guard.dispatch import cli
    from gateway_guard.dispatch.board import SchemaUnknown

    def unknown(db: Path) -> None:
        raise SchemaUnknown(f"{db}: table tasks lacks worker_pid (test)")

    monkeypatch.setattr(cli, "BoardReader", unknown)
    capacity_server.report_free(3)
    ids = board.create(["worker1", "worker2"])
    bg = Background(board, capacity_server.url, target=1)
    try:
        wait("one card started", lambda: len(board.running()) == 1, board=board)
        board.release_all()
        board.wait_done(*ids)
    finally:
        bg.stop()
    start = bg.lines("start")[0]
    assert start["board_read"] == "cli" and "lacks worker_pid" in start["board_read_error"]
    assert sum(int(d["spawned"]) for d in bg.lines("dispatch")) == 2
