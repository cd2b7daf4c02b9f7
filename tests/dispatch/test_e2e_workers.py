"""End to end: real Hermes workers -> the real guard -> the simulated upstream in its scripted mode.

Six cards, target 2, guard cap 2. guard-dispatch runs as cron would (a few ticks a run); each worker is
the real ``hermes -p PROFILE chat`` with its profile's base URL and key pointing at the guard, and the
sim answers its first turn with a ``kanban_complete`` tool call and the next with a short text.
"""

from __future__ import annotations

import io
import json
import re
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway_guard.dispatch.cli import ExitCode, Options, run
from tests.dispatch.conftest import HermesBoard, RunningMonitor, free_port, guard_process

pytestmark = [pytest.mark.slow, pytest.mark.hermes]
pytest.importorskip("gateway_guard.sim.server", reason="the simulated upstream is not in this tree")
support = pytest.importorskip("tests.support.llamacpp", reason="tests/support (sim process helper) missing")

PROFILES = {"worker1": "sk-e2e-worker1", "worker2": "sk-e2e-worker2"}
CHAT = re.compile(r"POST /v1/chat/completions status=(\d+) outcome=(\S+) lane=(\S+) profile=(\S+)")

GUARD_CONFIG = """
[server]
host = "127.0.0.1"
default_lane = "batch"

[lanes.batch]
headroom = 0

[upstreams.sim]
url = "{sim}"
max_inflight = 2

[profiles.worker1]
lane = "batch"

[profiles.worker2]
lane = "batch"

[keys]
worker1 = "sk-e2e-worker1"
worker2 = "sk-e2e-worker2"
"""


@pytest.fixture
def sim_url() -> Iterator[str]:
    with support.sim_server(mode="scripted", no_ollama=True, slots=4) as url:
        yield url


def point_profiles_at(board: HermesBoard, guard_url: str) -> None:
    """Real workers: each profile's LLM is the guard, with the profile's own key."""
    board.env["HERMES_BIN"] = str(board.hermes)

    def configure(profile: str, key: str) -> None:
        # one profile's settings one after another: `config set` rewrites the whole config.yaml, so two
        # concurrent sets on one profile lose a write (seen: base_url lost, workers fell back to OpenRouter)
        for name, value in (("model.provider", "custom"), ("model.base_url", f"{guard_url}/v1"),
                            ("model.api_key", key), ("model.default", "sim")):
            board.cli("-p", profile, "config", "set", name, value)

    with ThreadPoolExecutor(len(PROFILES)) as pool:
        list(pool.map(lambda item: configure(*item), PROFILES.items()))
    for profile, key in PROFILES.items():
        text = (board.home / "profiles" / profile / "config.yaml").read_text()
        assert f"{guard_url}/v1" in text and key in text, text


def test_six_cards_real_workers_through_the_guard(
    board: HermesBoard, monitor: RunningMonitor, sim_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "guard.toml"
    config.write_text(GUARD_CONFIG.format(sim=sim_url))
    log = tmp_path / "guard.log"
    with guard_process(["--config", str(config)], log, port=free_port()) as guard_url:
        point_profiles_at(board, guard_url)
        ids = board.create(["worker1", "worker2"] * 3, priorities=[6, 5, 4, 3, 2, 1])
        started = time.monotonic()
        runs: list[list[dict[str, object]]] = []
        deadline = started + 300
        while board.counts().get("done", 0) < len(ids) and time.monotonic() < deadline:
            out = io.StringIO()
            code = run(Options(hermes=str(board.hermes), guard_url=guard_url, target=2, ticks=3, interval=3,
                               log_json=True), env=board.env, out=out, err=out)
            assert code is ExitCode.OK, out.getvalue()
            runs.append([json.loads(line) for line in out.getvalue().splitlines() if '"tick"' in line])
        elapsed = time.monotonic() - started

    ticks = [t for r in runs for t in r]
    counts = board.counts()
    assert counts == {"done": 6}, (counts, ticks)
    assert monitor.max_running == 2
    assert all(int(str(t["running"])) + int(str(t["asked"])) <= 2 for t in ticks)
    calls = CHAT.findall(log.read_text())
    per_profile = {p: sum(1 for c in calls if c[3] == p) for p in PROFILES}
    # Each card: one turn answered with kanban_complete, one after its result; no retries, no errors.
    assert per_profile == {"worker1": 6, "worker2": 6}, calls
    # every call was served; a worker that ends its run as soon as the card is complete may hang up on the last
    # answer's stream (client_gone, still a 200): not a refusal, not an error
    assert {(status, lane) for status, _, lane, _ in calls} == {("200", "batch")}
    assert {outcome for _, outcome, _, _ in calls} <= {"admitted", "client_gone"}
    for task in ids:
        events = {e["kind"] for e in json.loads(board.cli("kanban", "show", task, "--json"))["events"]}
        assert "completed" in events and not events & {"crashed", "blocked", "spawn_failed", "timed_out"}, events
    print(f"\n6 cards done in {elapsed:.1f} s over {len(ticks)} ticks ({len(runs)} guard-dispatch runs); "
          f"max running {monitor.max_running}; chat calls per profile {per_profile}")


def test_run_mode_multi_step_cards_real_workers(
    board: HermesBoard, monitor: RunningMonitor, tmp_path: Path
) -> None:
    """guard-dispatch run, target 2, guard cap 2, and cards of 4 tool turns with 1 s of tool time each."""
    with support.sim_server(mode="scripted", no_ollama=True, slots=2, steps=4, tool_seconds=1) as sim:
        config = tmp_path / "guard.toml"
        config.write_text(GUARD_CONFIG.format(sim=sim))
        log = tmp_path / "guard.log"
        with guard_process(["--config", str(config)], log, port=free_port()) as guard_url:
            point_profiles_at(board, guard_url)
            ids = board.create(["worker1", "worker2"] * 2)
            out = io.StringIO()
            started = time.monotonic()
            code = run(Options(command="run", hermes=str(board.hermes), guard_url=guard_url, target=2,
                               log_json=True), env=board.env, out=out, err=out,
                       until=lambda: board.counts().get("done", 0) == len(ids) or time.monotonic() - started > 300)
            elapsed = time.monotonic() - started
            metrics = httpx.get(f"{sim}/metrics").text
    assert code is ExitCode.OK, out.getvalue()
    assert board.counts() == {"done": 4}, out.getvalue()
    assert monitor.max_running == 2
    peak = int(float(re.search(r"^sim:max_concurrent_seen (\S+)$", metrics, re.M)[1]))  # type: ignore[index]
    assert peak <= 2  # the guard's cap as the server saw it
    calls = CHAT.findall(log.read_text())
    # 4 tool turns + the final answer per card, no retries. After a multi-turn run a worker also makes one
    # auxiliary call (a plain text reply); it often exits before reading it all: the guard logs client_gone.
    assert {(status, lane) for status, _, lane, _ in calls} == {("200", "batch")}
    assert {c[1] for c in calls} <= {"admitted", "client_gone"}
    assert 4 * 5 <= sum(1 for c in calls if c[1] == "admitted") <= len(calls) <= 4 * 6
    for task in ids:
        shown = json.loads(board.cli("kanban", "show", task, "--json"))
        events = {e["kind"] for e in shown["events"]}
        assert "completed" in events and not events & {"crashed", "blocked", "spawn_failed", "timed_out"}, events
        assert any("sim" in str(c.get("body", "")) for c in shown.get("comments", [])), shown.get("comments")
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    print(f"\n4 multi-step cards done in {elapsed:.1f} s; {sum(1 for x in lines if x.get('event') == 'dispatch')} "
          f"dispatches; max running {monitor.max_running}; sim peak {peak}")


def test_run_auto_target_real_workers_heartbeat_before_their_first_request(
    board: HermesBoard, monitor: RunningMonitor, tmp_path: Path
) -> None:
    """guard-dispatch run --target auto (max 4, one request waiting per slot), guard cap 2, multi-step cards.

    What the automatic target assumes of Hermes 0.19.0: a real worker writes its run's first heartbeat before
    its first LLM request, so a card is "starting" exactly while its worker is not yet asking."""
    with support.sim_server(mode="scripted", no_ollama=True, slots=2, steps=4, tool_seconds=1) as sim:
        config = tmp_path / "guard.toml"
        config.write_text(GUARD_CONFIG.format(sim=sim))
        log = tmp_path / "guard.log"
        with guard_process(["--config", str(config)], log, port=free_port()) as guard_url:
            point_profiles_at(board, guard_url)
            ids = board.create(["worker1", "worker2"] * 3)
            out = io.StringIO()
            started = time.monotonic()
            code = run(Options(command="run", hermes=str(board.hermes), guard_url=guard_url, target="auto",
                               max_running=4, queue_per_slot=1, log_json=True), env=board.env, out=out, err=out,
                       until=lambda: board.counts().get("done", 0) == len(ids) or time.monotonic() - started > 300)
            metrics = httpx.get(f"{sim}/metrics").text
    assert code is ExitCode.OK, out.getvalue()
    assert board.counts() == {"done": 6}, out.getvalue()
    assert 2 < monitor.max_running <= 4  # more cards than slots, never above max_running
    peak = int(float(re.search(r"^sim:max_concurrent_seen (\S+)$", metrics, re.M)[1]))  # type: ignore[index]
    assert peak <= 2
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    dispatches = [x for x in lines if x.get("event") == "dispatch"]
    assert all(int(d["running"]) + int(d["asked"]) <= 4 for d in dispatches)
    assert any(int(d["starting"]) > 0 for d in dispatches), dispatches  # real workers seen starting
    first_heartbeat = dict(board._query(
        "SELECT task_id, MIN(created_at) FROM task_events WHERE kind = 'heartbeat' GROUP BY task_id"))
    first_request: dict[str, float] = {}
    for db in board.home.glob("profiles/*/state.db"):
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            for content, ts in conn.execute("SELECT content, MIN(timestamp) FROM messages WHERE role = 'user' "
                                            "GROUP BY session_id"):
                first_request[str(content).rsplit(" ", 1)[-1]] = float(ts)
        conn.close()
    for task in ids:
        shown = json.loads(board.cli("kanban", "show", task, "--json"))
        events = {e["kind"] for e in shown["events"]}
        assert "completed" in events and not events & {"crashed", "blocked", "spawn_failed", "timed_out"}, events
        # heartbeat times are whole seconds (floored): at or before the worker's first prompt
        assert first_heartbeat[task] <= first_request[task], (task, first_heartbeat, first_request)
    print(f"\n6 cards, auto: max running {monitor.max_running}; sim peak {peak}; "
          f"starting per dispatch {[d['starting'] for d in dispatches]}")
