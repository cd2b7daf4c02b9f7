#!/usr/bin/env python3
"""Does anyone listening on GET /guard/events cost the proxy? The guard's overhead with 0 vs N listeners.

One guard (cap --cap) in front of ``python -m gateway_guard.sim --mode zero``; in each round, in alternating
order, the same latency phase (one client, back to back: p50 / p99) and throughput phase (--concurrency
clients in a closed loop: req/s) as benchmarks/overhead.py, once with no SSE listener and once with
--listeners idle clients connected to /guard/events (each reading and counting its events). Medians over
the rounds. The guard is pinned to --proxy-cpu, the sim and this load generator to --client-cpu.

    .venv/bin/python benchmarks/events_listeners.py [--listeners 100] [--rounds 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    HOST,
    free_port,
    guard_argv,
    median,
    percentile,
    pin_self,
    pinned,
    process,
    raw_post,
    sim_argv,
    table,
)
from overhead import Target, chat_body, latency_phase, throughput_phase


class Listeners:
    """``n`` raw SSE clients of /guard/events; ``events`` counts what each has received."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.events = [0] * n
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._connected = 0

    async def _one(self, i: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, self.port)
        try:
            writer.write(f"GET /guard/events HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n\r\n".encode())
            await reader.readuntil(b"\r\n\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    return
                if line.startswith(b"event: capacity") or b"event: capacity" in line:
                    self.events[i] += 1
                    if self.events[i] == 1:
                        self._connected += 1
                        if self._connected == self.n:
                            self._ready.set()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def __aenter__(self) -> Listeners:
        if self.n:
            self._tasks = [asyncio.create_task(self._one(i)) for i in range(self.n)]
            await asyncio.wait_for(self._ready.wait(), 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def measure(port: int, listeners: int, args: argparse.Namespace) -> dict[str, float]:
    target = Target("guard", port)
    request = raw_post(HOST, port, "/v1/chat/completions", chat_body(False))
    async with Listeners(port, listeners) as sse:
        before = sum(sse.events)
        started = time.perf_counter()
        samples, lat_errors = await latency_phase(target, request, args.requests, args.seconds)
        rps, errors = await throughput_phase(target, request, args.concurrency, args.seconds)
        elapsed = time.perf_counter() - started
        events = (sum(sse.events) - before) / listeners / elapsed if listeners else 0.0
    return {
        "p50_ms": percentile(samples, 50) * 1000, "p99_ms": percentile(samples, 99) * 1000, "rps": rps,
        "errors": lat_errors + errors, "events_per_listener_per_s": events,
    }


async def rounds(port: int, args: argparse.Namespace) -> dict[int, list[dict[str, float]]]:
    results: dict[int, list[dict[str, float]]] = {0: [], args.listeners: []}
    for n in range(args.rounds):
        order = [0, args.listeners] if n % 2 == 0 else [args.listeners, 0]
        for listeners in order:
            figures = await measure(port, listeners, args)
            results[listeners].append(figures)
            print(f"round {n + 1} listeners={listeners}: " +
                  " ".join(f"{k}={v:.2f}" for k, v in figures.items()), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listeners", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="each phase's length (default 4)")
    parser.add_argument("--requests", type=int, default=1500, help="latency phase requests (default 1500)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cap", type=int, default=64)
    parser.add_argument("--proxy-cpu", default="0")
    parser.add_argument("--client-cpu", default="1")
    args = parser.parse_args()
    sim_port, guard_port = free_port(), free_port()
    with process("sim", pinned(sim_argv(sim_port, "--mode", "zero"), args.client_cpu), f"http://{HOST}:{sim_port}"):
        guard_cmd = pinned(guard_argv(guard_port, f"http://{HOST}:{sim_port}", args.cap, "--log-level", "warning"),
                           args.proxy_cpu)
        with process("guard", guard_cmd, f"http://{HOST}:{guard_port}", health="/guard/health"):
            pin_self(args.client_cpu)
            results = asyncio.run(rounds(guard_port, args))
    rows = []
    for listeners, figures in results.items():
        rows.append([listeners] + [f"{median([f[k] for f in figures]):.2f}"
                                   for k in ("p50_ms", "p99_ms", "rps", "events_per_listener_per_s")]
                    + [int(sum(f["errors"] for f in figures))])
    print(f"\nguard cap {args.cap}, sim --mode zero, {args.rounds} rounds (medians), {args.concurrency} clients, "
          f"{args.seconds:g} s phases\n")
    print(table(["SSE listeners", "p50 ms", "p99 ms", "req/s", "events / listener / s", "errors"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
