"""The guard on real 127.0.0.1 sockets: as a ``gateway-guard`` process, or served by uvicorn in the test's loop.

Also: ``/guard/capacity`` read back and checked all-free, and Prometheus text parsed (llama.cpp's and the sim's
``/metrics``). Upstreams come from ``tests.support.llamacpp`` (llama.cpp, the sim, as processes) or are small
ASGI apps / raw asyncio servers written in the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx

from gateway_guard.app.factory import build_app
from gateway_guard.app.state import GuardState
from gateway_guard.settings import Settings, load_settings
from tests.support.inprocess import serve_in_process
from tests.support.llamacpp import REPO_ROOT, free_port, stop_process, wait_healthy

T = TypeVar("T")
GUARD_BIN = Path(sys.executable).with_name("gateway-guard")
CHAT_PATH = "/v1/chat/completions"


# -- the guard as a process ---------------------------------------------------------------------------------


def _hermetic_env() -> dict[str, str]:
    """This environment without GUARD__* overrides or an admin token, so the CLI flags alone configure it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GUARD__") and k != "GUARD_ADMIN_TOKEN"}


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read()[-4000:].decode(errors="replace")


@contextlib.contextmanager
def guard_process(
    upstream: str, *, max_inflight: int, extra: Sequence[str] = (), startup_timeout: float = 20.0
) -> Iterator[str]:
    """``gateway-guard --upstream URL --max-inflight N --port P`` as its own process; yields its base URL.

    Ready when ``GET /guard/health`` answers 200. On exit this process only (by its PID) gets SIGTERM, then
    SIGKILL after 5 s.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(GUARD_BIN), "--upstream", upstream, "--max-inflight", str(max_inflight), "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [*argv, *extra], cwd=REPO_ROOT, env=_hermetic_env(), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_healthy(proc, f"{url}/guard/health", startup_timeout, lambda: _tail(log))
            yield url
        finally:
            stop_process(proc)


# -- the guard in this loop ---------------------------------------------------------------------------------


def guard_settings(upstream: str, **overrides: Any) -> Settings:
    """Settings for one upstream named ``default`` (cap 2 unless overridden); dotted keys as ``load_settings``."""
    base: dict[str, Any] = {"upstreams.default.url": upstream, "upstreams.default.max_inflight": 2}
    return load_settings(overrides=base | overrides, environ={})


@contextlib.asynccontextmanager
async def guard_in_process(
    settings: Settings, *, wrap: Callable[[Any], Any] | None = None
) -> AsyncIterator[tuple[str, GuardState]]:
    """The guard's app served by uvicorn in this loop on a real socket; ``wrap`` may put an ASGI hook around it."""
    app = build_app(settings)
    state: GuardState = app.state.guard
    try:
        async with serve_in_process(wrap(app) if wrap is not None else app) as url:
            yield url, state
    finally:
        await state.aclose()  # serve_in_process runs no lifespan: close the upstream clients here


# -- reading servers back -----------------------------------------------------------------------------------


def prometheus(text: str) -> dict[str, float]:
    """``name value`` lines of a Prometheus text exposition (no labels in the names we read)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def busy_parts(capacity: Mapping[str, Any]) -> list[str]:
    """Every place in a ``/guard/capacity`` payload that is not all-free (empty when all is free)."""
    busy: list[str] = []

    def check(where: str, view: Mapping[str, Any]) -> None:
        if view["in_flight"] or view["queued"] or (view["limit"] is not None and view["free"] != view["limit"]):
            busy.append(f"{where}: {dict(view)}")

    for name, up in capacity["upstreams"].items():
        check(f"upstreams.{name}", up)
        for lane, view in up["lanes"].items():
            check(f"upstreams.{name}.lanes.{lane}", view)
        for profile, view in up["profiles"].items():
            if view["in_flight"] or view["queued"]:
                busy.append(f"upstreams.{name}.profiles.{profile}: {dict(view)}")
    return busy


async def poll_until(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, timeout: float, what: str, every: float = 0.01
) -> T:
    """Call ``probe`` until ``done(result)``; fail naming ``what`` and the last result after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s; last seen: {result!r}")
        await asyncio.sleep(every)  # polling another server with a deadline: there is no event to wait on


async def wait_all_free(client: httpx.AsyncClient, guard: str, *, timeout: float = 3.0) -> dict[str, Any]:
    """Poll ``/guard/capacity`` until no upstream, lane or profile holds or queues anything."""

    async def read() -> dict[str, Any]:
        response = await client.get(f"{guard}/guard/capacity")
        assert response.status_code == 200, response.text
        payload: dict[str, Any] = response.json()
        return payload

    return await poll_until(read, lambda c: not busy_parts(c), timeout=timeout, what="guard capacity all free")


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["code"], str) and error["code"]
    body: dict[str, Any] = error
    return body
