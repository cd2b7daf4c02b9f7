#!/usr/bin/env python3
"""The closed loop: how fast a dispatcher empties a kanban board of real Hermes workers behind the guard.

Real Hermes 0.19.0 workers (two profiles, each with its own key) talk to the guard (cap = --slots, batch
headroom 0), which talks to the sim in its multi-step scripted mode (each card: kanban_show, terminal
``sleep --tool-seconds``, kanban_comment, kanban_complete, then a final answer). For each dispatcher the
board is a fresh copy with --cards ready cards; the variants run one after another, interleaved over
--rounds, on the same guard and sim:

  (a) seed    the seed article's capped-dispatch script (benchmarks/hermes-kanban-dispatch-capped.sh), every 5 s
  (b) hermes  ``hermes kanban dispatch --max T`` every 5 s
  (c) tick    ``guard-dispatch tick --target T`` every 5 s (a new process each time, as cron runs it)
  (d) run     ``guard-dispatch run --target T``
  (e) auto    ``guard-dispatch run --target auto --max-running M``
  (f), (g)    (d) and (e) with reservations (the guard's admin token given: a slot booked per card started)

(d) and (e) book no slots unless --reserve; (f) and (g) always do.

Sampled every 0.1 s from the board's SQLite file (read-only) and GET /guard/capacity: wall time until no
card is ready or running, mean running / T while cards wait ("backlog"), the guard's slot use
(time-weighted in_flight / limit while cards wait, and over the whole run), most workers alive at once,
most requests in flight at the guard (never above the cap), and failed runs (task_runs whose outcome is
not 'completed').

    .venv/bin/python benchmarks/closed_loop.py [--cards 12] [--target 2] [--slots 2] [--rounds 1]
        [--steps 4] [--tool-seconds 2] [--tokens-per-second 10] [--max-running 6] [--seconds 600]
        [--only a,b,c,d,e] [--reserve]

Everything runs on 127.0.0.1; every process it starts is stopped by its PID; every loop is bounded by
--seconds per variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO_ROOT, free_port, process, sim_argv, table

HERMES = REPO_ROOT / ".venv-hermes" / "bin" / "hermes"
SEED = REPO_ROOT / "benchmarks" / "hermes-kanban-dispatch-capped.sh"
PROFILES = {"worker1": "sk-loop-worker1", "worker2": "sk-loop-worker2"}
TOKEN = "closed-loop-admin"
INTERVAL = 5.0
GUARD_TOML = """
[server]
host = "127.0.0.1"
default_lane = "batch"
admin_token = "{token}"

[lanes.batch]
headroom = 0

[upstreams.sim]
url = "{sim}"
max_inflight = {slots}

[profiles.worker1]
lane = "batch"

[profiles.worker2]
lane = "batch"

[keys]
worker1 = "{k1}"
worker2 = "{k2}"
"""
NAMES = {"a": "seed capped script, every 5 s", "b": "hermes dispatch --max T, every 5 s",
         "c": "guard-dispatch tick, every 5 s", "d": "guard-dispatch run, target T",
         "e": "guard-dispatch run, target auto", "f": "guard-dispatch run, target T, reservations",
         "g": "guard-dispatch run, target auto, reservations"}


def hermes_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERMES_", "GUARD_"))}
    env.update(HERMES_HOME=str(home), HERMES_DISABLE_LAZY_INSTALLS="1",
               PATH=f"{HERMES.parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def cli(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([str(HERMES), *args], env=env, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"hermes {' '.join(args)} exited {proc.returncode}: {proc.stderr[-1000:]}")
    return proc.stdout


def make_template(root: Path, guard_url: str) -> Path:
    home = root / "template"
    home.mkdir()
    env = hermes_env(home)
    cli(env, "kanban", "init")
    cli(env, "config", "set", "kanban.dispatch_in_gateway", "false")

    def profile(name: str, key: str) -> None:
        cli(env, "profile", "create", name, "--no-alias", "--no-skills")
        for setting, value in (("model.provider", "custom"), ("model.base_url", f"{guard_url}/v1"),
                               ("model.api_key", key), ("model.default", "sim")):
            cli(env, "-p", name, "config", "set", setting, value)  # one after another: each rewrites the file

    with ThreadPoolExecutor(len(PROFILES)) as pool:
        list(pool.map(lambda item: profile(*item), PROFILES.items()))
    return home


@dataclass
class Samples:
    t: list[float] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    limit: list[int] = field(default_factory=list)
    alive: list[int] = field(default_factory=list)


class Watcher:
    """Samples the board (one read-only connection for its life) and the guard every 0.1 s."""

    def __init__(self, db: Path, guard_url: str) -> None:
        self.db = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10, check_same_thread=False)
        self.guard = httpx.Client(base_url=guard_url, timeout=2.0, trust_env=False)
        self.samples = Samples()
        self.pids: set[int] = set()

    def sample(self, t: float) -> tuple[int, int]:
        rows = self.db.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall()
        counts = {str(s): int(n) for s, n in rows}
        self.pids |= {int(p) for (p,) in self.db.execute(
            "SELECT worker_pid FROM task_runs WHERE worker_pid IS NOT NULL").fetchall()}
        try:
            up = self.guard.get("/guard/capacity").json()["upstreams"]["sim"]
            in_flight, limit = int(up["in_flight"]), int(up["limit"])
        except (httpx.HTTPError, KeyError, ValueError):
            in_flight, limit = 0, 0
        s = self.samples
        s.t.append(t)
        s.running.append(counts.get("running", 0))
        s.waiting.append(counts.get("ready", 0) + counts.get("todo", 0))
        s.in_flight.append(in_flight)
        s.limit.append(limit)
        s.alive.append(sum(1 for pid in self.pids if _alive(pid)))
        return counts.get("ready", 0) + counts.get("running", 0) + counts.get("todo", 0), counts.get("done", 0)

    def failed_runs(self) -> int:
        return int(self.db.execute(
            "SELECT COUNT(*) FROM task_runs WHERE outcome IS NOT NULL AND outcome != 'completed'").fetchone()[0])

    def close(self) -> None:
        self.db.close()
        self.guard.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("State:"):
                return "Z" not in line
    return True


@contextlib.contextmanager
def dispatcher(variant: str, env: dict[str, str], guard_url: str, args: argparse.Namespace,
               log: Path) -> Iterator[None]:
    """Runs the variant's dispatcher (a loop of short commands, or one long-running process) until exit."""
    T = str(args.target)
    gd = [sys.executable, "-m", "gateway_guard.dispatch.cli"]
    common = ["--hermes", str(HERMES), "--guard-url", guard_url, "--log-json"]
    reserve = [] if args.reserve or variant in "fg" else ["--no-reserve"]
    periodic = {
        "a": ["bash", str(SEED)],
        "b": [str(HERMES), "kanban", "dispatch", "--max", T],
        "c": [*gd, "tick", *common, "--target", T],
    }
    long_running = {
        "d": [*gd, "run", *common, "--target", T, *reserve],
        "e": [*gd, "run", *common, "--target", "auto", "--max-running", str(args.max_running), *reserve],
    }
    long_running["f"], long_running["g"] = long_running["d"], long_running["e"]
    run_env = dict(env, MAX_PARALLEL=T, GUARD_ADMIN_TOKEN=TOKEN,
                   PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    stop = threading.Event()
    with log.open("a") as out:
        if variant in long_running:
            proc = subprocess.Popen(long_running[variant], cwd=REPO_ROOT, env=run_env, stdout=out,
                                    stderr=subprocess.STDOUT)
            try:
                yield
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            return

        def loop() -> None:
            while not stop.is_set():
                started = time.monotonic()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    subprocess.run(periodic[variant], cwd=REPO_ROOT, env=run_env, stdout=out, stderr=subprocess.STDOUT,
                                   timeout=120, check=False)
                stop.wait(max(0.0, INTERVAL - (time.monotonic() - started)))

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(150)


def run_variant(variant: str, template: Path, work: Path, guard_url: str, args: argparse.Namespace,
                n: int) -> dict[str, object]:
    home = work / f"{variant}{n}"
    shutil.copytree(template, home)
    env = hermes_env(home)
    assignees = [list(PROFILES)[i % len(PROFILES)] for i in range(args.cards)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: cli(env, "kanban", "create", f"card {i}", "--assignee", assignees[i], "--json"),
                      range(args.cards)))
    watcher = Watcher(home / "kanban.db", guard_url)
    started = time.monotonic()
    elapsed = float("nan")
    try:
        with dispatcher(variant, env, guard_url, args, work / f"{variant}{n}.log"):
            deadline = started + args.seconds
            while time.monotonic() < deadline:
                left, _ = watcher.sample(time.monotonic() - started)
                if left == 0:
                    elapsed = time.monotonic() - started
                    break
                time.sleep(0.1)
        # workers still streaming their last answer: let them end before the next variant starts
        end = time.monotonic() + 30
        while time.monotonic() < end and any(_alive(p) for p in watcher.pids):
            time.sleep(0.2)
        return summarise(variant, watcher, elapsed, args)
    finally:
        watcher.close()


def summarise(variant: str, w: Watcher, elapsed: float, args: argparse.Namespace) -> dict[str, object]:
    s = w.samples
    backlog_t = running_t = use_t = all_t = all_use_t = 0.0
    for i in range(1, len(s.t)):
        dt = s.t[i] - s.t[i - 1]
        all_t += dt
        all_use_t += (s.in_flight[i - 1] / s.limit[i - 1] if s.limit[i - 1] else 0.0) * dt
        if s.waiting[i - 1] > 0:
            backlog_t += dt
            running_t += s.running[i - 1] * dt
            use_t += (s.in_flight[i - 1] / s.limit[i - 1] if s.limit[i - 1] else 0.0) * dt
    done = int(w.db.execute("SELECT COUNT(*) FROM tasks WHERE status = 'done'").fetchone()[0])
    return {
        "variant": variant, "done": done, "wall_s": elapsed,
        "running_per_target": running_t / backlog_t / args.target if backlog_t else float("nan"),
        "slot_use": use_t / backlog_t if backlog_t else float("nan"),
        "slot_use_run": all_use_t / all_t if all_t else float("nan"),
        "max_running": max(s.running, default=0), "max_alive": max(s.alive, default=0),
        "max_in_flight": max(s.in_flight, default=0), "failed_runs": w.failed_runs(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", type=int, default=12)
    parser.add_argument("--target", type=int, default=2, help="T: running cards for (a)-(d)")
    parser.add_argument("--slots", type=int, default=2, help="the guard's cap (and the sim's slots)")
    parser.add_argument("--max-running", type=int, default=6, help="(e)'s bound on running cards")
    parser.add_argument("--steps", type=int, default=4, help="tool turns per card (sim --steps)")
    parser.add_argument("--tool-seconds", type=float, default=2.0, help="the terminal step's sleep")
    parser.add_argument("--tokens-per-second", type=float, default=10.0,
                        help="the sim's decode rate: how long the GPU part of a turn takes (default 10)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the interleaved a..e sequence")
    parser.add_argument("--seconds", type=float, default=600.0, help="give up on a variant after this long")
    parser.add_argument("--only", default="a,b,c,d,e", help="variants to run, in this order (also f, g)")
    parser.add_argument("--reserve", action="store_true", help="(d)/(e) book guard slots for new workers")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not HERMES.exists():
        print(f"no hermes CLI at {HERMES} (./run-tests installs it)", file=sys.stderr)
        return 2
    variants = [v.strip() for v in args.only.split(",") if v.strip()]
    results: list[dict[str, object]] = []
    sim_port, guard_port = free_port(), free_port()
    sim = f"http://127.0.0.1:{sim_port}"
    sim_cmd = sim_argv(sim_port, "--mode", "scripted", "--no-ollama", "--slots", str(args.slots), "--steps",
                       str(args.steps), "--tool-seconds", str(args.tool_seconds), "--tokens-per-second",
                       str(args.tokens_per_second))
    with tempfile.TemporaryDirectory(prefix="closed-loop-") as tmp, process("sim", sim_cmd, sim):
        work = Path(tmp)
        config = work / "guard.toml"
        config.write_text(GUARD_TOML.format(token=TOKEN, sim=sim, slots=args.slots,
                                            k1=PROFILES["worker1"], k2=PROFILES["worker2"]))
        guard_cmd = [sys.executable, "-c", "from gateway_guard.cli import main; main()", "--config", str(config),
                     "--port", str(guard_port)]
        guard_url = f"http://127.0.0.1:{guard_port}"
        with process("guard", guard_cmd, guard_url, health="/guard/health",
                     env={k: "" for k in os.environ if k.startswith("GUARD_")}):
            template = make_template(work, guard_url)
            for n in range(args.rounds):
                for variant in variants:
                    result = run_variant(variant, template, work, guard_url, args, n)
                    results.append(result)
                    print(json.dumps(result), flush=True)
    print_table(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def print_table(results: list[dict[str, object]], args: argparse.Namespace) -> None:
    rows = []
    for r in results:
        wall = r["wall_s"]
        rows.append([
            f"({r['variant']}) {NAMES[str(r['variant'])]}",
            f"{wall:.1f}" if isinstance(wall, float) and wall == wall else f"not done ({r['done']}/{args.cards})",
            f"{r['running_per_target']:.2f}", f"{r['slot_use']:.2f}", f"{r['slot_use_run']:.2f}", r["max_running"],
            r["max_alive"], r["max_in_flight"], r["failed_runs"],
        ])
    print(f"\n{args.cards} cards, 2 profiles, T={args.target}, guard cap {args.slots}, sim --steps {args.steps} "
          f"--tool-seconds {args.tool_seconds:g} --tokens-per-second {args.tokens_per_second:g}, "
          f"(e) max_running {args.max_running}, reservations for (d)/(e) {'on' if args.reserve else 'off'}\n")
    print(table(["dispatcher", "board empty in (s)", "running / T (backlog)", "slot use (backlog)",
                 "slot use (whole run)", "max running", "max workers alive", "max in flight", "failed runs"], rows))


if __name__ == "__main__":
    raise SystemExit(main())
