"""The GPU model alone: slots, FIFO deferral, rates by concurrency, abandonment. Time is driven by the test."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway_guard.sim.model import Gpu, SimConfig


class Recorder:
    """A sleep that returns at once and remembers what it was asked to wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)


class Gate:
    """A sleep that blocks until the test opens the gate: work stays in its slot for as long as needed."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        await self.opened.wait()


async def drain(gpu: Gpu, prompt_tokens: int, output_tokens: int) -> list[int]:
    async with contextlib.aclosing(gpu.generate(prompt_tokens, output_tokens)) as tokens:
        return [i async for i in tokens]


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="slots"):
        SimConfig(slots=0)
    with pytest.raises(ValueError, match="tokens_per_second"):
        SimConfig(tokens_per_second=0)
    with pytest.raises(ValueError, match="mode"):
        SimConfig(mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttft"):
        SimConfig(ttft=-1)


def test_per_request_rate_falls_and_aggregate_flattens_at_the_slot_count() -> None:
    gpu = Gpu(SimConfig(slots=4, tokens_per_second=100, batch_slowdown=0.25))
    per_request = [1 / gpu.token_interval(n) for n in range(1, 5)]
    aggregate = [n * rate for n, rate in zip(range(1, 5), per_request, strict=True)]
    assert per_request == sorted(per_request, reverse=True)
    assert per_request[0] == pytest.approx(100)
    assert aggregate == sorted(aggregate)
    assert aggregate[3] == pytest.approx(4 * 100 / 1.75)  # like llama.cpp: ~2.2x a single stream at 4 slots


async def test_a_request_waits_ttft_then_one_interval_per_further_token() -> None:
    clock = Recorder()
    gpu = Gpu(SimConfig(slots=2, tokens_per_second=50, ttft=0.2), sleep=clock.sleep)
    assert await drain(gpu, prompt_tokens=7, output_tokens=3) == [0, 1, 2]
    assert clock.waits == [0.2, pytest.approx(0.02), pytest.approx(0.02)]
    stats = gpu.stats()
    assert (stats.prompt_tokens_total, stats.tokens_predicted_total, stats.requests_total) == (7, 3, 1)
    assert (stats.requests_processing, stats.requests_abandoned_total) == (0, 0)


async def test_token_interval_follows_the_number_decoding_together() -> None:
    clock = Recorder()
    gpu = Gpu(SimConfig(slots=4, tokens_per_second=100, ttft=0, batch_slowdown=0.5), sleep=clock.sleep)
    first, second = gpu.generate(1, 3), gpu.generate(1, 3)
    assert await anext(first) == 0
    assert await anext(second) == 0
    await anext(first)  # two decode together: each at 100 / 1.5 tokens/s
    assert clock.waits[-1] == pytest.approx(1.5 / 100)
    await second.aclose()  # second leaves; first is alone again
    await anext(first)
    assert clock.waits[-1] == pytest.approx(1 / 100)
    await first.aclose()


async def test_requests_beyond_the_slots_are_deferred_in_order_and_never_rejected() -> None:
    gate = Gate()
    gpu = Gpu(SimConfig(slots=2, ttft=1), sleep=gate.sleep)
    tasks = [asyncio.create_task(drain(gpu, 1, 2)) for _ in range(5)]
    stats = await asyncio.wait_for(gpu.wait_until(lambda s: s.requests_total == 5), 1)
    assert (stats.requests_processing, stats.requests_deferred, stats.max_concurrent_seen) == (2, 3, 5)
    gate.opened.set()
    assert await asyncio.wait_for(asyncio.gather(*tasks), 1) == [[0, 1]] * 5
    stats = gpu.stats()
    assert (stats.requests_processing, stats.requests_deferred, stats.tokens_predicted_total) == (0, 0, 10)
    assert stats.requests_abandoned_total == 0


async def test_a_request_closed_early_frees_its_slot_for_the_next_in_line() -> None:
    gate = Gate()
    gpu = Gpu(SimConfig(slots=1, ttft=0), sleep=gate.sleep)
    holder = gpu.generate(1, 10)
    assert await anext(holder) == 0  # first token comes without a sleep when ttft is 0 ... and holds the slot
    waiting = asyncio.create_task(drain(gpu, 1, 1))
    await asyncio.wait_for(gpu.wait_until(lambda s: s.requests_deferred == 1), 1)
    await holder.aclose()  # the client went away after one token
    assert await asyncio.wait_for(waiting, 1) == [0]
    stats = gpu.stats()
    assert (stats.requests_abandoned_total, stats.requests_processing, stats.tokens_predicted_total) == (1, 0, 2)


async def test_cancelling_a_deferred_request_leaves_the_queue() -> None:
    gate = Gate()
    gpu = Gpu(SimConfig(slots=1), sleep=gate.sleep)
    running = asyncio.create_task(drain(gpu, 1, 1))
    queued = asyncio.create_task(drain(gpu, 1, 1))
    await asyncio.wait_for(gpu.wait_until(lambda s: s.requests_deferred == 1), 1)
    queued.cancel()
    stats = await asyncio.wait_for(gpu.wait_until(lambda s: s.requests_deferred == 0), 1)
    assert (stats.requests_processing, stats.requests_abandoned_total) == (1, 1)
    gate.opened.set()
    assert await asyncio.wait_for(running, 1) == [0]
    assert gpu.stats().requests_processing == 0


async def test_cancelling_while_generating_counts_as_abandoned() -> None:
    gate = Gate()
    gpu = Gpu(SimConfig(slots=1), sleep=gate.sleep)
    task = asyncio.create_task(drain(gpu, 1, 5))
    await asyncio.wait_for(gpu.wait_until(lambda s: s.requests_processing == 1), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = gpu.stats()
    assert (stats.requests_processing, stats.requests_abandoned_total) == (0, 1)


async def test_zero_mode_never_sleeps_and_never_defers() -> None:
    clock = Recorder()
    gpu = Gpu(SimConfig(mode="zero", slots=1), sleep=clock.sleep)
    held = [gpu.generate(1, 2) for _ in range(3)]
    for gen in held:
        await anext(gen)
    stats = gpu.stats()
    assert (stats.requests_processing, stats.requests_deferred, stats.max_concurrent_seen) == (3, 0, 3)
    for gen in held:
        await gen.aclose()
    assert clock.waits == []
    await gpu.embed(4)
    assert gpu.stats().prompt_tokens_total == 7
