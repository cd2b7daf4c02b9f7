"""Shared parts of the benchmarks: server processes on 127.0.0.1, a lean HTTP/1.1 client, percentiles.

Everything here targets 127.0.0.1 only. Every process a benchmark starts is stopped by its own PID (SIGTERM,
then SIGKILL after 5 s); every loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(argv: Sequence[str], cpus: str | None) -> list[str]:
    """``argv`` under ``taskset -c CPUS`` when that is wanted and available."""
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus, *argv]
    return list(argv)


def pin_self(cpus: str | None) -> bool:
    """Pin this process (the load generator) to ``cpus`` (e.g. ``"1"``); False when not possible."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return False
    wanted = {int(c) for c in cpus.split(",")}
    if not wanted <= os.sched_getaffinity(0):
        return False
    os.sched_setaffinity(0, wanted)
    return True


class ServerStartError(RuntimeError):
    pass


@dataclass
class Proc:
    name: str
    url: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes]

    def log_tail(self, size: int = 3000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-size:].decode(errors="replace")


@contextlib.contextmanager
def process(
    name: str,
    argv: Sequence[str],
    url: str,
    *,
    health: str = "/health",
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> Iterator[Proc]:
    """Start ``argv`` in the repo root, wait until ``url + health`` answers 200, yield; stop it by its PID."""
    import httpx

    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    full_env.update(env or {})
    with tempfile.TemporaryFile() as log:
        popen = subprocess.Popen(list(argv), cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        proc = Proc(name, url, popen, log)
        try:
            deadline = time.monotonic() + timeout
            with httpx.Client(timeout=2.0, trust_env=False) as client:
                while True:
                    if popen.poll() is not None:
                        raise ServerStartError(f"{name} exited with {popen.returncode}:\n{proc.log_tail()}")
                    with contextlib.suppress(httpx.TransportError):
                        if client.get(url + health).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise ServerStartError(f"{name}: {url}{health} not 200 after {timeout} s:\n{proc.log_tail()}")
                    time.sleep(0.1)  # polling a foreign process: there is no event to wait on
            yield proc
        finally:
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
                try:
                    popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait()


def sim_argv(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gateway_guard.sim", "--host", HOST, "--port", str(port), *extra]


def guard_argv(port: int, upstream: str, max_inflight: int, *extra: str) -> list[str]:
    exe = BIN / "gateway-guard"
    # Without the console script (a venv where the package is only on PYTHONPATH), call its main() directly.
    head = [str(exe)] if exe.exists() else [sys.executable, "-c", "from gateway_guard.cli import main; main()"]
    return [*head, "--upstream", upstream, "--max-inflight", str(max_inflight), "--port", str(port), *extra]


# -- statistics ------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# -- a lean HTTP/1.1 client ----------------------------------------------------------------------------------------


class HttpError(Exception):
    pass


class RawClient:
    """One keep-alive HTTP/1.1 connection sending a prebuilt request; several times cheaper than httpx per call.

    A load generator written with it leaves the CPU to the servers under test, so its own cost disturbs a
    2-core machine less. It understands Content-Length and chunked bodies, nothing else.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self._reader, self._writer

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def call(self, request: bytes) -> tuple[int, int]:
        """Send ``request`` (whole, bytes) and read the full response; returns (status, body bytes)."""
        reader, writer = await self._connect()
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            size = 0
            if b"transfer-encoding: chunked" in lower:
                while True:
                    line = await reader.readuntil(b"\r\n")
                    n = int(line.split(b";", 1)[0], 16)
                    if n == 0:
                        await reader.readuntil(b"\r\n")
                        break
                    await reader.readexactly(n + 2)
                    size += n
            else:
                at = lower.find(b"content-length:")
                if at < 0:
                    raise HttpError("response has neither Content-Length nor chunked encoding")
                n = int(lower[at + 15 : lower.index(b"\r\n", at)])
                if n:
                    await reader.readexactly(n)
                size = n
            if b"connection: close" in lower:
                await self.close()
            return status, size
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            await self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc


def raw_post(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def closed_loop(targets: Sequence[tuple[int, bytes]], concurrency: int, seconds: float) -> tuple[float, int]:
    """``concurrency`` clients in closed loops for ``seconds`` after 1 s of warm-up, client ``i`` sending
    ``targets[i % len(targets)]`` (port, raw request) on a kept-alive connection; returns (200s a second, errors)."""
    done = errors = 0
    counting = False

    async def worker(port: int, request: bytes, stop_at: float) -> None:
        nonlocal done, errors
        client = RawClient(HOST, port)
        try:
            for _ in range(10_000_000):  # bound; the deadline ends it long before
                if time.perf_counter() > stop_at:
                    return
                try:
                    status, _ = await client.call(request)
                except HttpError:
                    errors += counting
                    await asyncio.sleep(0.01)
                    continue
                done += counting and status == 200
                errors += counting and status != 200
        finally:
            await client.close()

    stop_at = time.perf_counter() + 1.0 + seconds
    tasks = [asyncio.create_task(worker(*targets[i % len(targets)], stop_at)) for i in range(concurrency)]
    await asyncio.sleep(1.0)
    counting, t0 = True, time.perf_counter()
    await asyncio.wait(tasks, timeout=seconds + 60)
    elapsed, counting = time.perf_counter() - t0, False
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return done / elapsed, errors
