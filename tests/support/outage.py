"""Parts for outage tests and the chaos benchmark: a server process that can be killed and started again on the
same port, the guard as a process with a config file, and a sampler of what llama.cpp holds.

* ``Restartable`` runs one server process (llama.cpp via ``tests/support/llamacpp.py serve``, or the sim),
  ``kill()`` sends SIGKILL to that PID only, ``start()`` starts it again on the same port and waits for
  ``/health``.
* ``guard_with_config`` runs ``gateway-guard --config FILE --port P`` with its log (the access log) in a file.
* ``HeldSampler`` reads ``llamacpp:requests_processing + llamacpp:requests_deferred`` off the server's
  ``/metrics`` every 20 ms in a thread (a sample the server does not answer -- it is down -- is counted apart).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from tests.support.llamacpp import (
    HOST,
    REPO_ROOT,
    SIZES,
    ServerStartError,
    _wait_healthy,
    ensure_model,
    free_port,
    stop_process,
    wait_healthy,
)

LLAMACPP_SCRIPT = Path(__file__).resolve().with_name("llamacpp.py")
GUARD_BIN = Path(sys.executable).with_name("gateway-guard")


def llamacpp_argv(model: str | Path, port: int, *, slots: int = 4, ctx: int = 4096, threads: int = 1) -> list[str]:
    path = ensure_model(model) if isinstance(model, str) and model in SIZES else Path(model)
    argv = [sys.executable, str(LLAMACPP_SCRIPT), "serve", "--model", str(path), "--port", str(port)]
    return [*argv, "--slots", str(slots), "--ctx", str(ctx), "--threads", str(threads)]


def sim_argv(port: int, **config: Any) -> list[str]:
    """``python -m gateway_guard.sim`` with ``config`` as its options (``_`` for ``-``; ``True``: a bare flag)."""
    argv = [sys.executable, "-m", "gateway_guard.sim", "--host", HOST, "--port", str(port)]
    for key, value in config.items():
        if value is False or value is None:
            continue
        argv.append("--" + key.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


class Restartable:
    """One server process on a fixed 127.0.0.1 port: started, killed (-9, this PID only) and started again."""

    def __init__(self, argv: Sequence[str], port: int, *, startup_timeout: float = 60.0) -> None:
        self.argv = list(argv)
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 -- closed by close(), kept over restarts

    def start(self) -> None:
        """Start the process and wait (polling: it is another process) until ``/health`` answers 200."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(self.argv, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.starts += 1
        try:
            _wait_healthy(self.proc, self.url, self.startup_timeout, self._log)
        except ServerStartError:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no clean shutdown, open connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        self._log.close()

    def __enter__(self) -> Restartable:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def restartable_llamacpp(model: str | Path = "tiny", **options: Any) -> Restartable:
    port = free_port()
    return Restartable(llamacpp_argv(model, port, **options), port)


def restartable_sim(**config: Any) -> Restartable:
    port = free_port()
    return Restartable(sim_argv(port, **config), port)


# -- the guard as a process, from a config file -----------------------------------------------------------------


def write_guard_config(path: Path, upstream: str, *, cap: int, extra: str = "") -> Path:
    """A config with one upstream ``default`` (cap ``cap``, load probe on) and a batch lane with no headroom."""
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
default_lane = "batch"

[lanes.batch]
headroom = 0
queue_size = 256
queue_timeout = 120

[upstreams.default]
url = "{upstream}"
max_inflight = {cap}
{extra}
""",
        encoding="utf-8",
    )
    return path


@contextlib.contextmanager
def guard_with_config(config: Path, log: Path, *, startup_timeout: float = 30.0) -> Iterator[tuple[str, int]]:
    """``gateway-guard --config FILE --port P`` as its own process, stderr (the access log) to ``log``;
    yields its base URL and PID. Ready when ``/guard/health`` answers 200; stopped by its PID."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARD")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(GUARD_BIN), "--config", str(config), "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
        try:
            wait_healthy(proc, f"{url}/guard/health", startup_timeout, lambda: log.read_text()[-3000:])
            yield url, proc.pid
        finally:
            stop_process(proc, grace=10)


def rss_kib(pid: int) -> int:
    """Resident set size of a process (``VmRSS`` from /proc), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- what the server holds --------------------------------------------------------------------------------------


def llamacpp_held(text: str) -> int:
    """``requests_processing + requests_deferred`` from a llama.cpp ``/metrics`` text."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:requests_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return int(values["llamacpp:requests_processing"] + values["llamacpp:requests_deferred"])


class HeldSampler:
    """Samples what llama.cpp holds every ``every`` seconds in a thread, from ``start()`` until ``stop()``."""

    def __init__(self, server: str, *, every: float = 0.02) -> None:
        self.server = server
        self.every = every
        self.samples: list[tuple[float, int]] = []  # (time.monotonic(), processing + deferred)
        self.unanswered = 0  # samples the server did not answer (down, restarting)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="held-sampler", daemon=True)

    @property
    def most(self) -> int:
        return max((held for _, held in self.samples), default=0)

    def held_at(self, since: float) -> list[int]:
        return [held for at, held in self.samples if at >= since]

    def _loop(self) -> None:
        with httpx.Client(timeout=1.0) as client:
            next_at = time.monotonic()
            while not self._stop.is_set():
                try:
                    response = client.get(f"{self.server}/metrics")
                    if response.status_code == 200:
                        self.samples.append((time.monotonic(), llamacpp_held(response.text)))
                    else:
                        self.unanswered += 1
                except httpx.TransportError:
                    self.unanswered += 1
                next_at += self.every
                self._stop.wait(max(0.0, next_at - time.monotonic()))
                next_at = max(next_at, time.monotonic() - self.every)  # late: do not burst to catch up

    def start(self) -> HeldSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> HeldSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
