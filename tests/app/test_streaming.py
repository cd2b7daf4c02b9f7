"""Streaming through real sockets (uvicorn on 127.0.0.1): what httpx.ASGITransport cannot show."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx

from gateway_guard.app.factory import build_app
from gateway_guard.app.state import GuardState
from tests.app.conftest import settings_for
from tests.support.inprocess import serve_in_process

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


class GatedStream:
    """An upstream that sends one SSE chunk, then waits for the test before sending the rest; notes a hang-up."""

    def __init__(self) -> None:
        self.release_rest = asyncio.Event()
        self.client_gone = asyncio.Event()
        self.started = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.started += 1
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'data: {"n": 1}\n\n', "more_body": True})
        waiter = asyncio.ensure_future(self.release_rest.wait())
        gone = asyncio.ensure_future(receive())
        done, _ = await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        if gone in done:
            waiter.cancel()
            self.client_gone.set()
            return
        gone.cancel()
        await send({"type": "http.response.body", "body": b'data: {"n": 2}\n\ndata: [DONE]\n\n', "more_body": False})


async def _wait_for(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_first_chunk_arrives_before_the_upstream_has_finished() -> None:
    upstream = GatedStream()
    async with serve_in_process(upstream) as up_url:
        app = build_app(settings_for(up_url))
        state: GuardState = app.state.guard
        async with serve_in_process(app) as guard_url, httpx.AsyncClient(base_url=guard_url) as client:
            async with client.stream("POST", "/v1/chat/completions", json=CHAT) as r:
                chunks = r.aiter_raw()
                first = await asyncio.wait_for(chunks.__anext__(), 5)
                assert b'"n": 1' in first, "first chunk was held back (buffered) by the guard"
                assert not upstream.release_rest.is_set()
                upstream.release_rest.set()
                rest = b"".join([c async for c in chunks])
                assert b"[DONE]" in rest
            assert state.gates["default"].snapshot().in_flight == 0
        await state.aclose()


async def test_client_disconnect_mid_stream_cancels_upstream_and_frees_permit() -> None:
    upstream = GatedStream()
    async with serve_in_process(upstream) as up_url:
        app = build_app(settings_for(up_url))
        state: GuardState = app.state.guard
        gate = state.gates["default"]
        async with serve_in_process(app) as guard_url, httpx.AsyncClient(base_url=guard_url) as client:
            async with client.stream("POST", "/v1/chat/completions", json=CHAT) as r:
                await asyncio.wait_for(r.aiter_raw().__anext__(), 5)
                assert gate.snapshot().in_flight == 1
            # leaving the block closes the connection mid-stream
            await asyncio.wait_for(upstream.client_gone.wait(), 5)
            await _wait_for(lambda: gate.snapshot().in_flight == 0)
            cap = (await client.get("/guard/capacity")).json()
            assert cap["upstreams"]["default"]["free"] == cap["upstreams"]["default"]["limit"]
        await state.aclose()


async def test_client_that_leaves_while_queued_never_reaches_the_upstream() -> None:
    upstream = GatedStream()
    async with serve_in_process(upstream) as up_url:
        app = build_app(settings_for(up_url, upstreams={"default": {"max_inflight": 1}}))
        state: GuardState = app.state.guard
        gate = state.gates["default"]
        async with serve_in_process(app) as guard_url:
            held = await gate.acquire("interactive", "someone")
            async with httpx.AsyncClient(base_url=guard_url) as client:
                task = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
                await _wait_for(lambda: gate.snapshot().queued == 1)
                task.cancel()  # the client hangs up while waiting in the queue
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await _wait_for(lambda: gate.snapshot().queued == 0)
            held.release()
            assert gate.snapshot().in_flight == 0
            assert upstream.started == 0
        await state.aclose()
