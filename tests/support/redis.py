"""A real ``redis-server`` (the Debian package) on a free 127.0.0.1 port, in a temp dir, with no persistence.

``RedisServer`` can be stopped and started again on the same port (a restart loses every key, as a real one
without persistence does); it waits for the server's own "Ready to accept connections" line, not for a timer.
Only the process it started is ever signalled, by its PID.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.llamacpp import HOST, ServerStartError, free_port

REDIS_BIN = shutil.which("redis-server")
READY = b"Ready to accept connections"


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        if REDIS_BIN is None:
            raise ServerStartError("redis-server is not installed (./run-tests installs the Debian package)")
        assert not self.running, "already running"
        # --port must come first so redis-server reads the rest as options; no RDB, no AOF: nothing survives
        args = [REDIS_BIN, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "notice"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        seen: list[bytes] = []
        for line in self.proc.stdout:  # blocks on the server's own output: its "ready" line is the event
            seen.append(line)
            if READY in line:
                break
            if time.monotonic() > deadline:
                break
        else:
            self.proc.wait()
        if READY not in b"".join(seen):
            self.stop()
            raise ServerStartError("redis-server did not start:\n" + b"".join(seen[-20:]).decode(errors="replace"))
        # keep draining its output so a chatty server never blocks on a full pipe
        self.proc.stdout.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="guard-redis-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()
