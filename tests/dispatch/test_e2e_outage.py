"""End to end through an upstream restart: real Hermes workers -> the real guard -> the scripted sim, and the sim
killed (SIGKILL) and started again on the same port while cards run.

What must hold (issue 14): every card done, every worker run recorded ``done`` in the board's ``task_runs``
(none crashed, failed or timed out: a refused or broken worker run counts against its card), no card blocked.
The guard holds the batch lane while the sim is down; requests that never reached it, or were lost with it
before their client saw a byte, wait and go again when it is back.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_guard.dispatch.cli import ExitCode, Options, run
from tests.dispatch.conftest import HermesBoard, RunningMonitor
from tests.support.outage import guard_with_config, restartable_sim, write_guard_config

pytestmark = [pytest.mark.slow, pytest.mark.hermes]

PROFILES = {"worker1": "sk-outage-worker1", "worker2": "sk-outage-worker2"}
CARDS = 4
OUTAGE = 3.0  # seconds between the kill and the restart
CHAT = re.compile(r"POST /v1/chat/completions status=(\d+) outcome=(\S+) lane=(\S+) profile=(\S+)")
PROFILES_CONFIG = """
[profiles.worker1]
lane = "batch"

[profiles.worker2]
lane = "batch"

[keys]
worker1 = "sk-outage-worker1"
worker2 = "sk-outage-worker2"
"""


def point_profiles_at(board: HermesBoard, guard_url: str) -> None:
    """Real workers: each profile's LLM is the guard, with the profile's own key (as test_e2e_workers.py)."""
    board.env["HERMES_BIN"] = str(board.hermes)

    def configure(profile: str, key: str) -> None:
        for name, value in (
            ("model.provider", "custom"),
            ("model.base_url", f"{guard_url}/v1"),
            ("model.api_key", key),
            ("model.default", "sim"),
        ):
            board.cli("-p", profile, "config", "set", name, value)  # one at a time: each rewrites config.yaml

    with ThreadPoolExecutor(len(PROFILES)) as pool:
        list(pool.map(lambda item: configure(*item), PROFILES.items()))


class Outage(threading.Thread):
    """Kills the sim once the guard has answered ``after`` chat calls and has one in flight, restarts it
    ``OUTAGE`` seconds later; notes what the guard's capacity said meanwhile."""

    def __init__(self, sim: Any, guard: str, log: Path, *, after: int) -> None:
        super().__init__(name="outage", daemon=True)
        self.sim, self.guard, self.log, self.after = sim, guard, log, after
        self.at_kill: dict[str, Any] = {}
        self.during: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with httpx.Client(timeout=5) as client:
                deadline = time.monotonic() + 240
                while not self.stop.is_set() and time.monotonic() < deadline:
                    calls = len(CHAT.findall(self.log.read_text()))
                    capacity = client.get(f"{self.guard}/guard/capacity").json()["upstreams"]["default"]
                    if calls >= self.after and capacity["in_flight"] >= 1:
                        self.at_kill = capacity
                        self.sim.kill()
                        until = time.monotonic() + OUTAGE
                        while time.monotonic() < until:
                            self.during.append(
                                client.get(f"{self.guard}/guard/capacity").json()["upstreams"]["default"]
                            )
                            time.sleep(0.2)  # sampling the guard while the outage lasts
                        self.sim.start()
                        return
                    time.sleep(0.05)  # polling another process's log and capacity: no event to wait on
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_sim_killed_and_restarted_while_real_workers_run_costs_no_card(
    board: HermesBoard, monitor: RunningMonitor, tmp_path: Path
) -> None:
    with restartable_sim(mode="scripted", no_ollama=True, slots=2, steps=2, tool_seconds=1) as sim:
        config = write_guard_config(tmp_path / "guard.toml", sim.url, cap=2, extra=PROFILES_CONFIG)
        log = tmp_path / "guard.log"
        with guard_with_config(config, log) as (guard_url, _pid):
            point_profiles_at(board, guard_url)
            ids = board.create(["worker1", "worker2"] * (CARDS // 2))
            outage = Outage(sim, guard_url, log, after=2)
            outage.start()
            out = io.StringIO()
            started = time.monotonic()
            code = run(
                Options(command="run", hermes=str(board.hermes), guard_url=guard_url, target=2, log_json=True),
                env=board.env,
                out=out,
                err=out,
                until=lambda: board.counts().get("done", 0) == len(ids) or time.monotonic() - started > 300,
            )
            elapsed = time.monotonic() - started
            outage.stop.set()
            outage.join(10)
    assert outage.error is None, outage.error
    assert outage.at_kill, "the sim was never killed: no chat call was in flight"
    assert sim.starts == 2
    assert any("held" in c for c in outage.during), f"the guard never held its gate: {outage.during}"
    assert code is ExitCode.OK, out.getvalue()
    counts = board.counts()
    runs = board._query("SELECT task_id, status, outcome FROM task_runs ORDER BY id")
    assert counts == {"done": CARDS}, (counts, runs, out.getvalue()[-3000:])
    assert [status for _, status, _ in runs] == ["done"] * CARDS, f"a worker run did not end done: {runs}"
    for task in ids:
        events = {e["kind"] for e in json.loads(board.cli("kanban", "show", task, "--json"))["events"]}
        assert "completed" in events and not events & {"crashed", "blocked", "spawn_failed", "timed_out"}, events
    assert monitor.max_running <= 2
    calls = CHAT.findall(log.read_text())
    statuses = sorted({(status, outcome) for status, outcome, _, _ in calls})
    assert not [c for c in calls if c[0] not in ("200", "499")], f"a worker's call was refused or failed: {calls}"
    print(
        f"\n{CARDS} cards done in {elapsed:.1f} s through a {OUTAGE} s sim outage (killed with "
        f"{outage.at_kill['in_flight']} in flight, {outage.at_kill['queued']} queued); "
        f"{len(calls)} chat calls, (status, outcome): {statuses}; runs: {[s for _, s, _ in runs]}"
    )
