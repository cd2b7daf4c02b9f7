"""Live reload from the config file: POST /guard/reload (admin token) and SIGHUP.

A new cap applies to the next admission, queued requests keep their place, in-flight ones are untouched, an
invalid file is refused naming the key and the old config stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_guard.admission.gate import Gate, Permit
from gateway_guard.admission.limit import AdaptiveLimit, FixedLimit
from gateway_guard.app.factory import build_app
from gateway_guard.app.state import GuardState
from gateway_guard.errors import RateLimited, UnknownLane
from gateway_guard.settings import load_settings
from tests.app.conftest import EchoUpstream
from tests.support.llamacpp import free_port

ADMIN = {"x-guard-admin-token": "s3cret"}
BASE = """
[server]
admin_token = "s3cret"

[upstreams.default]
url = "http://upstream.test"
"""


class Guard:
    def __init__(self, path: Path, client: httpx.AsyncClient, state: GuardState) -> None:
        self.path, self.client, self.state = path, client, state

    @property
    def gate(self) -> Gate:
        gate = self.state.gates["default"]
        assert isinstance(gate, Gate)
        return gate

    def write(self, extra: str) -> None:
        self.path.write_text(BASE + extra, encoding="utf-8")

    async def reload(self, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.client.post("/guard/reload", headers=ADMIN if headers is None else headers)

    async def queue(self, lane: str, profile: str = "p") -> asyncio.Task[Permit]:
        task = asyncio.ensure_future(self.gate.acquire(lane, profile))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done()
        return task


@pytest.fixture
async def guard(tmp_path: Path) -> AsyncIterator[Guard]:
    path = tmp_path / "guard.toml"
    path.write_text(BASE + "max_inflight = 1\n", encoding="utf-8")
    upstream = httpx.ASGITransport(app=EchoUpstream())  # an in-process upstream answering what it saw
    app = build_app(
        load_settings(path, environ={}), transport=upstream, reload_from=lambda: load_settings(path, environ={})
    )
    state: GuardState = app.state.guard
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://guard.test") as client:
        yield Guard(path, client, state)
    await state.aclose()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_new_cap_applies_to_the_next_admission_and_in_flight_is_untouched(guard: Guard) -> None:
    held = await guard.gate.acquire("interactive", "p")
    waiting = await guard.queue("interactive")
    limit = guard.gate.limit_source
    guard.write("max_inflight = 3\n")
    r = await guard.reload()
    assert r.status_code == 200, r.text
    assert r.json()["changes"] == ["upstreams.default: limit 1 -> 3 (fixed)"]
    await settle()
    assert waiting.done() and guard.gate.in_flight == 2  # the queued one is in; the held one still holds
    assert guard.gate.limit_source is limit and limit.reason == "set by config reload"
    third = await guard.gate.acquire("interactive", "p")
    for permit in (held, waiting.result(), third):
        permit.release()
    assert guard.gate.in_flight == 0
    capacity = (await guard.client.get("/guard/capacity")).json()["upstreams"]["default"]
    assert capacity["limit"] == 3 and capacity["limit_reason"] == "set by config reload"


async def test_queued_requests_keep_their_place_across_a_reload(guard: Guard) -> None:
    held = await guard.gate.acquire("batch", "a")
    first = await guard.queue("batch", "a")
    second = await guard.queue("batch", "a")
    other = await guard.queue("interactive", "b")
    guard.write("max_inflight = 1\n[lanes.batch]\nqueue_timeout = 999\n[profiles.a]\nmax_inflight = 1\n")
    assert (await guard.reload()).status_code == 200
    assert guard.gate.lane_policy("batch").queue_timeout == 999
    assert guard.gate.snapshot().queued == 3
    held.release()  # as without the reload: interactive first, then batch in its order
    await settle()
    assert other.done() and not first.done()
    other.result().release()
    await settle()
    assert first.done() and not second.done()
    first.result().release()
    await settle()
    assert second.done()
    second.result().release()
    assert (guard.gate.in_flight, guard.gate.snapshot().queued) == (0, 0)


async def test_an_invalid_file_is_refused_naming_the_key_and_the_old_config_stays(guard: Guard) -> None:
    old = guard.state.settings
    guard.write("max_inflight = 0\n")
    r = await guard.reload()
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "config_refused" and "upstreams.default.max_inflight" in error["message"]
    assert guard.state.settings is old and guard.gate.limit == 1
    guard.path.write_text("this is = = not toml", encoding="utf-8")
    assert "not valid TOML" in (await guard.reload()).json()["error"]["message"]
    guard.path.write_text(BASE.replace("upstream.test", "elsewhere.test"), encoding="utf-8")
    refused = (await guard.reload()).json()["error"]["message"]
    assert "upstreams.default.url" in refused and "restart" in refused
    assert guard.state.settings is old


async def test_reload_needs_the_admin_token(guard: Guard) -> None:
    guard.write("max_inflight = 5\n")
    r = await guard.reload(headers={})
    assert r.status_code == 403
    assert guard.gate.limit == 1


async def test_a_removed_lane_drains_and_takes_no_new_request(guard: Guard) -> None:
    guard.write("max_inflight = 1\n[lanes.bulk]\npriority = 2\n")
    assert (await guard.reload()).status_code == 200
    held = await guard.gate.acquire("bulk", "p")
    queued = await guard.queue("bulk")
    guard.write("max_inflight = 1\n")
    assert (await guard.reload()).status_code == 200
    with pytest.raises(UnknownLane):
        await guard.gate.acquire("bulk", "p")
    assert list(guard.gate.lane_names()) == ["interactive", "batch"]
    held.release()
    await settle()
    assert queued.done()
    queued.result().release()
    assert "bulk" not in guard.gate.snapshot().lanes


async def test_keys_profiles_and_rate_limits_reload(guard: Guard) -> None:
    guard.write('max_inflight = 2\n[keys]\nalice = "key-a"\n[profiles.alice]\nlane = "interactive"\n')
    guard.path.write_text(guard.path.read_text() + "requests_per_minute = 1\n")
    assert (await guard.reload()).status_code == 200
    chat = {"model": "m", "messages": []}
    ok = await guard.client.post("/v1/chat/completions", json=chat, headers={"authorization": "Bearer key-a"})
    assert ok.status_code == 200
    assert (await guard.client.post("/v1/chat/completions", json=chat)).status_code == 401
    limited = await guard.client.post("/v1/chat/completions", json=chat, headers={"authorization": "Bearer key-a"})
    assert limited.status_code == 429 and limited.json()["error"]["code"] == RateLimited.code
    guard.write("max_inflight = 2\n")
    assert (await guard.reload()).status_code == 200
    assert (await guard.client.post("/v1/chat/completions", json=chat)).status_code == 200  # no keys: open again


async def test_switching_to_adaptive_and_back(guard: Guard) -> None:
    guard.write('max_inflight = 2\nlimit = "adaptive"\nceiling = 6\nprobe = "off"\n')
    r = await guard.reload()
    assert r.json()["changes"] == ["upstreams.default: limit 1 -> 6 (adaptive)"]
    adaptive = guard.gate.limit_source
    assert isinstance(adaptive, AdaptiveLimit) and not guard.state.probers["default"].reads_load
    guard.write('max_inflight = 2\nlimit = "adaptive"\nfloor = 2\nceiling = 4\n')
    await guard.reload()
    assert guard.gate.limit_source is adaptive and adaptive.limit == 4 and guard.state.probers["default"].reads_load
    guard.write("max_inflight = 2\n")
    await guard.reload()
    assert isinstance(guard.gate.limit_source, FixedLimit) and guard.gate.limit == 2
    assert list(guard.state.probers) == ["default"]  # one prober per upstream, whatever its limit


async def test_sighup_reloads_the_file(guard: Guard, caplog: pytest.LogCaptureFixture) -> None:
    reloader: Any = guard.client._transport.app.state.reloader  # type: ignore[attr-defined]
    reloader.install_sighup()
    try:
        guard.write("max_inflight = 4\n")
        os.kill(os.getpid(), signal.SIGHUP)
        async with asyncio.timeout(5):
            while guard.gate.limit != 4:
                await asyncio.sleep(0.01)
        guard.write("max_inflight = -1\n")
        os.kill(os.getpid(), signal.SIGHUP)
        async with asyncio.timeout(5):
            while "reload refused" not in caplog.text:
                await asyncio.sleep(0.01)
        assert "upstreams.default.max_inflight" in caplog.text and guard.gate.limit == 4
    finally:
        reloader.remove_sighup()


def test_the_gateway_guard_process_reloads_on_sighup(tmp_path: Path) -> None:
    """The CLI registers the handler: a real ``gateway-guard --config`` process, SIGHUP sent to its PID."""
    port = free_port()
    config = tmp_path / "guard.toml"
    config.write_text(BASE + "max_inflight = 2\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARD")}
    argv = [str(Path(sys.executable).with_name("gateway-guard")), "--config", str(config), "--port", str(port)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2) as client:

            def limit() -> int | None:
                with contextlib.suppress(httpx.TransportError):
                    return int(client.get("/guard/capacity").json()["upstreams"]["default"]["limit"])
                return None

            deadline = time.monotonic() + 20
            while limit() != 2:
                assert proc.poll() is None and time.monotonic() < deadline, "the guard did not start"
                time.sleep(0.05)  # polling another process: there is no event to wait on
            config.write_text(BASE + "max_inflight = 7\n", encoding="utf-8")
            proc.send_signal(signal.SIGHUP)
            while limit() != 7:
                assert proc.poll() is None and time.monotonic() < deadline, "no reload after SIGHUP"
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
