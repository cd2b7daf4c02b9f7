"""What the shared (Redis) gate costs against the in-memory gate, in the same run.

Two parts, both on 127.0.0.1 with a ``redis-server`` this script starts (free port, temp dir, no persistence):

* **gate**: acquire + release of one permit, back to back, in this process: the in-memory ``Gate`` against a
  ``ClusterGate`` on loopback Redis, with its pool of idle leases (the next request reuses the lease: no call to
  Redis) and without it (``keep_idle=0``: every request a round trip to Redis; what a request pays whenever
  another replica waits) (rounds alternate; p50 / p99 per request over all rounds);
* **guard** (``--guard``): requests/s of ``gateway-guard`` processes in front of the zero-work sim
  (``python -m gateway_guard.sim --mode zero``), non-streamed chat completions from ``--concurrency`` clients in a
  closed loop: one replica with the in-memory gate, then one, two and three replicas sharing one Redis (the
  clients spread over the replicas). Each replica is pinned to ``--proxy-cpu`` with taskset; with more replicas
  than cores they share them, so the table also gives requests per CPU-second of the guard processes. The
  sim reports the most requests it ever held at once (``sim:max_concurrent_seen``): it must stay at the cap.
  Redis's own command counts give the script calls (``EVALSHA``) per request of each set-up.

Usage: ``.venv/bin/python benchmarks/cluster.py [--requests 3000] [--rounds 3] [--guard --seconds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (
    HOST,
    closed_loop,
    free_port,
    guard_argv,
    percentile,
    pin_self,
    pinned,
    process,
    raw_post,
    sim_argv,
    table,
)

from gateway_guard.admission.cluster.gate import ClusterGate
from gateway_guard.admission.cluster.spec import ClusterSpec
from gateway_guard.admission.cluster.store import LeaseStore, connect, prefix_for
from gateway_guard.admission.gate import Gate
from gateway_guard.admission.limit import FixedLimit
from gateway_guard.admission.policy import LanePolicy

LANES = [LanePolicy(name="interactive", priority=0), LanePolicy(name="batch", priority=1, headroom=1)]


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, int]]:
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        argv = [exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", tmp]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # its own "ready" line is the event
                if b"Ready to accept connections" in line:
                    break
            else:
                sys.exit("redis-server did not start")
            proc.stdout.close()
            yield f"redis://{HOST}:{port}/0", proc.pid
        finally:
            proc.terminate()
            proc.wait(10)


async def time_gate(gate: Gate | ClusterGate, n: int) -> list[float]:
    out = []
    clock = time.perf_counter
    for _ in range(n):
        started = clock()
        permit = await gate.acquire("batch", "p")
        permit.release()
        out.append(clock() - started)
    return out


async def gate_part(url: str, requests: int, rounds: int) -> None:
    redis = connect(ClusterSpec(redis_url=url))
    await redis.set(f"{prefix_for('bench')}:epoch", 0)  # a running cluster: no first-start quiet period
    local = Gate("bench", FixedLimit(8), LANES)
    pooled = ClusterGate("bench", FixedLimit(8), LANES, store=LeaseStore(redis, "bench", "r1", lease_ms=10_000))
    unpooled = ClusterGate(
        "bench", FixedLimit(8), LANES, store=LeaseStore(redis, "bench", "r2", lease_ms=10_000), keep_idle=0
    )
    gates: dict[str, Gate | ClusterGate] = {
        "in-memory": local,
        "shared (Redis), pool": pooled,
        "shared (Redis), no pool": unpooled,
    }
    samples: dict[str, list[float]] = {name: [] for name in gates}
    try:
        for gate in gates.values():
            await time_gate(gate, 200)  # warm (scripts loaded, connections open, subscribed)
        for _ in range(rounds):
            for name, gate in gates.items():
                samples[name] += await time_gate(gate, requests)
    finally:
        await pooled.aclose()
        await unpooled.aclose()
        await redis.aclose()
    base = percentile(samples["in-memory"], 50)
    rows = []
    for name, values in samples.items():
        p50, p99 = percentile(values, 50), percentile(values, 99)
        rows.append([name, len(values), f"{p50 * 1e3:.3f}", f"{p99 * 1e3:.3f}", f"{(p50 - base) * 1e3:+.3f}"])
    print("acquire + release of one permit, back to back (ms)")
    print(table(["gate", "requests", "p50", "p99", "added p50"], rows))


# -- guard processes -------------------------------------------------------------------------------------------


CHAT = json.dumps({"model": "sim", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}).encode()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def guard_part(redis_url: str, redis_pid: int, args: argparse.Namespace) -> None:
    """One guard with the in-memory gate and three sharing one cap (started once); rounds alternate the set-ups."""
    pinning = bool(shutil.which("taskset")) and pin_self(args.client_cpu)
    proxy_cpu, client_cpu = (args.proxy_cpu, args.client_cpu) if pinning else (None, None)
    where = f"replicas on CPU {args.proxy_cpu}, sim + redis + load on CPU {args.client_cpu}"
    print(f"\nguard processes: {where if pinning else 'no pinning'}; load average {os.getloadavg()[0]:.1f}")
    if pinning and redis_pid:
        os.sched_setaffinity(redis_pid, {int(c) for c in args.client_cpu.split(",")})
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        sim_port = free_port()
        sim_cmd = pinned(sim_argv(sim_port, "--mode", "zero", "--no-ollama"), client_cpu)
        sim = stack.enter_context(process("sim", sim_cmd, f"http://{HOST}:{sim_port}"))
        upstream = f'[upstreams.default]\nurl = "{sim.url}"\nmax_inflight = {args.cap}\nprobe = "off"\n'
        mark_booted(redis_url, prefix_for("default", "bench"))  # a cluster that has run a while: no quiet period
        cluster = f'[cluster]\nredis_url = "{redis_url}"\nnamespace = "bench"\n'
        guards: list[tuple[int, int]] = []  # (port, pid): the in-memory one, then three replicas
        for i, text in enumerate([upstream] + [upstream + cluster] * 3):
            config = Path(tmp) / f"guard{i}.toml"
            config.write_text(text)
            port = free_port()
            argv = pinned(guard_argv(port, sim.url, args.cap, "--config", str(config)), proxy_cpu)
            proc = stack.enter_context(process("guard", argv, f"http://{HOST}:{port}", health="/guard/health"))
            guards.append((port, proc.popen.pid))
        setups = {
            "in-memory x1": guards[:1],
            "shared x1": guards[1:2],
            "shared x2": guards[1:3],
            "shared x3": guards[1:],
        }
        rates: dict[str, list[float]] = {name: [] for name in setups}
        per_cpu: dict[str, list[float]] = {name: [] for name in setups}
        calls: dict[str, list[float]] = {name: [] for name in setups}
        errors = 0
        for _ in range(args.rounds):
            for name, members in setups.items():
                cpu0, calls0 = sum(cpu_seconds(pid) for _, pid in members), script_calls(redis_url)
                rate, failed = asyncio.run(
                    closed_loop(
                        [(port, raw_post(HOST, port, "/v1/chat/completions", CHAT)) for port, _ in members],
                        args.concurrency,
                        args.seconds,
                    )
                )
                cpu = sum(cpu_seconds(pid) for _, pid in members) - cpu0
                rates[name].append(rate)
                per_cpu[name].append(rate * args.seconds / cpu if cpu else float("nan"))
                # warm-up second included: calls per request served in the whole phase (an upper bound)
                calls[name].append((script_calls(redis_url) - calls0) / max(1.0, rate * args.seconds))
                errors += failed
        seen = asyncio.run(sim_max_seen(sim.url))
    base = statistics.median(rates["in-memory x1"])
    rows = []
    for name in setups:
        rate = statistics.median(rates[name])
        rows.append(
            [
                name,
                f"{rate:.0f}",
                f"{rate / base:.2f}",
                f"{statistics.median(per_cpu[name]):.0f}",
                f"{statistics.median(calls[name]):.3f}",
            ]
        )
    headers = ["gate x replicas", "req/s (median)", "vs in-memory", "req per guard CPU-s", "Redis calls per req"]
    print(table(headers, rows))
    print(
        f"cap {args.cap}; {args.concurrency} clients spread over the replicas; {args.rounds} rounds of "
        f"{args.seconds:g} s per set-up, alternating; errors: {errors}; most the sim held at once: {int(seen)}"
    )


def script_calls(url: str) -> int:
    """Script calls (EVALSHA / EVAL) the Redis server has run so far: every call of the shared gate is one."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


def mark_booted(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.set(f"{prefix}:epoch", 0)
    client.close()


async def sim_max_seen(url: str) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{url}/metrics")).text
    return max(float(line.split()[-1]) for line in text.splitlines() if line.startswith("sim:max_concurrent_seen"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="acquire+release per gate per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--guard", action="store_true", help="also requests/s of guard processes")
    parser.add_argument("--seconds", type=float, default=5.0, help="per guard throughput phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cap", type=int, default=16, help="the guards' max_inflight (all share it)")
    parser.add_argument("--proxy-cpu", default="0")
    parser.add_argument("--client-cpu", default="1")
    args = parser.parse_args()
    with redis_server() as (url, pid):
        asyncio.run(gate_part(url, args.requests, args.rounds))
        if args.guard:
            guard_part(url, pid, args)


if __name__ == "__main__":
    main()
