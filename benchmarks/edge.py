"""The guard's edge under attack: a normal client's latency and the guard's RSS, idle vs attacked, in one run.

One ``gateway-guard`` process with default [server] settings (``--upstream SIM --max-inflight 4``) in front of
``python -m gateway_guard.sim --mode zero``. Phases, each ``--seconds`` long:

* **idle**: one normal client sends a small non-streamed chat completion every ``--interval`` (10 ms; 0 = back
  to back) on one keep-alive connection (p50 / p99 latency of each, from its send to its last byte);
* **attacked**: the same client while, at once,
  - a header flood: ``--flooders`` connections, each streaming 15 MB of one header line that never ends
    (reconnecting when cut);
  - stalled bodies: ``--stalled`` connections, each declaring a 15 MB body and sending it one byte short;
  - ``--idle-conns`` silent connections (reopened when closed);
  - a ``/metrics`` flood: ``--scrapers`` clients scraping back to back (Retry-After ignored).

Set-up (printed with the figures): the guard alone on ``--guard-cpu`` (taskset); the sim, the normal client
and the attacker on ``--client-cpu``. The attack runs in its own process (its 1,200 connections and 150 httpx
clients would otherwise share an event loop with the normal client and time that loop rather than the guard),
by default at ``SCHED_IDLE`` (``--attacker-sched idle``): on a real host the attacker is another machine, so
it should not take the CPU that the normal client and the sim need on their shared core; it still gets all
of that core the two leave idle. ``--attacker-sched normal`` gives it an equal share instead; ``--no-pin``
runs everything unpinned. Both phases run under the same set-up.

Then the cost of one read in the guard's CPU (``--cost-seconds`` each, 4 clients back to back, a fresh guard
each): a ``/metrics`` scrape rendered by the app, the same scrape refused by the edge's read rate (429), and
``/guard/health`` for scale.

The guard's RSS is sampled every 100 ms (peak printed). The sim's ``sim:requests_total`` is read before and
after: the attacks must add nothing to it (only the normal client's requests reach the upstream).

Usage: ``.venv/bin/python benchmarks/edge.py [--seconds 10]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    HOST,
    HttpError,
    RawClient,
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

MB = 1024 * 1024
CHAT = b'{"model":"sim","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}'


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sim_requests(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("sim:requests_total"):
            return int(float(line.rsplit(" ", 1)[1]))
    raise RuntimeError("sim:requests_total not found")


async def normal_client(port: int, seconds: float, retries: list[int], interval: float) -> list[float]:
    """One request every ``interval`` seconds (0: back to back) on one keep-alive connection, each timed from
    its send to its last byte; one that fails (a closed connection, a 503 at max_connections) is sent again on
    a new connection and counted in ``retries``, its latency including the retry."""
    client = RawClient(HOST, port)
    request = raw_post(HOST, port, "/v1/chat/completions", CHAT, {"x-guard-lane": "interactive"})
    latencies: list[float] = []
    start = time.monotonic()
    end = start + seconds
    try:
        while time.monotonic() < end:
            if interval:
                await asyncio.sleep(max(0.0, start + len(latencies) * interval - time.monotonic()))
            t0 = time.perf_counter()
            for attempt in range(20):
                try:
                    status, _ = await client.call(request)
                except HttpError:
                    status = 0
                if status == 200:
                    break
                retries.append(status)
                await client.close()
                await asyncio.sleep(0.05 * attempt)
            else:
                raise RuntimeError(f"a normal request failed 20 times (last status {status})")
            latencies.append(time.perf_counter() - t0)
    finally:
        await client.close()
    return latencies


# -- the attacker (its own process: ``edge.py --attack PORT ...``) ----------------------------------------------


async def header_flooder(port: int, stop: asyncio.Event, seen: Counter[str]) -> None:
    chunk = b"a" * (256 * 1024)
    while not stop.is_set():
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(HOST, port)
            seen["flood connections"] += 1
            try:
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-flood: ")
                for _ in range(60):
                    if stop.is_set():
                        break
                    writer.write(chunk)
                    await writer.drain()
                    seen["flood MB sent"] += len(chunk) / MB
            finally:
                writer.close()
        await asyncio.sleep(0.05)


async def stalled_body(port: int, stop: asyncio.Event, seen: Counter[str]) -> None:
    size = 15 * MB
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {size}\r\n\r\n"
    )
    piece = b"a" * MB
    while not stop.is_set():
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection(HOST, port)
            seen["stalled connections"] += 1
            try:
                writer.write(head.encode())
                for i in range(15):
                    writer.write(piece if i < 14 else piece[:-1])
                    await writer.drain()
                stop_wait = asyncio.ensure_future(stop.wait())
                closed = asyncio.ensure_future(reader.read())
                await asyncio.wait({stop_wait, closed}, return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                closed.cancel()
            finally:
                writer.close()
        await asyncio.sleep(0.05)


async def idle_connections(port: int, n: int, stop: asyncio.Event, seen: Counter[str]) -> None:
    async def one() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection(HOST, port)
                seen["idle connections opened"] += 1
                try:
                    stop_wait = asyncio.ensure_future(stop.wait())
                    closed = asyncio.ensure_future(reader.read())
                    await asyncio.wait({stop_wait, closed}, return_when=asyncio.FIRST_COMPLETED)
                    stop_wait.cancel()
                    closed.cancel()
                finally:
                    writer.close()
            await asyncio.sleep(0.2)

    await asyncio.gather(*(one() for _ in range(n)))


async def scraper(url: str, stop: asyncio.Event, seen: Counter[str]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        while not stop.is_set():
            try:
                answer = await client.get(f"{url}/metrics")
                seen[f"/metrics {answer.status_code}"] += 1
            except httpx.HTTPError:
                seen["/metrics failed"] += 1


async def attack(args: argparse.Namespace) -> None:
    """Runs every attack at once until stdin closes; then prints what it did as one JSON line."""
    port, url = args.attack, f"http://{HOST}:{args.attack}"
    stop = asyncio.Event()
    seen: Counter[str] = Counter()
    tasks = [asyncio.create_task(header_flooder(port, stop, seen)) for _ in range(args.flooders)]
    tasks += [asyncio.create_task(stalled_body(port, stop, seen)) for _ in range(args.stalled)]
    tasks.append(asyncio.create_task(idle_connections(port, args.idle_conns, stop, seen)))
    tasks += [asyncio.create_task(scraper(url, stop, seen)) for _ in range(args.scrapers)]
    started = time.monotonic()
    await asyncio.to_thread(sys.stdin.read)  # the parent closes our stdin to stop us
    stop.set()
    elapsed = time.monotonic() - started
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"seconds": elapsed, **seen}), flush=True)


def attacker_argv(args: argparse.Namespace, port: int, cpu: str | None) -> list[str]:
    argv = [sys.executable, __file__, "--attack", str(port), "--attacker-sched", args.attacker_sched]
    argv += ["--flooders", str(args.flooders), "--stalled", str(args.stalled)]
    argv += ["--idle-conns", str(args.idle_conns), "--scrapers", str(args.scrapers)]
    return pinned(argv, cpu)


# -- the run -------------------------------------------------------------------------------------------------------


async def sample_rss(pid: int, stop: asyncio.Event, peaks: list[float]) -> None:
    with contextlib.suppress(OSError):
        while not stop.is_set():
            peaks.append(rss_mb(pid))
            await asyncio.sleep(0.1)


async def attacked(
    args: argparse.Namespace, port: int, pid: int, retries: list[int], cpu: str | None
) -> tuple[list[float], float, dict[str, float]]:
    stop = asyncio.Event()
    peaks: list[float] = []
    sampler = asyncio.create_task(sample_rss(pid, stop, peaks))
    attacker = await asyncio.create_subprocess_exec(
        *attacker_argv(args, port, cpu), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        await asyncio.sleep(2)  # let the attack build up
        latencies = await normal_client(port, args.seconds, retries, args.interval)
    finally:
        assert attacker.stdin is not None
        attacker.stdin.close()
        out, _ = await asyncio.wait_for(attacker.communicate(), 60)
        stop.set()
        await sampler
    done: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return latencies, max(peaks), done


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.2f}"


async def hammer(port: int, request: bytes, end: float, statuses: Counter[int]) -> None:
    client = RawClient(HOST, port)
    try:
        while time.monotonic() < end:
            statuses[(await client.call(request))[0]] += 1
    finally:
        await client.close()


async def read_costs(args: argparse.Namespace, guard_cpu: str | None, client_cpu: str | None) -> list[list[str]]:
    """The guard's CPU per request, 4 clients back to back for ``--cost-seconds`` each: a /metrics scrape
    rendered by the app (``read_rate = 0``), the same scrape refused by the edge (429, read rate spent), and
    ``/guard/health`` (the app, nothing rendered) for scale."""
    rows = []
    sim_port = free_port()
    sim_url = f"http://{HOST}:{sim_port}"
    with process("sim", pinned(sim_argv(sim_port, "--mode", "zero"), client_cpu), sim_url):
        for label, path, rate in (
            ("/metrics rendered (read_rate = 0)", "/metrics", "0"),
            ("/metrics refused by the edge (429)", "/metrics", "0.001"),
            ("/guard/health (the app, for scale)", "/guard/health", "0"),
        ):
            port = free_port()
            argv = pinned(guard_argv(port, sim_url, 4), guard_cpu)
            env = {"GUARD__SERVER__READ_RATE": rate}
            with process("guard", argv, f"http://{HOST}:{port}", health="/guard/health", env=env) as guard:
                get = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
                statuses: Counter[int] = Counter()
                cpu0, t0 = cpu_seconds(guard.popen.pid), time.monotonic()
                await asyncio.gather(*(hammer(port, get, t0 + args.cost_seconds, statuses) for _ in range(4)))
                cpu, wall = cpu_seconds(guard.popen.pid) - cpu0, time.monotonic() - t0
            n = sum(statuses.values())
            rows.append(
                [label, f"{n / wall:.0f}", f"{cpu / n * 1e6:.0f}", ", ".join(f"{k} x{v}" for k, v in statuses.items())]
            )
    return rows


async def main_async(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.idle_conns * 2 + 1024)), hard))
    pinning = not args.no_pin and bool(shutil.which("taskset")) and pin_self(args.client_cpu)
    guard_cpu, client_cpu = (args.guard_cpu, args.client_cpu) if pinning else (None, None)
    sim_port, guard_port = free_port(), free_port()
    sim_url, guard_url = f"http://{HOST}:{sim_port}", f"http://{HOST}:{guard_port}"
    with (
        process("sim", pinned(sim_argv(sim_port, "--mode", "zero", "--slots", "8"), client_cpu), sim_url),
        process(
            "guard", pinned(guard_argv(guard_port, sim_url, 4), guard_cpu), guard_url, health="/guard/health"
        ) as guard,
    ):
        pid = guard.popen.pid
        idle_retries: list[int] = []
        retries: list[int] = []
        await normal_client(guard_port, 1.0, idle_retries, 0.0)  # warm-up
        before_idle = sim_requests(sim_url)
        cpu0 = cpu_seconds(pid)
        idle = await normal_client(guard_port, args.seconds, idle_retries, args.interval)
        idle_cpu = cpu_seconds(pid) - cpu0
        idle_rss = rss_mb(pid)
        before_attack = sim_requests(sim_url)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        under, peak, done = await attacked(args, guard_port, pid, retries, client_cpu)
        attack_cpu, attack_wall = cpu_seconds(pid) - cpu0, time.monotonic() - t0
        after_attack = sim_requests(sim_url)
        after_rss = rss_mb(pid)
        log = guard.log_tail(400_000)
    costs = await read_costs(args, guard_cpu, client_cpu) if args.cost_seconds else []
    extra = (after_attack - before_attack) - len(under)
    where = f"guard on CPU {args.guard_cpu}; sim, normal client, attacker on CPU {args.client_cpu}"
    sched = "attacker at SCHED_IDLE" if args.attacker_sched == "idle" else "attacker at normal priority"
    print(f"guard defaults, {args.seconds:.0f} s per phase; attack: {args.flooders} header flooders (15 MB each),")
    print(f"{args.stalled} stalled 15 MB bodies, {args.idle_conns} idle connections, {args.scrapers} /metrics scrapers")
    pace = f"one request every {args.interval * 1000:.0f} ms" if args.interval else "requests back to back"
    print(f"set-up: {where if pinning else 'no pinning'}, {sched}; normal client: {pace}")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print(
        table(
            ["phase", "requests", "p50 ms", "p99 ms", "guard RSS MB", "guard CPU"],
            [
                ["idle", len(idle), ms(idle, 50), ms(idle, 99), f"{idle_rss:.0f}", f"{idle_cpu / args.seconds:.0%}"],
                [
                    "attacked",
                    len(under),
                    ms(under, 50),
                    ms(under, 99),
                    f"{peak:.0f} (peak), {after_rss:.0f} after",
                    f"{attack_cpu / attack_wall:.0%}",
                ],
            ],
        )
    )
    print()
    ratio = percentile(under, 50) / percentile(idle, 50)
    print(f"p50 attacked / idle: {ratio:.2f}x")
    secs = done.pop("seconds")
    rates = ", ".join(f"{k} {v:.0f} ({v / secs:.0f}/s)" for k, v in sorted(done.items()))
    print(f"the attack ({secs:.1f} s): {rates}")
    print(
        f"normal requests sent again: idle {len(idle_retries)}, attacked {len(retries)} "
        f"(statuses {sorted(set(retries))}, 0 = connection closed)"
    )
    print(
        f"upstream requests beyond the normal client's during the attack: {extra} (idle phase: "
        f"{before_attack - before_idle - len(idle)})"
    )
    if costs:
        print()
        print(table(["one read", "requests/s", "guard CPU us per request", "statuses"], costs))
    counts = {s: log.count(f" {s} from ") for s in (431, 408, 413, 429, 503)}
    print(
        "edge refusals logged (rate-limited lines, not counts): "
        + ", ".join(f"{s} x{n}" for s, n in counts.items())
        + f"; proxy budget 429 x{log.count('status=429')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--flooders", type=int, default=20)
    parser.add_argument("--stalled", type=int, default=40)
    parser.add_argument("--idle-conns", type=int, default=1000)
    parser.add_argument("--scrapers", type=int, default=150)
    parser.add_argument("--interval", type=float, default=0.01, help="the normal client's pace (0: back to back)")
    parser.add_argument("--cost-seconds", type=float, default=3.0, help="per read in the cost table (0: skip)")
    parser.add_argument("--guard-cpu", default="0", help="CPU list for the guard (taskset)")
    parser.add_argument("--client-cpu", default="1", help="CPU list for the sim, the normal client, the attacker")
    parser.add_argument("--no-pin", action="store_true", help="run everything unpinned")
    parser.add_argument("--attacker-sched", choices=["idle", "normal"], default="idle")
    parser.add_argument("--attack", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the attacker process
    args = parser.parse_args()
    if args.attack is not None:
        if args.attacker_sched == "idle" and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.idle_conns * 2 + 1024)), hard))
        asyncio.run(attack(args))
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
