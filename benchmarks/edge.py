"""The guard's edge under attack: a normal client's latency and the guard's RSS, idle vs attacked, in one run.

One ``gateway-guard`` process with default [server] settings (``--upstream SIM --max-inflight 4``) in front of
``python -m gateway_guard.sim --mode zero``. Phases, each ``--seconds`` long:

* **idle**: one normal client sends small non-streamed chat completions back to back (p50 / p99 latency);
* **attacked**: the same client while, at once,
  - a header flood: ``--flooders`` connections, each streaming 15 MB of one header line that never ends
    (reconnecting when cut);
  - stalled bodies: ``--stalled`` connections, each declaring a 15 MB body and sending it one byte short;
  - ``--idle-conns`` silent connections (reopened when closed);
  - a ``/metrics`` flood: ``--scrapers`` clients scraping back to back.

The guard's RSS is sampled every 100 ms (peak printed). The sim's ``sim:requests_total`` is read before and
after: the attacks must add nothing to it (only the normal client's requests reach the upstream).

Usage: ``.venv/bin/python benchmarks/edge.py [--seconds 10]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HOST, HttpError, RawClient, free_port, guard_argv, percentile, process, raw_post, sim_argv, table

MB = 1024 * 1024
CHAT = b'{"model":"sim","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}'


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sim_requests(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("sim:requests_total"):
            return int(float(line.rsplit(" ", 1)[1]))
    raise RuntimeError("sim:requests_total not found")


async def normal_client(port: int, seconds: float, retries: list[int]) -> list[float]:
    """Requests back to back; one that fails (a closed connection, a 503 at max_connections) is sent again on
    a new connection and counted in ``retries``, its latency including the retry."""
    client = RawClient(HOST, port)
    request = raw_post(HOST, port, "/v1/chat/completions", CHAT, {"x-guard-lane": "interactive"})
    latencies: list[float] = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
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


async def header_flooder(port: int, stop: asyncio.Event) -> None:
    chunk = b"a" * (256 * 1024)
    while not stop.is_set():
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(HOST, port)
            try:
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-flood: ")
                for _ in range(60):
                    if stop.is_set():
                        break
                    writer.write(chunk)
                    await writer.drain()
            finally:
                writer.close()
        await asyncio.sleep(0.05)


async def stalled_body(port: int, stop: asyncio.Event) -> None:
    size = 15 * MB
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {size}\r\n\r\n"
    )
    piece = b"a" * MB
    while not stop.is_set():
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection(HOST, port)
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


async def idle_connections(port: int, n: int, stop: asyncio.Event) -> None:
    async def one() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection(HOST, port)
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


async def scraper(url: str, stop: asyncio.Event) -> int:
    done = 0
    async with httpx.AsyncClient(timeout=30) as client:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                await client.get(f"{url}/metrics")
                done += 1
    return done


async def sample_rss(pid: int, stop: asyncio.Event, peaks: list[float]) -> None:
    with contextlib.suppress(OSError):
        while not stop.is_set():
            peaks.append(rss_mb(pid))
            await asyncio.sleep(0.1)


async def attacked(
    args: argparse.Namespace, port: int, url: str, pid: int, retries: list[int]
) -> tuple[list[float], float, int]:
    stop = asyncio.Event()
    peaks: list[float] = []
    tasks = [asyncio.create_task(header_flooder(port, stop)) for _ in range(args.flooders)]
    tasks += [asyncio.create_task(stalled_body(port, stop)) for _ in range(args.stalled)]
    tasks.append(asyncio.create_task(idle_connections(port, args.idle_conns, stop)))
    scrapers = [asyncio.create_task(scraper(url, stop)) for _ in range(args.scrapers)]
    tasks.append(asyncio.create_task(sample_rss(pid, stop, peaks)))
    await asyncio.sleep(2)  # let the attack build up
    latencies = await normal_client(port, args.seconds, retries)
    stop.set()
    scraped = sum(await asyncio.gather(*scrapers))
    async with asyncio.timeout(30):
        await asyncio.gather(*tasks, return_exceptions=True)
    return latencies, max(peaks), scraped


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.2f}"


async def main_async(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.idle_conns * 2 + 1024)), hard))
    sim_port, guard_port = free_port(), free_port()
    sim_url, guard_url = f"http://{HOST}:{sim_port}", f"http://{HOST}:{guard_port}"
    with (
        process("sim", sim_argv(sim_port, "--mode", "zero", "--slots", "8"), sim_url),
        process("guard", guard_argv(guard_port, sim_url, 4), guard_url, health="/guard/health") as guard,
    ):
        pid = guard.popen.pid
        idle_retries: list[int] = []
        retries: list[int] = []
        await normal_client(guard_port, 1.0, idle_retries)  # warm-up
        before_idle = sim_requests(sim_url)
        idle = await normal_client(guard_port, args.seconds, idle_retries)
        idle_rss = rss_mb(pid)
        before_attack = sim_requests(sim_url)
        under, peak, scraped = await attacked(args, guard_port, guard_url, pid, retries)
        after_attack = sim_requests(sim_url)
        after_rss = rss_mb(pid)
        log = guard.log_tail(200_000)
    extra = (after_attack - before_attack) - len(under)
    print(f"guard defaults, {args.seconds:.0f} s per phase; attack: {args.flooders} header flooders (15 MB each),")
    print(f"{args.stalled} stalled 15 MB bodies, {args.idle_conns} idle connections, {args.scrapers} /metrics scrapers")
    print()
    print(
        table(
            ["phase", "requests", "p50 ms", "p99 ms", "guard RSS MB"],
            [
                ["idle", len(idle), ms(idle, 50), ms(idle, 99), f"{idle_rss:.0f}"],
                ["attacked", len(under), ms(under, 50), ms(under, 99), f"{peak:.0f} (peak), {after_rss:.0f} after"],
            ],
        )
    )
    print()
    ratio = percentile(under, 50) / percentile(idle, 50)
    print(f"p50 attacked / idle: {ratio:.2f}x;  /metrics scrapes answered: {scraped}")
    print(
        f"normal requests sent again: idle {len(idle_retries)}, attacked {len(retries)} "
        f"(statuses {sorted(set(retries))}, 0 = connection closed)"
    )
    print(
        f"upstream requests beyond the normal client's during the attack: {extra} (idle phase: "
        f"{before_attack - before_idle - len(idle)})"
    )
    print(
        f"edge refusals logged: 431 x{log.count(' 431 from ')}, 408 x{log.count(' 408 from ')}, "
        f"413 x{log.count(' 413 from ')}, 503 x{log.count(' 503 from ')}, budget 429 x{log.count('status=429')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--flooders", type=int, default=20)
    parser.add_argument("--stalled", type=int, default=40)
    parser.add_argument("--idle-conns", type=int, default=1000)
    parser.add_argument("--scrapers", type=int, default=150)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
