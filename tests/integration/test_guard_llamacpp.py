"""The guard (``gateway-guard`` as a process) in front of a real llama.cpp server (xllamacpp, tiny random model).

What the server itself reports is the judge: ``llamacpp:requests_processing`` on its ``/metrics`` and the
``is_processing`` flags on its ``/slots``. The server has 8 slots and would run 8 streams at once; the guard's
cap of 2 must be the most it ever sees, and a client that goes away mid-stream must free the server's slot
(generation stops) and the guard's permit at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.integration.conftest import CHAT_PATH, guard_process, poll_until, prometheus, wait_all_free
from tests.support.llamacpp import llamacpp_server

pytest.importorskip("xllamacpp")
pytestmark = pytest.mark.llamacpp

SLOTS = 8
CAP = 2
CTX_PER_SLOT = 2048
CLIENTS = 8  # 4x the cap, and every slot of the server would be used without the guard
MAX_TOKENS = 48
LONG = 1500  # a stream that runs for seconds on the tiny model (~350 tokens/s here)


@pytest.fixture(scope="module")
def llama() -> Iterator[str]:
    with llamacpp_server("tiny", slots=SLOTS, ctx=SLOTS * CTX_PER_SLOT) as url:
        yield url


@pytest.fixture(scope="module")
def guard(llama: str) -> Iterator[str]:
    with guard_process(llama, max_inflight=CAP) as url:
        yield url


def chat(max_tokens: int) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,  # random weights hit EOS at random: this makes each reply exactly max_tokens
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass
class Seen:
    """Maxima read off llama.cpp and the guard while the load runs."""

    processing: list[int] = field(default_factory=list)
    deferred: list[int] = field(default_factory=list)
    slots_busy: list[int] = field(default_factory=list)
    guard_queued: list[int] = field(default_factory=list)


async def watch(client: httpx.AsyncClient, llama: str, guard: str, seen: Seen, stop: asyncio.Event) -> None:
    """Poll the server's /metrics and /slots and the guard's /guard/capacity back to back until ``stop``."""

    async def metrics() -> None:
        while not stop.is_set():
            values = prometheus((await client.get(f"{llama}/metrics")).text)
            seen.processing.append(int(values["llamacpp:requests_processing"]))
            seen.deferred.append(int(values["llamacpp:requests_deferred"]))

    async def slots() -> None:
        while not stop.is_set():
            seen.slots_busy.append(sum(1 for s in (await client.get(f"{llama}/slots")).json() if s["is_processing"]))

    async def capacity() -> None:
        while not stop.is_set():
            seen.guard_queued.append(
                (await client.get(f"{guard}/guard/capacity")).json()["upstreams"]["default"]["queued"]
            )

    await asyncio.gather(metrics(), slots(), capacity())


async def stream_chat(client: httpx.AsyncClient, guard: str, lane: str) -> tuple[int, list[Any], bool]:
    """One streamed chat through the guard: status, the JSON events, whether ``[DONE]`` ended it."""
    events: list[Any] = []
    done = False
    headers = {"X-Guard-Lane": lane}
    async with client.stream("POST", f"{guard}{CHAT_PATH}", json=chat(MAX_TOKENS), headers=headers) as response:
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
        return response.status_code, events, done


async def test_llamacpp_never_sees_more_than_the_cap_under_4x_overload(llama: str, guard: str) -> None:
    seen = Seen()
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=30.0) as client:
        watcher = asyncio.create_task(watch(client, llama, guard, seen, stop))
        try:
            async with asyncio.timeout(40):
                # Both lanes: interactive may take both slots, batch (headroom 1) one; together never more than 2.
                lanes = ["interactive" if i % 2 else "batch" for i in range(CLIENTS)]
                results = await asyncio.gather(*(stream_chat(client, guard, lane) for lane in lanes))
        finally:
            stop.set()
            await watcher

        for status, events, done in results:
            assert status == 200
            assert done, "stream did not end with [DONE]"
            usage = [e["usage"] for e in events if e.get("usage")]
            assert usage and usage[-1]["completion_tokens"] == MAX_TOKENS, usage
        assert max(seen.processing) <= CAP, f"llamacpp:requests_processing reached {max(seen.processing)}"
        assert max(seen.slots_busy) <= CAP, f"/slots showed {max(seen.slots_busy)} processing at once"
        assert max(seen.deferred) == 0, "the server queued requests: the guard let more through than it has slots"
        # The polls saw real concurrency (so they would have seen more), and the guard held the surplus.
        assert max(seen.processing) == CAP, f"the cap was never reached: {seen.processing}"
        assert max(seen.guard_queued) >= 1, "the guard never queued anything: no overload happened"
        await wait_all_free(client, guard)


async def test_client_disconnect_mid_stream_stops_generation_and_frees_the_permit(llama: str, guard: str) -> None:
    async with httpx.AsyncClient(base_url=llama, timeout=30.0) as client:

        async def server_state() -> tuple[int, int, float]:
            values = prometheus((await client.get("/metrics")).text)
            busy = sum(1 for s in (await client.get("/slots")).json() if s["is_processing"])
            return int(values["llamacpp:requests_processing"]), busy, values["llamacpp:tokens_predicted_total"]

        idle = await poll_until(server_state, lambda s: s[:2] == (0, 0), timeout=5.0, what="llama.cpp idle")
        async with client.stream("POST", f"{guard}{CHAT_PATH}", json=chat(LONG)) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()  # keep a reference: a collected generator closes the connection
            async with asyncio.timeout(10):
                while '"content"' not in await anext(lines):
                    pass
            live = await server_state()
            assert live[:2] == (1, 1), f"the stream should be generating on the server now: {live}"
        # Leaving the block closed the connection with the stream unfinished: the client is gone.

        after = await poll_until(
            server_state, lambda s: s[:2] == (0, 0), timeout=2.0, what="llama.cpp slot freed after the client left"
        )
        generated = after[2] - idle[2]
        assert generated < LONG / 2, f"the server generated {generated:.0f} of {LONG} tokens for a client that left"
        await wait_all_free(client, guard, timeout=2.0)


async def test_a_forwarded_response_has_one_server_and_one_date_header(guard: str) -> None:
    async with httpx.AsyncClient(timeout=10.0) as client:
        response = await client.get(f"{guard}/v1/models")
    assert response.status_code == 200
    names = [name.lower() for name, _ in response.headers.raw]
    assert names.count(b"server") <= 1 and names.count(b"date") <= 1, response.headers.raw
