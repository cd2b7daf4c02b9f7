"""A client that hangs up while a real llama.cpp server is still reading its long prompt.

llama.cpp notices a closed connection only when it next writes, and it writes nothing until the whole prompt is
read: the slot stays busy for seconds after the hang-up. The guard (cap 1, its own process) must keep the permit
that long, or the next request reaches a server that is still working: two at the server with a cap of one.
The server's own ``/metrics`` (processing + deferred, sampled every 20 ms) is the judge.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.integration.conftest import CHAT_PATH, wait_all_free
from tests.support.outage import HeldSampler, Restartable, guard_with_config, restartable_llamacpp, write_guard_config

pytest.importorskip("xllamacpp")
pytestmark = pytest.mark.llamacpp

WORDS = 400  # ~2,700 tokens with the test model's byte-level vocabulary: seconds of reading on 2 cores


def long_prompt(max_tokens: int) -> dict[str, Any]:
    """A prompt of its own (a random first line: no cached prefix to reuse), streamed."""
    text = f"{random.random()}\n" + " ".join(["the card work task"] * (WORDS // 4))
    return {
        "model": "med",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }


@pytest.fixture
def llama_long() -> Iterator[Restartable]:
    with restartable_llamacpp("med", slots=2, ctx=8192) as server:  # 4,096 a slot
        yield server


async def hang_up_while_reading(guard: str, body: dict[str, Any], after: float) -> float:
    """Send through a plain socket, close it ``after`` seconds later having read nothing; the time it closed."""
    parts = urlsplit(guard)
    data = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = f"POST {CHAT_PATH} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-type: application/json\r\n"
    writer.write(head.encode() + b"content-length: %d\r\n\r\n" % len(data) + data)
    await writer.drain()
    with pytest.raises(TimeoutError):  # nothing answered before the hang-up
        first = await asyncio.wait_for(reader.read(1), after)
        raise AssertionError(f"the guard answered before the hang-up: {first!r}")
    writer.close()
    await writer.wait_closed()
    return time.monotonic()


async def test_a_hang_up_during_a_long_prompt_keeps_the_slot_until_the_server_has_read_it(
    llama_long: Restartable, tmp_path: Path
) -> None:
    config = write_guard_config(tmp_path / "guard.toml", llama_long.url, cap=1)
    with guard_with_config(config, tmp_path / "guard.log") as (guard, _pid), HeldSampler(llama_long.url) as sampler:
        async with httpx.AsyncClient(timeout=120.0) as client:
            # One long prompt answered in full: the guard learns how long this server takes to a first chunk.
            async with client.stream("POST", f"{guard}{CHAT_PATH}", json=long_prompt(2)) as response:
                assert response.status_code == 200
                async for _ in response.aiter_raw():
                    pass
            await wait_all_free(client, guard, timeout=5.0)
            closed = await hang_up_while_reading(guard, long_prompt(2), after=0.3)
            # The next request, sent as soon as the first client left, must wait for the server to let go.
            next_request = await client.post(
                f"{guard}{CHAT_PATH}",
                json={"model": "med", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
            answered = time.monotonic()
            assert next_request.status_code == 200, next_request.text
            await wait_all_free(client, guard, timeout=5.0)
    busy_after_hang_up = [held for at, held in sampler.samples if closed + 1.0 <= at < answered - 0.5]
    assert busy_after_hang_up and max(busy_after_hang_up) >= 1, (
        "llama.cpp was not seen still reading the prompt a second after the hang-up: the test proves nothing"
    )
    assert sampler.most <= 1, f"llama.cpp held {sampler.most} requests with a cap of 1"
    print(
        f"\nthe next request was answered {answered - closed:.2f} s after the hang-up; "
        f"server held at most {sampler.most} over {len(sampler.samples)} samples"
    )
