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
  (e) auto    ``guard-dispatch run --target auto --max-running M --queue-per-slot Q``
  (f), (g)    (d) and (e) with reservations (the guard's admin token given: a slot booked per card started)

(d) and (e) book no slots unless --reserve; (f) and (g) always do.

Sampled every 0.1 s from the board's SQLite file (read-only) and GET /guard/capacity: wall time until no
card is ready or running, mean running / T while cards wait ("backlog"), the guard's slot use
(time-weighted in_flight / limit while cards wait; the same from the first LLM request on, since before a
worker is up no dispatcher can have a request at the guard; and over the whole run), the share of the
backlog spent at the variant's bound (T, or M for (e)), most workers alive at once, most requests in flight
at the guard (never above the cap), and failed runs (task_runs whose outcome is not 'completed').

A second table says where a card's time goes: claim to done, claim to the worker's first LLM request, its
LLM calls (queueing at the guard included) and tools (from the worker's session in its profile's state.db,
where Hermes stores each message with its time), done to the worker's exit, a finished card to the next
claim; the sum of the cards' claim-to-done times over T (no dispatcher that keeps at most T running can
empty the board sooner); the backlog's share with a free slot and nothing queued; the host's CPU use; the
guard's batch queue waits (mean, and how many waited past aging_seconds = 10 s, after which a batch request
ranks ahead of new interactive ones); the workers' resident memory.

    .venv/bin/python benchmarks/closed_loop.py [--cards 12] [--target 2] [--slots 2] [--rounds 1]
        [--steps 4] [--tool-seconds 2] [--tokens-per-second 10] [--max-running 8] [--queue-per-slot 2]
        [--seconds 600] [--only a,b,c,d,e] [--reserve] [--keep DIR]

Everything runs on 127.0.0.1; every process it starts is stopped by its PID; every loop is bounded by
--seconds per variant.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
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
    queued: list[int] = field(default_factory=list)
    cpu_busy: list[float] = field(default_factory=list)  # share of the host's CPU time busy since the last sample


class Watcher:
    """Samples the board (one read-only connection for its life) and the guard every 0.1 s."""

    def __init__(self, db: Path, guard_url: str) -> None:
        self.db = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10, check_same_thread=False)
        self.guard = httpx.Client(base_url=guard_url, timeout=2.0, trust_env=False)
        self.samples = Samples()
        self.pids: set[int] = set()
        self.worker: dict[int, str] = {}  # worker pid -> its card
        self.claimed: dict[str, float] = {}  # card -> epoch time first seen running (0.1 s sampling)
        self.done: dict[str, float] = {}  # card -> epoch time first seen done
        self.exited: dict[int, float] = {}  # worker pid -> epoch time first seen gone
        self._cpu = _cpu_times()
        self.max_rss_mb = self.max_worker_mb = 0.0  # resident memory of the workers alive at once, of one

    def sample(self, t: float) -> tuple[int, int]:
        now = time.time()
        counts: dict[str, int] = {}
        for task_id, status in self.db.execute("SELECT id, status FROM tasks").fetchall():
            counts[status] = counts.get(status, 0) + 1
            if status in ("running", "done"):
                self.claimed.setdefault(task_id, now)
            if status == "done":
                self.done.setdefault(task_id, now)
        for task_id, pid in self.db.execute(
                "SELECT task_id, worker_pid FROM task_runs WHERE worker_pid IS NOT NULL").fetchall():
            if int(pid) not in self.pids:
                self.pids.add(int(pid))
                self.worker[int(pid)] = str(task_id)
        self.track_exits(now)
        rss = [_rss_mb(pid) for pid in self.pids - set(self.exited)]
        self.max_rss_mb = max(self.max_rss_mb, sum(rss))
        self.max_worker_mb = max([self.max_worker_mb, *rss])
        try:
            up = self.guard.get("/guard/capacity").json()["upstreams"]["sim"]
            in_flight, limit, queued = int(up["in_flight"]), int(up["limit"]), int(up["queued"])
        except (httpx.HTTPError, KeyError, ValueError):
            in_flight, limit, queued = 0, 0, 0
        busy, total = _cpu_times()
        s_busy = (busy - self._cpu[0]) / (total - self._cpu[1]) if total > self._cpu[1] else 0.0
        self._cpu = (busy, total)
        s = self.samples
        s.t.append(t)
        s.running.append(counts.get("running", 0))
        s.waiting.append(counts.get("ready", 0) + counts.get("todo", 0))
        s.in_flight.append(in_flight)
        s.limit.append(limit)
        s.alive.append(len(self.pids) - len(self.exited))
        s.queued.append(queued)
        s.cpu_busy.append(s_busy)
        return counts.get("ready", 0) + counts.get("running", 0) + counts.get("todo", 0), counts.get("done", 0)

    def batch_waits(self) -> tuple[float, float, float]:
        """The guard's batch queue waits so far: (count, sum of seconds, count over 10 s = aging_seconds)."""
        count = total = over = 0.0
        try:
            text = self.guard.get("/metrics").text
        except httpx.HTTPError:
            return count, total, over
        for line in text.splitlines():
            if not line.startswith("gateway_guard_queue_wait_seconds") or 'lane="batch"' not in line:
                continue
            value = float(line.rsplit(" ", 1)[1])
            if line.startswith("gateway_guard_queue_wait_seconds_count"):
                count = value
            elif line.startswith("gateway_guard_queue_wait_seconds_sum"):
                total = value
            elif 'le="10.0"' in line:
                over = -value
        return count, total, over + count

    def track_exits(self, now: float) -> None:
        for pid in self.pids - set(self.exited):
            if not _alive(pid):
                self.exited[pid] = now

    def failed_runs(self) -> int:
        return int(self.db.execute(
            "SELECT COUNT(*) FROM task_runs WHERE outcome IS NOT NULL AND outcome != 'completed'").fetchone()[0])

    def close(self) -> None:
        self.db.close()
        self.guard.close()


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat ((0, 0) where there is none)."""
    try:
        with open("/proc/stat") as fh:
            fields = [float(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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
        "e": [*gd, "run", *common, "--target", "auto", "--max-running", str(args.max_running), "--queue-per-slot",
              str(args.queue_per_slot), *reserve],
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
    waits_before = watcher.batch_waits()
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
        while time.monotonic() < end and len(watcher.exited) < len(watcher.pids):
            watcher.track_exits(time.time())
            time.sleep(0.1)
        if args.keep is not None:
            (work / f"{variant}{n}.samples.json").write_text(json.dumps(vars(watcher.samples)))
        count, total, over = (a - b for a, b in zip(watcher.batch_waits(), waits_before, strict=True))
        waits = {"batch_wait_mean_s": total / count if count else 0.0, "batch_waits_over_aging": int(over)}
        return summarise(variant, watcher, elapsed, args) | phases(home, watcher, args) | waits
    finally:
        watcher.close()


def summarise(variant: str, w: Watcher, elapsed: float, args: argparse.Namespace) -> dict[str, object]:
    s = w.samples
    bound = args.max_running if variant in "eg" else args.target
    backlog_t = running_t = use_t = all_t = all_use_t = bound_t = cpu_t = idle_t = warm_t = warm_use_t = 0.0
    first_ask = next((s.t[i] for i, n in enumerate(s.in_flight) if n > 0), float("inf"))
    for i in range(1, len(s.t)):
        dt = s.t[i] - s.t[i - 1]
        all_t += dt
        all_use_t += (s.in_flight[i - 1] / s.limit[i - 1] if s.limit[i - 1] else 0.0) * dt
        if s.waiting[i - 1] > 0:
            backlog_t += dt
            running_t += s.running[i - 1] * dt
            bound_t += dt if s.running[i - 1] >= bound else 0.0
            cpu_t += s.cpu_busy[i] * dt
            idle_t += dt if s.in_flight[i - 1] < s.limit[i - 1] and s.queued[i - 1] == 0 else 0.0
            use = (s.in_flight[i - 1] / s.limit[i - 1] if s.limit[i - 1] else 0.0) * dt
            use_t += use
            if s.t[i - 1] >= first_ask:  # no dispatcher can have a request at the guard before a worker is up
                warm_t += dt
                warm_use_t += use
    done = int(w.db.execute("SELECT COUNT(*) FROM tasks WHERE status = 'done'").fetchone()[0])
    return {
        "variant": variant, "done": done, "wall_s": elapsed,
        "running_per_target": running_t / backlog_t / args.target if backlog_t else float("nan"),
        "slot_use": use_t / backlog_t if backlog_t else float("nan"),
        "slot_use_run": all_use_t / all_t if all_t else float("nan"),
        "slot_use_warm": warm_use_t / warm_t if warm_t else float("nan"),
        "first_request_s": first_ask,
        "at_bound": bound_t / backlog_t if backlog_t else float("nan"),
        "cpu_busy": cpu_t / backlog_t if backlog_t else float("nan"),
        "slot_free_no_queue": idle_t / backlog_t if backlog_t else float("nan"),
        "max_running": max(s.running, default=0), "max_alive": max(s.alive, default=0),
        "max_in_flight": max(s.in_flight, default=0), "failed_runs": w.failed_runs(),
        "workers_rss_mb": w.max_rss_mb, "worker_rss_mb": w.max_worker_mb,
    }


def phases(home: Path, w: Watcher, args: argparse.Namespace) -> dict[str, object]:
    """Where a card's time goes, from the board (claim and done, sampled every 0.1 s), the worker's session
    in its profile's state.db (Hermes stores every message with its time: the prompt just before the first
    LLM request, each answer when it arrived, each tool result when the tool ended) and the worker's exit."""
    sessions: dict[str, list[tuple[str, str | None, float]]] = {}
    for db in sorted(home.glob("profiles/*/state.db")):
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            rows = conn.execute("SELECT session_id, role, tool_name, timestamp, content FROM messages "
                                "ORDER BY timestamp, id").fetchall()
        by_session: dict[str, list[tuple[str, str | None, float, str]]] = {}
        for sid, role, tool, ts, content in rows:
            by_session.setdefault(str(sid), []).append((str(role), tool, float(ts), str(content or "")))
        for session in by_session.values():
            if session and session[0][0] == "user":
                sessions[session[0][3].rsplit(" ", 1)[-1]] = [(r, t, ts) for r, t, ts, _ in session]
    exits = {task: w.exited[pid] for pid, task in w.worker.items() if pid in w.exited}
    start, llm, tool, card, linger, react = [], [], [], [], [], []
    dones = sorted(w.done.values())
    for task, claimed in w.claimed.items():
        done = w.done.get(task)
        msgs = sessions.get(task)
        if done is None or not msgs:
            continue
        card.append(done - claimed)
        start.append(msgs[0][2] - claimed)
        llm_s = tool_s = 0.0
        for (_, _, before), (role, name, ts) in itertools.pairwise(msgs):
            if role == "assistant":
                llm_s += ts - before
            elif role == "tool":
                tool_s += ts - before
                if name == "kanban_complete":
                    break
        llm.append(llm_s)
        tool.append(tool_s)
        if task in exits:
            linger.append(exits[task] - done)
        earlier = [d for d in dones if d <= claimed]
        if earlier:
            react.append(claimed - earlier[-1])
    return {"card_s": mean(card), "start_s": mean(start), "llm_s": mean(llm), "tool_s": mean(tool),
            "linger_s": mean(linger), "react_s": mean(react), "react_max_s": max(react, default=float("nan")),
            "work_bound_s": sum(card) / args.target}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", type=int, default=12)
    parser.add_argument("--target", type=int, default=2, help="T: running cards for (a)-(d)")
    parser.add_argument("--slots", type=int, default=2, help="the guard's cap (and the sim's slots)")
    parser.add_argument("--max-running", type=int, default=8, help="(e)'s bound on running cards (the default's)")
    parser.add_argument("--queue-per-slot", type=float, default=2.0,
                        help="(e)'s batch requests to keep waiting per slot")
    parser.add_argument("--steps", type=int, default=4, help="tool turns per card (sim --steps)")
    parser.add_argument("--tool-seconds", type=float, default=2.0, help="the terminal step's sleep")
    parser.add_argument("--tokens-per-second", type=float, default=10.0,
                        help="the sim's decode rate: how long the GPU part of a turn takes (default 10)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the interleaved a..e sequence")
    parser.add_argument("--seconds", type=float, default=600.0, help="give up on a variant after this long")
    parser.add_argument("--only", default="a,b,c,d,e", help="variants to run, in this order (also f, g)")
    parser.add_argument("--reserve", action="store_true", help="(d)/(e) book guard slots for new workers")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", type=Path, help="work in this (new) directory and keep it: boards, logs, sessions")
    args = parser.parse_args()
    if not HERMES.exists():
        print(f"no hermes CLI at {HERMES} (./run-tests installs it)", file=sys.stderr)
        return 2
    variants = [v.strip() for v in args.only.split(",") if v.strip()]
    args.load_before = _load()
    results: list[dict[str, object]] = []
    sim_port, guard_port = free_port(), free_port()
    sim = f"http://127.0.0.1:{sim_port}"
    sim_cmd = sim_argv(sim_port, "--mode", "scripted", "--no-ollama", "--slots", str(args.slots), "--steps",
                       str(args.steps), "--tool-seconds", str(args.tool_seconds), "--tokens-per-second",
                       str(args.tokens_per_second))
    if args.keep is not None:
        args.keep.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        tmp = str(args.keep) if args.keep is not None else stack.enter_context(
            tempfile.TemporaryDirectory(prefix="closed-loop-"))
        stack.enter_context(process("sim", sim_cmd, sim))
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
            f"{r['running_per_target']:.2f}", f"{r['slot_use']:.2f}",
            f"{r['slot_use_warm']:.2f} (from {r['first_request_s']:.1f} s)", f"{r['slot_use_run']:.2f}",
            f"{r['at_bound']:.2f}", r["max_running"],
            r["max_alive"], r["max_in_flight"], r["failed_runs"],
        ])
    print(f"\n{args.cards} cards, 2 profiles, T={args.target}, guard cap {args.slots}, sim --steps {args.steps} "
          f"--tool-seconds {args.tool_seconds:g} --tokens-per-second {args.tokens_per_second:g}, "
          f"(e) max_running {args.max_running} queue_per_slot {args.queue_per_slot:g}, reservations for (d)/(e) "
          f"{'on' if args.reserve else 'off'}; load average {args.load_before} before, {_load()} after\n")
    print(table(["dispatcher", "board empty in (s)", "running / T (backlog)", "slot use (backlog)",
                 "slot use (backlog, from the first LLM request)", "slot use (whole run)", "at its bound (backlog)",
                 "max running", "max workers alive", "max in flight", "failed runs"], rows))
    print("\nwhere a card's time goes (means over its cards, seconds; 'at its bound': share of the backlog time with "
          "T cards running, or max_running for (e)/(g); 'cards / T': the sum of the cards' claim-to-done times over "
          "T, the least time any dispatcher that keeps at most T running needs for these cards)\n")
    rows = [[f"({r['variant']})", f"{r['card_s']:.1f}", f"{r['start_s']:.1f}", f"{r['llm_s']:.1f}",
             f"{r['tool_s']:.1f}", f"{r['linger_s']:.1f}", f"{r['react_s']:.2f} / {r['react_max_s']:.2f}",
             f"{r['work_bound_s']:.1f}", f"{r['wall_s']:.1f}", f"{r['slot_free_no_queue']:.2f}",
             f"{r['cpu_busy']:.2f}", f"{r['batch_wait_mean_s']:.2f} / {r['batch_waits_over_aging']}",
             f"{r['workers_rss_mb']:.0f} / {r['worker_rss_mb']:.0f}"] for r in results]
    print(table(["dispatcher", "claim to done", "claim to first LLM request", "LLM calls (queue incl.)",
                 "tools", "done to worker exit", "finish to next claim (mean / max)", "cards / T", "board empty in",
                 "slot free, none queued (backlog)", "host CPU busy (backlog)",
                 "batch queue wait: mean s / requests over 10 s", "workers' RSS MB: most at once / one"],
                rows))


if __name__ == "__main__":
    raise SystemExit(main())
