"""A real llama.cpp server (xllamacpp, its own process) behind the guard (``gateway-guard``, its own process):
killed with SIGKILL and started again on the same port under load, and clients that give up at 3x overload.

The server's own ``/metrics`` is the judge of the cap: ``llamacpp:requests_processing +
llamacpp:requests_deferred``, sampled every 20 ms in a thread (``tests/support/outage.py``), never above the
guard's cap. The guard's ``/guard/capacity`` must be all free at the end: every permit came back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import CHAT_PATH, poll_until, wait_all_free
from tests.support.outage import HeldSampler, Restartable, guard_with_config, restartable_llamacpp, write_guard_config

pytest.importorskip("xllamacpp")
pytestmark = pytest.mark.llamacpp

CAP = 2


def chat(model: str, max_tokens: int, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,  # random weights hit EOS at random: each reply is exactly max_tokens
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


@dataclass
class Done:
    """One request's end, as its client saw it."""

    stream: bool
    sent: float
    status: int
    kind: str  # "ok", "cut" (a stream ended by the SSE error event after it began), or what went wrong
    detail: str = ""


async def one_request(client: httpx.AsyncClient, guard: str, *, stream: bool, tokens: int) -> Done:
    sent = time.monotonic()
    if not stream:
        response = await client.post(f"{guard}{CHAT_PATH}", json=chat("tiny", tokens, stream=False))
        if response.status_code != 200:
            return Done(False, sent, response.status_code, "refused", response.text[:300])
        got = response.json()["usage"]["completion_tokens"]
        return Done(False, sent, 200, "ok" if got == tokens else "short", f"{got} tokens")
    events: list[Any] = []
    finished = False
    async with client.stream("POST", f"{guard}{CHAT_PATH}", json=chat("tiny", tokens, stream=True)) as response:
        if response.status_code != 200:
            return Done(True, sent, response.status_code, "refused", (await response.aread()).decode()[:300])
        try:
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    finished = True
                elif line.startswith("data: "):
                    events.append(json.loads(line.removeprefix("data: ")))
        except httpx.HTTPError as exc:  # a broken read: what the SSE error event is there to prevent
            return Done(True, sent, 200, "broken", repr(exc))
    errors = [e["error"] for e in events if "error" in e]
    if errors:
        began = any(e.get("choices") for e in events if "error" not in e)
        kind = "cut" if began and not finished and "error" in events[-1] else "bad-error-event"
        return Done(True, sent, 200, kind, json.dumps(errors[-1]))
    usage = [e["usage"] for e in events if e.get("usage")]
    ok = finished and usage and usage[-1]["completion_tokens"] == tokens
    return Done(True, sent, 200, "ok" if ok else "incomplete", json.dumps(usage))


# -- killed and restarted under load ----------------------------------------------------------------------------

CLIENTS = 4  # 2x the cap, the surplus waits in the guard's batch lane
PER_CLIENT = 10
TOKENS = 96
OUTAGE = 1.5  # seconds between the kill and the restart


@pytest.fixture
def llama() -> Iterator[Restartable]:
    with restartable_llamacpp("tiny", slots=4, ctx=4096) as server:
        yield server


async def capacity(client: httpx.AsyncClient, guard: str) -> dict[str, Any]:
    upstream: dict[str, Any] = (await client.get(f"{guard}/guard/capacity")).json()["upstreams"]["default"]
    return upstream


async def test_llamacpp_killed_and_restarted_under_load_fails_no_batch_request(
    llama: Restartable, tmp_path: Path
) -> None:
    config = write_guard_config(tmp_path / "guard.toml", llama.url, cap=CAP)
    results: list[Done] = []
    with guard_with_config(config, tmp_path / "guard.log") as (guard, _pid), HeldSampler(llama.url) as sampler:
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0)) as client:

            async def worker(i: int) -> None:
                for n in range(PER_CLIENT):
                    results.append(await one_request(client, guard, stream=(i + n) % 2 == 0, tokens=TOKENS))

            async with asyncio.timeout(120):
                workers = asyncio.gather(*(worker(i) for i in range(CLIENTS)))
                # Kill while the cap is taken and requests wait behind it: some in flight, some queued.
                await poll_until(
                    lambda: capacity(client, guard),
                    lambda c: len(results) >= CLIENTS and c["in_flight"] == CAP and c["queued"] >= 1,
                    timeout=30,
                    what="load running at the cap with a queue",
                )
                killed = time.monotonic()
                llama.kill()
                held = await poll_until(
                    lambda: capacity(client, guard), lambda c: "held" in c, timeout=10, what="the guard holds"
                )
                assert held["state"] in ("down", "loading"), held
                await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - killed)))  # the outage lasts this long
                assert llama.proc is not None and llama.proc.poll() is not None
                during = await capacity(client, guard)
                assert during["in_flight"] == 0 and during["queued"] >= 1 and "held" in during, during
                restarted = time.monotonic()
                llama.start()
                await workers
            await wait_all_free(client, guard, timeout=5.0)
            after = await capacity(client, guard)
    assert llama.starts == 2
    kinds = [(d.stream, d.kind) for d in results]
    problems = [d for d in results if d.kind not in ("ok", "cut")]
    assert not problems, f"requests failed through the restart: {problems}"
    cut = [d for d in results if d.kind == "cut"]
    # Only a stream that was already relaying when the server died may end early (with the SSE error event).
    assert len(cut) <= CAP and all(d.stream and d.sent < killed for d in cut), cut
    assert len(results) == CLIENTS * PER_CLIENT
    rode_through = [d for d in results if d.kind == "ok" and d.sent < restarted and d.sent + 0.01 >= killed]
    assert rode_through, "no request was sent during the outage and answered after it: the test saw no outage"
    non_streamed_ok = sum(1 for s, k in kinds if not s and k == "ok")
    assert non_streamed_ok == sum(1 for s, _ in kinds if not s), "a non-streamed request failed"
    assert sampler.samples and sampler.unanswered >= 1, "the sampler never saw the server down"
    assert sampler.most <= CAP, f"llama.cpp held {sampler.most} requests (processing + deferred), cap {CAP}"
    assert after.get("state", "up") == "up", after
    print(
        f"\n{len(results)} requests, {len(cut)} streams cut by the kill (SSE error event), "
        f"{len(rode_through)} sent during the {OUTAGE} s outage and served after it; "
        f"server held at most {sampler.most} (cap {CAP}) over {len(sampler.samples)} samples"
    )


# -- clients that give up, 3x overload --------------------------------------------------------------------------

ABANDONING_CLIENTS = 6
GIVE_UP = 0.5
LONG = 300
LOAD_SECONDS = 8.0


@pytest.fixture
def llama_med() -> Iterator[Restartable]:
    with restartable_llamacpp("med", slots=4, ctx=4096) as server:
        yield server


async def test_abandoned_requests_never_pile_up_at_llamacpp(llama_med: Restartable, tmp_path: Path) -> None:
    config = write_guard_config(tmp_path / "guard.toml", llama_med.url, cap=CAP)
    abandoned = {True: 0, False: 0}
    finished = 0
    with guard_with_config(config, tmp_path / "guard.log") as (guard, _pid), HeldSampler(llama_med.url) as sampler:
        async with httpx.AsyncClient(timeout=30.0) as client:

            async def give_up_after(stream: bool) -> None:
                nonlocal finished
                body = chat("med", LONG, stream=stream)
                try:
                    async with asyncio.timeout(GIVE_UP):
                        if stream:
                            async with client.stream("POST", f"{guard}{CHAT_PATH}", json=body) as response:
                                async for _ in response.aiter_raw():
                                    pass
                        else:
                            await client.post(f"{guard}{CHAT_PATH}", json=body)
                    finished += 1
                except TimeoutError:
                    abandoned[stream] += 1

            async def client_loop(i: int) -> None:
                until = time.monotonic() + LOAD_SECONDS
                n = 0
                while time.monotonic() < until:
                    await give_up_after(stream=(i + n) % 2 == 0)
                    n += 1

            async with asyncio.timeout(LOAD_SECONDS + 30):
                await asyncio.gather(*(client_loop(i) for i in range(ABANDONING_CLIENTS)))
            left = time.monotonic()
            await asyncio.sleep(2.5)  # the assertion is about the server 2 s after the clients left
            await wait_all_free(client, guard, timeout=3.0)
    held_after = sampler.held_at(left + 2.0)
    assert abandoned[True] >= 3 and abandoned[False] >= 3, (abandoned, finished)
    assert sampler.most <= CAP, f"llama.cpp held {sampler.most} requests (processing + deferred), cap {CAP}"
    assert sampler.most == CAP, f"the server never reached the cap: the load was too light ({sampler.most})"
    assert held_after and max(held_after) == 0, f"llama.cpp held requests 2 s after the clients left: {held_after}"
    print(
        f"\nabandoned {abandoned[False]} non-streamed + {abandoned[True]} streamed ({finished} finished in time); "
        f"server held at most {sampler.most} (cap {CAP}) over {len(sampler.samples)} samples, "
        f"{max(held_after)} 2 s after the clients left"
    )
