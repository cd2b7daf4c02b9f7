"""Helpers for the edge tests: a ``gateway-guard`` process from a TOML config, a recording upstream on a raw
127.0.0.1 socket, raw-socket HTTP/1.1 exchanges, and the guard's RSS.

    async with RecordingUpstream() as up:                      # answers every request, remembers each
        with edge_guard(up.url, server={"header_timeout": 1}) as guard:
            status, head, body = await raw_exchange(guard.port, b"GET /guard/health HTTP/1.1\\r\\n...")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.llamacpp import REPO_ROOT, free_port, stop_process, wait_healthy

GUARD_BIN = Path(sys.executable).with_name("gateway-guard")
OK_BODY = b'{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}'


# -- a recording upstream -----------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class RecordingUpstream:
    """An HTTP/1.1 server on 127.0.0.1 that answers 200 JSON to everything and records every request but the
    guard's probes. ``hold`` (cleared): generation requests (POST) wait until it is set, so they hold a slot."""

    requests: list[Seen] = field(default_factory=list)
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _server: asyncio.Server | None = None

    def __post_init__(self) -> None:
        self.hold.set()

    async def __aenter__(self) -> RecordingUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.hold.set()
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [(n.strip().lower(), v.strip()) for n, _, v in (ln.partition(":") for ln in lines[1:] if ln)]
                length = int(dict(headers).get("content-length", "0"))
                body = await reader.readexactly(length)
                if not (method == "GET" and target in ("/health", "/metrics", "/v1/models", "/api/tags", "/slots")):
                    self.requests.append(Seen(method, target, headers, body))
                    if method == "POST":
                        await self.hold.wait()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(OK_BODY)
                    + OK_BODY
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def targets(self) -> list[str]:
        return [r.target for r in self.requests]


# -- the guard as a process ---------------------------------------------------------------------------------


@dataclass
class Guard:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    final_log: str | None = None  # the whole log, kept once the process has ended

    def log(self) -> str:
        if self.final_log is not None:
            return self.final_log
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def capacity(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/guard/capacity", timeout=10).json()
        return data

    def in_flight(self) -> int:
        ups = self.capacity()["upstreams"].values()
        return sum(u["in_flight"] for u in ups) + sum(u["queued"] for u in ups)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def write_config(path: Path, tables: Mapping[str, Mapping[str, Any]]) -> None:
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))


@contextlib.contextmanager
def edge_guard(
    upstream: str,
    *,
    server: Mapping[str, Any] | None = None,
    upstream_table: Mapping[str, Any] | None = None,
    tables: Mapping[str, Mapping[str, Any]] | None = None,
    env: Mapping[str, str] | None = None,
    extra: tuple[str, ...] = (),
    startup_timeout: float = 30.0,
) -> Iterator[Guard]:
    """``gateway-guard --config FILE`` (one upstream ``gpu``); stdout and stderr go to one log file.

    Ready when ``GET /guard/health`` answers 200. On exit this process only (by its PID) gets SIGTERM, then
    SIGKILL after 5 s.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "guard.toml"
        all_tables: dict[str, Mapping[str, Any]] = {
            "server": {"port": port, **(server or {})},
            "upstreams.gpu": {"url": upstream, "max_inflight": 2, "probe": "off", **(upstream_table or {})},
            **(tables or {}),
        }
        write_config(config, all_tables)
        log_path = Path(tmp) / "guard.log"
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("GUARD")}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(GUARD_BIN), "--config", str(config), *extra],
                cwd=REPO_ROOT,
                env={**base_env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        guard = Guard(f"http://127.0.0.1:{port}", port, proc, log_path)
        try:
            wait_healthy(proc, f"{guard.url}/guard/health", startup_timeout, lambda: guard.log()[-3000:])
            yield guard
        finally:
            stop_process(proc)
            guard.final_log = log_path.read_text(errors="replace")


# -- raw HTTP/1.1 -------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int  # 0: the connection closed without an answer
    head: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(method: str, target: str, headers: Mapping[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "host: 127.0.0.1"]
    hs = dict(headers or {})
    if body and "content-length" not in {k.lower() for k in hs}:
        hs["content-length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in hs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_answer(reader: asyncio.StreamReader, timeout: float = 30.0) -> Answer:
    """One response (Content-Length or chunked or to EOF); status 0 if the connection closed first."""
    async with asyncio.timeout(timeout):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        except (asyncio.IncompleteReadError, ConnectionError):
            return Answer(0, "", b"")
        status = int(head.split(" ", 2)[1])
        low = head.lower()
        if "content-length:" in low:
            length = int(low.split("content-length:", 1)[1].split("\r\n", 1)[0])
            return Answer(status, head, await reader.readexactly(length))
        if "transfer-encoding: chunked" in low:
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    return Answer(status, head, body)
                body += chunk[:-2]
        return Answer(status, head, await reader.read())


async def raw_exchange(port: int, data: bytes, *, timeout: float = 30.0) -> Answer:
    """Open a connection, send ``data``, read one answer, close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return await read_answer(reader, timeout)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def connections(port: int, n: int) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    conns = []
    try:
        for _ in range(n):
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        yield conns
    finally:
        for _, w in conns:
            w.close()


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the peer sends until it closes (raises TimeoutError if it does not within ``timeout``)."""
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionError):
            return await reader.read()
    return b""


async def closed_within(reader: asyncio.StreamReader, wait: float) -> bool:
    """Whether the peer closed the connection within ``wait`` seconds."""
    try:
        await closed_by_peer(reader, wait)
    except TimeoutError:
        return False
    return True
