"""The adaptive limit against a real llama.cpp server (xllamacpp, tiny random model), guard in this loop.

Starting at a ceiling of 16 in front of a server with 4 slots, under sustained load from 16 clients, the limit
must come down to the server's slot count and stay at or near it, with ``llamacpp:requests_deferred`` at 0
most of the time; when the server is restarted (same port) with 2 slots, the limit must follow it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

import tests.support.llamacpp as support
from gateway_guard.admission.limit import AdaptiveLimit
from tests.integration.conftest import CHAT_PATH, guard_in_process, guard_settings, prometheus
from tests.support.llamacpp import ensure_model, free_port, server_process

pytest.importorskip("xllamacpp")
pytestmark = pytest.mark.llamacpp

CLIENTS = 16
LANE = {"x-guard-lane": "interactive"}  # no headroom: the whole limit is this lane's, so it can fill the slots
BODY = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "hello world"}],
    "max_tokens": 160,
    "ignore_eos": True,  # exactly max_tokens each
}


@contextlib.contextmanager
def llama_on(port: int, slots: int) -> Iterator[str]:
    argv = [sys.executable, str(Path(support.__file__).resolve()), "serve", "--model", str(ensure_model("tiny"))]
    argv += ["--port", str(port), "--slots", str(slots), "--ctx", str(slots * 1024)]
    with server_process(argv, f"http://127.0.0.1:{port}") as url:
        yield url


@dataclass
class Run:
    trajectory: list[tuple[float, int, str]] = field(default_factory=list)  # (t, limit, reason)
    deferred: list[tuple[float, int]] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0


async def load(client: httpx.AsyncClient, guard: str, run: Run, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            r = await client.post(f"{guard}{CHAT_PATH}", json=BODY, headers=LANE)
        except httpx.TransportError:
            run.errors += 1
            continue
        if r.status_code == 200:
            run.tokens += r.json()["usage"]["completion_tokens"]
        else:
            run.errors += 1
            await asyncio.sleep(0.05)  # the server is restarting: do not spin


async def watch(client: httpx.AsyncClient, llama: str, limit: AdaptiveLimit, run: Run, t0: float) -> None:
    while True:
        now = time.monotonic() - t0
        if not run.trajectory or run.trajectory[-1][1] != limit.limit:
            run.trajectory.append((round(now, 2), limit.limit, limit.reason))
        with contextlib.suppress(httpx.HTTPError):
            values = prometheus((await client.get(f"{llama}/metrics")).text)
            run.deferred.append((now, int(values["llamacpp:requests_deferred"])))
        await asyncio.sleep(0.1)  # sampling another server's gauge: there is no event to wait on


def time_at(run: Run, start: float, end: float, values: set[int]) -> float:
    """The share of [start, end] the limit spent at one of ``values``."""
    points = [(t, lim) for t, lim, _ in run.trajectory]
    inside = 0.0
    for i, (t, lim) in enumerate(points):
        nxt = points[i + 1][0] if i + 1 < len(points) else end
        lo, hi = max(t, start), min(nxt, end)
        if hi > lo and lim in values:
            inside += hi - lo
    return inside / (end - start)


def settled_at(run: Run, after: float) -> list[int]:
    return [lim for t, lim, _ in run.trajectory if t >= after]


async def test_the_limit_finds_the_slots_from_a_ceiling_of_16_and_follows_a_restart_with_fewer() -> None:
    port = free_port()
    llama = f"http://127.0.0.1:{port}"
    settings = guard_settings(
        llama, **{"upstreams.default.limit": "adaptive", "upstreams.default.ceiling": 16,
                  "upstreams.default.probe_interval": 0.25, "upstreams.default.max_inflight": 16}
    )  # fmt: skip
    run = Run()
    server = llama_on(port, slots=4)
    await asyncio.to_thread(server.__enter__)
    try:
        async with guard_in_process(settings) as (guard, state), httpx.AsyncClient(timeout=60) as client:
            state.start()
            limit = state.gates["default"].limit_source
            assert isinstance(limit, AdaptiveLimit) and limit.limit == 16
            t0 = time.monotonic()
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch(client, llama, limit, run, t0))
            clients = [asyncio.create_task(load(client, guard, run, stop)) for _ in range(CLIENTS)]

            await asyncio.sleep(12)  # sustained load on 4 slots
            phase1 = list(run.trajectory)
            assert limit.limit in (3, 4, 5), run.trajectory
            settled = next(t for t, lim, _ in run.trajectory if lim <= 5)
            assert settled < 2.0, f"took {settled} s to come down: {run.trajectory}"
            # at or near the 4 slots most of the time: a probe sampled while slots turn over may dip it briefly
            near = time_at(run, settled, time.monotonic() - t0, {3, 4, 5})
            assert near >= 0.7, (near, run.trajectory)
            late = [d for t, d in run.deferred if t > settled + 1.0]
            assert sum(1 for d in late if d > 0) <= 0.2 * len(late), f"deferred often after settling: {late}"

            restart = time.monotonic() - t0
            await asyncio.to_thread(server.__exit__, None, None, None)
            server = llama_on(port, slots=2)
            await asyncio.to_thread(server.__enter__)
            await asyncio.sleep(10)  # the same load on 2 slots
            assert limit.limit in (2, 3), run.trajectory[len(phase1) - 1 :]
            assert min(settled_at(run, restart)) >= 1
            stop.set()
            await asyncio.gather(*clients)
            watcher.cancel()
    finally:
        server.__exit__(None, None, None)
    print("trajectory (t, limit, reason):", *run.trajectory, sep="\n  ")
