#!/usr/bin/env python3
"""How long a guard-dispatch tick takes, split into the guard call, each hermes CLI call, and the rest.

Sets up a real board in a temporary HERMES_HOME (the real ``hermes`` CLI; workers replaced through
HERMES_BIN by a script that holds its card until released), serves the guard's capacity JSON from a
small server on 127.0.0.1 (or reads a real guard with --guard-url), then:

  1. runs ticks in-process (the ``Ticker`` that ``guard-dispatch`` uses); between ticks one running card
     is finished, so every tick after the first counts the board and spawns one worker;
  2. runs the ``guard-dispatch`` process itself a few times (interpreter start and imports included).

"overhead" = wall time - guard call - hermes CLI calls: what the tool adds on top of Hermes' own time.

    .venv/bin/python benchmarks/dispatch_tick.py [--hermes .venv-hermes/bin/hermes] [--ticks 6] [--pools]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway_guard.dispatch.capacity import CapacityClient  # noqa: E402
from gateway_guard.dispatch.decide import Policy, Pool  # noqa: E402
from gateway_guard.dispatch.hermes import Hermes  # noqa: E402
from gateway_guard.dispatch.tick import Ticker  # noqa: E402
from gateway_guard.dispatch.windows import Schedule  # noqa: E402

WORKER = """#!/bin/sh
while [ ! -e "{release}/$HERMES_KANBAN_TASK" ] && [ ! -e "{release}/ALL" ]; do sleep 0.02; done
exec "{hermes}" kanban complete "$HERMES_KANBAN_TASK"
"""


def serve_capacity(free: int) -> tuple[ThreadingHTTPServer, str]:
    body = json.dumps(
        {
            "free": free,
            "lanes": {"batch": {"limit": free, "in_flight": 0, "queued": 0, "free": free}},
            "upstreams": {
                "default": {"limit": free, "in_flight": 0, "queued": 0, "free": free, "lanes": {}, "profiles": {}}
            },
        }
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def sh(hermes: Path, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([str(hermes), *args], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"hermes {' '.join(args)} failed: {proc.stderr[-1000:]}")
    return proc.stdout


def running_ids(db: Path) -> list[str]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        rows = conn.execute("SELECT id FROM tasks WHERE status = 'running' ORDER BY started_at, id").fetchall()
    finally:
        conn.close()
    return [str(r[0]) for r in rows]


def finish_one(db: Path, release: Path) -> None:
    ids = running_ids(db)
    if not ids:
        return
    (release / ids[0]).touch()
    deadline = time.monotonic() + 30
    while ids[0] in running_ids(db) and time.monotonic() < deadline:
        time.sleep(0.02)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hermes", type=Path, default=REPO / ".venv-hermes" / "bin" / "hermes")
    parser.add_argument("--ticks", type=int, default=6)
    parser.add_argument("--cards", type=int, default=12)
    parser.add_argument("--target", type=int, default=3)
    parser.add_argument("--processes", type=int, default=3, help="guard-dispatch process runs to time")
    parser.add_argument("--pools", action="store_true", help="configure pools (adds `list --status ready`)")
    parser.add_argument("--guard-url", help="read a running guard instead of the built-in capacity server")
    args = parser.parse_args()
    hermes_bin = args.hermes.absolute()
    if not os.access(hermes_bin, os.X_OK):
        raise SystemExit(f"no hermes at {hermes_bin} (pass --hermes)")

    root = Path(tempfile.mkdtemp(prefix="dispatch-bench-"))
    home, release = root / "home", root / "release"
    home.mkdir()
    release.mkdir()
    worker = root / "worker.sh"
    worker.write_text(WORKER.format(release=release, hermes=hermes_bin))
    worker.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    env.update(HERMES_HOME=str(home), HERMES_DISABLE_LAZY_INSTALLS="1", HERMES_BIN=str(worker))
    httpd = None
    try:
        sh(hermes_bin, env, "kanban", "init")
        sh(hermes_bin, env, "config", "set", "kanban.dispatch_in_gateway", "false")
        for profile in ("worker1", "worker2"):
            sh(hermes_bin, env, "profile", "create", profile, "--no-alias", "--no-skills")
        with ThreadPoolExecutor(4) as pool:
            list(
                pool.map(
                    lambda i: sh(hermes_bin, env, "kanban", "create", f"card {i}", "--assignee", f"worker{i % 2 + 1}"),
                    range(args.cards),
                )
            )
        if args.guard_url:
            guard_url = args.guard_url
        else:
            httpd, guard_url = serve_capacity(args.target)
        pools = (
            (
                Pool(name="a", profiles=frozenset({"worker1"}), limit=args.target),
                Pool(name="b", profiles=frozenset({"worker2"}), limit=args.target),
            )
            if args.pools
            else ()
        )
        policy = Policy(schedule=Schedule(default_target=args.target), pools=pools)
        hermes = Hermes(hermes_bin, env=env)
        version = hermes.version()
        board = hermes.board()
        print(
            f"hermes {version.label} ({hermes_bin}), --max meaning {version.meaning}; guard {guard_url}; "
            f"{args.cards} cards, target {args.target}{', pools' if args.pools else ''}"
        )
        print(f"host: {os.cpu_count()} CPUs, python {sys.version.split()[0]}\n")
        print("in-process ticks (ms)")
        print(f"{'tick':>4} {'total':>7} {'guard':>7} {'hermes':>7} {'overhead':>8}  spawned  hermes calls")
        overheads, totals, guards, hermes_times = [], [], [], []
        with CapacityClient(guard_url) as capacity:
            ticker = Ticker(
                hermes=hermes,
                board=board,
                meaning=version.meaning,
                capacity=capacity,
                policy=policy,
                clock=lambda: datetime.now(UTC),
            )
            for n in range(1, args.ticks + 1):
                first = len(hermes.calls)
                report = ticker.tick(f"{n}/{args.ticks}")
                if report.failure is not None:
                    raise SystemExit(f"tick failed: {report.error}")
                overhead = report.total_s - report.guard_s - report.hermes_s
                calls = ", ".join(f"{c.what} {c.seconds * 1000:.0f}" for c in hermes.calls[first:])
                print(
                    f"{n:>4} {ms(report.total_s)} {ms(report.guard_s)} {ms(report.hermes_s)} {ms(overhead)}"
                    f"  {report.spawned!s:>7}  {calls}"
                )
                overheads.append(overhead)
                totals.append(report.total_s)
                guards.append(report.guard_s)
                hermes_times.append(report.hermes_s)
                finish_one(board.db_path, release)
        print(
            f"\nmedian: total {ms(statistics.median(totals))}  guard {ms(statistics.median(guards))}  "
            f"hermes {ms(statistics.median(hermes_times))}  overhead {ms(statistics.median(overheads))}  "
            f"(max overhead {ms(max(overheads))})"
        )

        print("\nguard-dispatch process, one tick (ms): wall = interpreter + imports + hermes + guard + rest")
        cmd = [
            sys.executable,
            "-m",
            "gateway_guard.dispatch.cli",
            "--hermes",
            str(hermes_bin),
            "--guard-url",
            guard_url,
            "--target",
            str(args.target),
            "--log-json",
        ]
        penv = dict(env, PYTHONPATH=str(REPO))
        for _ in range(args.processes):
            started = time.perf_counter()
            proc = subprocess.run(cmd, env=penv, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - started
            lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            start = next(line for line in lines if line.get("event") == "start")
            tick = next(line for line in lines if "tick" in line)
            hermes_ms = start["startup_hermes_ms"] + tick["hermes_ms"]
            rest = wall * 1000 - hermes_ms - tick["guard_ms"]
            print(
                f"  rc {proc.returncode}  wall {wall * 1000:7.1f}  hermes {hermes_ms:7.1f} "
                f"(version+boards {start['startup_hermes_ms']:.0f}, tick {tick['hermes_ms']:.0f})  "
                f"guard {tick['guard_ms']:5.1f}  overhead {rest:6.1f}  spawned {tick['spawned']}"
            )
            finish_one(board.db_path, release)
    finally:
        (release / "ALL").touch()
        deadline = time.monotonic() + 20
        db = home / "kanban.db"
        while db.exists() and running_ids(db) and time.monotonic() < deadline:
            time.sleep(0.05)
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
