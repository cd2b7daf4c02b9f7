"""Three ``gateway-guard`` processes sharing one redis-server in front of one sim process, over real sockets.

The sim counts what it holds itself (``sim:max_concurrent_seen``: processing + deferred, the most ever at once),
so the cap is checked as the server sees it, at every moment, not by sampling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.integration.conftest import GUARD_BIN, _hermetic_env, prometheus
from tests.support.llamacpp import REPO_ROOT, free_port, sim_server, stop_process, wait_healthy
from tests.support.redis import RedisServer

CAP = 2
LEASE = 2.0
CHAT = "/v1/chat/completions"


def config(path: Path, upstream: str, redis_url: str, *, replica: str, headroom: int = 0) -> Path:
    path.write_text(
        f"""
[server]
port = {free_port()}
default_lane = "batch"

[lanes.interactive]
priority = 0
queue_timeout = 60

[lanes.batch]
priority = 1
queue_timeout = 120
headroom = {headroom}

[upstreams.sim]
url = "{upstream}"
max_inflight = {CAP}
probe = "off"

[cluster]
redis_url = "{redis_url}"
replica_id = "{replica}"
lease_seconds = {LEASE}
"""
    )
    return path


class Guard:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: IO[bytes]) -> None:
        self.proc, self.url, self.log = proc, url, log

    def tail(self, size: int = 3000) -> str:
        self.log.seek(0)
        return self.log.read()[-size:].decode(errors="replace")


@contextlib.contextmanager
def guard(config_path: Path, *extra: str) -> Iterator[Guard]:
    port = int(next(line for line in config_path.read_text().splitlines() if line.startswith("port")).split("=")[1])
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [str(GUARD_BIN), "--config", str(config_path), *extra],
            cwd=REPO_ROOT,
            env=_hermetic_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        g = Guard(proc, url, log)
        try:
            wait_healthy(proc, f"{url}/guard/health", 30, g.tail)
            yield g
        finally:
            stop_process(proc, grace=10)


@contextlib.contextmanager
def three_guards(redis: RedisServer, sim: str, tmp: Path, *, headroom: int = 0) -> Iterator[list[Guard]]:
    with contextlib.ExitStack() as stack:
        guards = [
            stack.enter_context(guard(config(tmp / f"{name}.toml", sim, redis.url, replica=name, headroom=headroom)))
            for name in "abc"
        ]
        yield guards


async def sim_seen(client: httpx.AsyncClient, sim: str) -> float:
    return prometheus((await client.get(f"{sim}/metrics")).text)["sim:max_concurrent_seen"]


async def stream(client: httpx.AsyncClient, guard: Guard, lane: str, tokens: int) -> tuple[float, float]:
    """One streamed chat completion; (seconds to the first byte, seconds in all). Raises on a non-200."""
    body = {"model": "sim", "stream": True, "max_tokens": tokens, "messages": [{"role": "user", "content": "hi"}]}
    started = time.monotonic()
    first = None
    async with client.stream("POST", guard.url + CHAT, json=body, headers={"X-Guard-Lane": lane}) as response:
        assert response.status_code == 200, (response.status_code, await response.aread())
        async for _ in response.aiter_bytes():
            first = first if first is not None else time.monotonic() - started
    return first or 0.0, time.monotonic() - started


@pytest.fixture
def sim() -> Iterator[str]:
    with sim_server(slots=8, mode="generate", tokens_per_second=100, ttft=0.02, no_ollama=True) as url:
        yield url


async def test_three_replicas_at_three_times_the_cap_hold_it_and_serve_interactive_first(
    own_redis: RedisServer, sim: str, tmp_path: Path
) -> None:
    # headroom 1 (the default): batch holds at most cap - 1 cluster-wide and at each replica's own line, so an
    # interactive request finds a slot in both (without it, it waits behind the batch requests already past
    # its replica's own line: docs/cluster.md)
    with three_guards(own_redis, sim, tmp_path, headroom=1) as guards:
        async with httpx.AsyncClient(timeout=120) as client:
            loop = asyncio.get_running_loop()
            stop_at = loop.time() + 8.0
            waits: dict[str, list[float]] = {"interactive": [], "batch": []}

            async def batch_client(i: int) -> None:  # 3 x the cap of batch clients in closed loops
                while loop.time() < stop_at:
                    first, _ = await stream(client, guards[i % 3], "batch", 20)
                    waits["batch"].append(first)

            async def interactive_client() -> None:  # one interactive request a second, at replica a only
                while loop.time() < stop_at:
                    first, _ = await stream(client, guards[0], "interactive", 5)
                    waits["interactive"].append(first)
                    await asyncio.sleep(1.0)

            tasks = [asyncio.create_task(batch_client(i)) for i in range(3 * CAP)]
            tasks.append(asyncio.create_task(interactive_client()))
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
            assert await sim_seen(client, sim) <= CAP, [g.tail() for g in guards]
            assert len(waits["batch"]) >= 10 and len(waits["interactive"]) >= 4
            waits_sorted = {k: sorted(v) for k, v in waits.items()}
            median = {k: v[len(v) // 2] for k, v in waits_sorted.items()}
            # batch requests queue behind one another at all three replicas; interactive ones go first
            assert median["interactive"] < median["batch"], median
            capacity = (await client.get(f"{guards[1].url}/guard/capacity")).json()
            assert capacity["upstreams"]["sim"]["limit"] == CAP


async def test_kill_9_of_a_replica_with_streams_in_flight_frees_its_slots_within_one_lease(
    own_redis: RedisServer, sim: str, tmp_path: Path
) -> None:
    with three_guards(own_redis, sim, tmp_path) as guards:
        a, _, c = guards
        async with httpx.AsyncClient(timeout=120) as client:
            held = [asyncio.create_task(stream(client, c, "batch", 2000)) for _ in range(CAP)]  # 20 s each
            deadline = time.monotonic() + 20
            while (await client.get(f"{c.url}/guard/capacity")).json()["upstreams"]["sim"]["in_flight"] < CAP:
                assert time.monotonic() < deadline, c.tail()
                await asyncio.sleep(0.05)  # polling another process's state: no event to wait on
            waiting = [asyncio.create_task(stream(client, a, "batch", 5)) for _ in range(CAP)]
            await asyncio.sleep(0.5)
            assert not any(t.done() for t in waiting)  # the cap is taken by c's streams
            os.kill(c.proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*waiting), 30)
            took = time.monotonic() - killed
            assert took < LEASE + 1.5, took  # one lease, plus a renewal's jitter and a request
            assert all(first < LEASE + 1.5 for first, _ in results)
            for task in held:
                with contextlib.suppress(httpx.HTTPError, AssertionError):
                    await task
            assert await sim_seen(client, sim) <= CAP
            deadline = time.monotonic() + LEASE  # the cluster-wide figures are as fresh as the last renewal
            while json.loads((await client.get(f"{a.url}/guard/capacity")).text)["upstreams"]["sim"]["in_flight"]:
                assert time.monotonic() < deadline, "leases left after the streams ended"
                await asyncio.sleep(0.05)  # polling another process's state: no event to wait on


def children_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def alive(pid: str) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_workers_without_cluster_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway_guard.cli import ExitCode, build_parser, run

    args = build_parser().parse_args(["--upstream", "http://127.0.0.1:9", "--workers", "2"])
    assert run(args) == ExitCode.CONFIG_ERROR
    assert "needs a [cluster] section" in capsys.readouterr().err


async def test_workers_share_the_cap_and_stop_together(own_redis: RedisServer, sim: str, tmp_path: Path) -> None:
    with guard(config(tmp_path / "w.toml", sim, own_redis.url, replica="w"), "--workers", "2") as g:
        children = children_of(g.proc.pid)
        assert len(children) == 2
        async with httpx.AsyncClient(timeout=60) as client:
            results = await asyncio.wait_for(asyncio.gather(*(stream(client, g, "batch", 20) for _ in range(8))), 60)
            assert len(results) == 8
            assert await sim_seen(client, sim) <= CAP
        g.proc.send_signal(signal.SIGTERM)
        assert g.proc.wait(timeout=30) == 0
        assert not any(alive(pid) for pid in children)


async def test_redis_restarted_mid_run_never_lets_more_than_the_cap_through(
    own_redis: RedisServer, sim: str, tmp_path: Path
) -> None:
    from redis.asyncio import Redis

    with three_guards(own_redis, sim, tmp_path) as guards:
        async with httpx.AsyncClient(timeout=120) as client:
            loop = asyncio.get_running_loop()
            stop_at = loop.time() + 9.0
            served = 0

            async def batch_client(i: int) -> None:
                nonlocal served
                while loop.time() < stop_at:
                    await stream(client, guards[i % 3], "batch", 20)
                    served += 1

            tasks = [asyncio.create_task(batch_client(i)) for i in range(3 * CAP)]
            await asyncio.sleep(2.0)
            own_redis.stop()
            await asyncio.sleep(2.5)
            own_redis.start()  # empty: the replicas put their leases back, after a quiet period
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
            assert served >= 10
            assert await sim_seen(client, sim) <= CAP, [g.tail() for g in guards]
        logs = [g.tail(10_000_000) for g in guards]
        assert all("shared gate unavailable" in log and "back on the shared gate" in log for log in logs), logs
        redis = Redis.from_url(own_redis.url)
        try:
            deadline = time.monotonic() + LEASE + 1
            while await redis.zcard("gg:{sim}:leases"):
                assert time.monotonic() < deadline, "leases left after the run"
                await asyncio.sleep(0.05)  # polling the server's state: no event to wait on
        finally:
            await redis.aclose()
