"""Fixtures for guard-dispatch: a real HTTP capacity server on 127.0.0.1 and real Hermes boards.

The capacity server speaks the guard's agreed ``GET /guard/capacity`` JSON; tests set how many slots
it reports. Boards are real ``hermes kanban`` boards in a temporary ``HERMES_HOME`` whose workers are
replaced (``HERMES_BIN``) by a script that holds its card until the test releases it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_HERMES = REPO / ".venv-hermes" / "bin" / "hermes"

CAPACITY_EXAMPLE: dict[str, Any] = {
    "free": 3,
    "lanes": {
        "batch": {"limit": 3, "in_flight": 1, "queued": 0, "free": 2},
        "interactive": {"limit": 4, "in_flight": 0, "queued": 0, "free": 4},
    },
    "upstreams": {
        "default": {
            "limit": 4, "in_flight": 1, "queued": 0, "free": 3,
            "lanes": {
                "batch": {"limit": 3, "in_flight": 1, "queued": 0, "free": 2},
                "interactive": {"limit": 4, "in_flight": 0, "queued": 0, "free": 3},
            },
            "profiles": {"worker1": {"limit": 2, "in_flight": 1, "queued": 0, "free": 1}},
        }
    },
}


class CapacityServer:
    """A tiny real HTTP server answering ``GET /guard/capacity`` with whatever the test set."""

    def __init__(self) -> None:
        self.body: Any = copy.deepcopy(CAPACITY_EXAMPLE)
        self.status = 200
        self.raw: bytes | None = None
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                if self.path != "/guard/capacity":
                    self.send_error(404)
                    return
                payload = server.raw if server.raw is not None else json.dumps(server.body).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        self._closed = False

    def report_free(self, free: int, profiles: dict[str, int] | None = None) -> None:
        """Report ``free`` batch slots (and per-profile free slots, if given; none limited otherwise)."""
        up = self.body["upstreams"]["default"]
        self.body["free"] = free
        self.body["lanes"]["batch"]["free"] = free
        up["lanes"]["batch"]["free"] = free
        up["profiles"] = {
            name: {"limit": n, "in_flight": 0, "queued": 0, "free": n} for name, n in (profiles or {}).items()
        }

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._httpd.shutdown()
            self._httpd.server_close()


@pytest.fixture
def capacity_server() -> Iterator[CapacityServer]:
    server = CapacityServer()
    yield server
    server.close()


@pytest.fixture
def refused_url() -> str:
    """A 127.0.0.1 URL where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def guard_process(args: list[str], log: Path, *, port: int) -> Iterator[str]:
    """The real guard (``gateway-guard ARGS --port PORT``) as its own process; yields its base URL.

    Its stderr (the access log) goes to ``log``. Waits until ``/guard/capacity`` answers; stops it by PID.
    """
    from gateway_guard.dispatch.capacity import CapacityClient, CapacityUnavailable

    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from gateway_guard.cli import main; main()", *args, "--port", str(port)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=log_file,
            env={k: v for k, v in os.environ.items() if not k.startswith("GUARD")},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            with CapacityClient(url, timeout_s=0.5) as client:
                while True:
                    try:
                        client.fetch()
                        break
                    except CapacityUnavailable:
                        if proc.poll() is not None or time.monotonic() > deadline:
                            pytest.fail(f"the guard did not start on {url}: {log.read_text()[-2000:]}")
                        time.sleep(0.05)  # polling a foreign process: there is no event to wait on
            yield url
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------------------------------------- hermes


@pytest.fixture(scope="session")
def hermes_bin() -> Path:
    path = Path(os.environ.get("GUARD_TEST_HERMES") or DEFAULT_HERMES)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.skip(f"hermes CLI not found at {path} (set GUARD_TEST_HERMES or run ./run-tests to install it)")
    return path


PROFILES = ("worker1", "worker2")

WORKER = """#!/bin/sh
# Stands in for a Hermes worker: holds its card until the test releases it, then completes it.
task="$HERMES_KANBAN_TASK"
echo "$task $HERMES_PROFILE" >> "{started}"
i=0
while [ ! -e "{release}/$task" ] && [ ! -e "{release}/ALL" ]; do
  if [ -e "{release}/$task.die" ]; then rm -f "{release}/$task.die"; exit 1; fi  # crash (once)
  i=$((i + 1))
  if [ "$i" -gt 6000 ]; then echo "never released: $task" >&2; exit 3; fi
  sleep 0.02
done
exec "{hermes}" kanban complete "$task" --result "released by test"
"""


def hermes_env(home: Path, worker: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERMES_", "GUARD_"))}
    env.update(HERMES_HOME=str(home), HERMES_DISABLE_LAZY_INSTALLS="1")
    if worker is not None:
        env["HERMES_BIN"] = str(worker)
    return env


def run_hermes(hermes: Path, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([str(hermes), *args], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"hermes {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="session")
def hermes_template(hermes_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HERMES_HOME with an empty board, the embedded dispatcher off, and profiles made by the CLI."""
    home = tmp_path_factory.mktemp("hermes-template") / "home"
    home.mkdir()
    env = hermes_env(home)
    run_hermes(hermes_bin, env, "kanban", "init")
    run_hermes(hermes_bin, env, "config", "set", "kanban.dispatch_in_gateway", "false")
    with ThreadPoolExecutor(len(PROFILES)) as pool:
        list(pool.map(lambda p: run_hermes(hermes_bin, env, "profile", "create", p, "--no-alias", "--no-skills"),
                      PROFILES))
    return home


class HermesBoard:
    """A real board in its own HERMES_HOME, observed directly through its SQLite file (read only)."""

    def __init__(self, hermes: Path, root: Path, template: Path) -> None:
        self.hermes = hermes
        self.home = root / "home"
        shutil.copytree(template, self.home)
        self.release_dir = root / "release"
        self.release_dir.mkdir()
        self.started_log = root / "started.log"
        self.worker = root / "worker.sh"
        self.worker.write_text(WORKER.format(started=self.started_log, release=self.release_dir, hermes=hermes))
        self.worker.chmod(0o755)
        self.env = hermes_env(self.home, self.worker)
        self.db = self.home / "kanban.db"
        self._conn: sqlite3.Connection | None = None
        self._conn_lock = threading.Lock()
        self._query("SELECT 1 FROM tasks LIMIT 1")  # open (and lock) before any hermes call writes

    def cli(self, *args: str) -> str:
        return run_hermes(self.hermes, self.env, *args)

    def create(self, assignees: list[str], *, priorities: list[int] | None = None) -> list[str]:
        """Create ready cards (4 CLI calls at a time); returns their ids in the order given."""
        prios = priorities or [0] * len(assignees)

        def one(i: int) -> str:
            out = self.cli("kanban", "create", f"card {i}", "--assignee", assignees[i], "--priority",
                           str(prios[i]), "--json")
            return str(json.loads(out)["id"])

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(one, range(len(assignees))))

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        # One connection for the whole test, closed only after every worker is done. Hermes 0.19.0 drops
        # its own POSIX locks on kanban.db after each commit (a plain open()/close() of the file in
        # _check_file_length_invariant), so a reader that closes its connection meanwhile may think it
        # is the last one, checkpoint and delete the WAL, and the dispatcher's later writes are lost
        # (claimed cards fall back to 'ready' while their workers run). A connection held open keeps
        # the shared lock that stops any closer from deleting the WAL. See docs/dispatch.md.
        with self._conn_lock:
            if self._conn is None:
                self._conn = sqlite3.connect(self.db, timeout=30, check_same_thread=False)
            return self._conn.execute(sql).fetchall()

    def close(self) -> None:
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def counts(self) -> dict[str, int]:
        return {s: n for s, n in self._query("SELECT status, COUNT(*) FROM tasks GROUP BY status")}

    def running(self) -> list[tuple[str, str]]:
        rows = self._query("SELECT id, assignee FROM tasks WHERE status = 'running' ORDER BY started_at, id")
        return [(str(i), str(a)) for i, a in rows]

    def release(self, *task_ids: str) -> None:
        for task_id in task_ids:
            (self.release_dir / task_id).touch()

    def crash(self, *task_ids: str) -> None:
        """Make these cards' workers exit without completing them (Hermes sees a crash on its next pass)."""
        for task_id in task_ids:
            (self.release_dir / f"{task_id}.die").touch()

    def release_all(self) -> None:
        (self.release_dir / "ALL").touch()

    def wait_until(self, what: str, predicate: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; board: {self.counts()}")
            time.sleep(0.05)

    def wait_done(self, *task_ids: str, timeout: float = 30.0) -> None:
        ids = ",".join(f"'{t}'" for t in task_ids)
        self.wait_until(
            f"{task_ids} done",
            lambda: self._query(f"SELECT COUNT(*) FROM tasks WHERE id IN ({ids}) AND status = 'done'")[0][0]
            == len(task_ids),
            timeout,
        )


class RunningMonitor:
    """Samples the board's running cards every 10 ms in a thread; keeps the maxima it saw."""

    def __init__(self, board: HermesBoard) -> None:
        self.board = board
        self.max_running = 0
        self.max_by_profile: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                running = self.board.running()
            except sqlite3.OperationalError:
                continue
            self.samples += 1
            self.max_running = max(self.max_running, len(running))
            per: dict[str, int] = {}
            for _, who in running:
                per[who] = per.get(who, 0) + 1
            for who, n in per.items():
                self.max_by_profile[who] = max(self.max_by_profile.get(who, 0), n)
            self._stop.wait(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def board(hermes_bin: Path, hermes_template: Path, tmp_path: Path) -> Iterator[HermesBoard]:
    b = HermesBoard(hermes_bin, tmp_path, hermes_template)
    yield b
    b.release_all()  # let every worker still holding a card finish instead of lingering
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if not b.running():
                break
        except sqlite3.DatabaseError:  # a test broke the board on purpose
            break
        time.sleep(0.05)
    b.close()


@pytest.fixture
def monitor(board: HermesBoard) -> Iterator[RunningMonitor]:
    m = RunningMonitor(board)
    yield m
    m.stop()
