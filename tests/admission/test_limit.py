"""AdaptiveLimit on a fake clock: the server's queue, KV cache, latency per token, the edge, history."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway_guard.admission.first_chunk import UNLEARNT_SECONDS
from gateway_guard.admission.gate import Gate, LanePolicy
from gateway_guard.admission.limit import HISTORY, AdaptiveLimit, FixedLimit, Saturation
from gateway_guard.admission.policy import Result
from gateway_guard.admission.rate import RateLimiter
from gateway_guard.admission.ticket import Admission
from gateway_guard.app.asgi import ClientDisconnected
from gateway_guard.errors import UpstreamTimeout, UpstreamUnavailable
from tests.admission.conftest import FakeClock, settle

LLAMA = "llama.cpp /metrics"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def adaptive(clock: Clock, **kw: object) -> AdaptiveLimit:
    return AdaptiveLimit(ceiling=16, clock=clock, **kw)  # type: ignore[arg-type]


def deferred(waiting: int, running: int = 4) -> Saturation:
    return Saturation(source=LLAMA, waiting=waiting, running=running)


def full_release(limit: AdaptiveLimit, rtt: float = 1.0, tokens: int | None = 64) -> None:
    limit.on_sample(rtt=rtt, in_flight=limit.limit, result=Result.SUCCESS, output_tokens=tokens)


def test_starts_at_the_ceiling_and_says_why() -> None:
    limit = adaptive(Clock(), floor=2)
    assert limit.limit == 16
    assert "starts at 16" in limit.reason and "floor 2" in limit.reason
    assert [c.limit for c in limit.history] == [16]
    assert AdaptiveLimit(ceiling=8, initial=3).limit == 3


def test_deferred_requests_bring_the_limit_down_to_what_the_server_runs() -> None:
    clock = Clock()
    limit = adaptive(clock)
    seen: list[int] = []
    limit.subscribe(seen.append)
    limit.on_saturation(deferred(12), in_flight=16)
    assert limit.limit == 4 and seen == [4]
    assert "12 requests deferred" in limit.reason and "runs 4 of ours" in limit.reason
    assert [(c.at, c.limit) for c in limit.history] == [(100.0, 16), (100.0, 4)]


def test_while_draining_the_excess_the_limit_does_not_fall_further() -> None:
    limit = adaptive(Clock())
    limit.on_saturation(deferred(12), in_flight=16)
    limit.on_saturation(deferred(8), in_flight=12)  # the 16 admitted before are still finishing
    limit.on_saturation(deferred(1), in_flight=5)
    assert limit.limit == 4


def test_requests_the_server_does_not_show_on_two_probes_in_a_row_bring_the_limit_to_running() -> None:
    limit = adaptive(Clock())
    hidden = Saturation(source=LLAMA, waiting=0, running=4)  # 12 of 16 wait unseen (HTTP threads busy)
    limit.on_saturation(hidden, in_flight=16)
    assert limit.limit == 16
    limit.on_saturation(hidden, in_flight=16)
    assert limit.limit == 4 and "wait unseen" in limit.reason


def test_a_gap_of_one_or_a_single_probe_is_not_a_backlog() -> None:
    limit = adaptive(Clock(), initial=4)
    for running in (3, 3, 3, 2, 4, 2, 4):  # a reply on its way back, a request on its way in
        limit.on_saturation(Saturation(source=LLAMA, waiting=0, running=running), in_flight=4)
    assert limit.limit == 4
    drain = adaptive(Clock(), initial=4)  # just lowered: our own excess still drains through the server
    for _ in range(3):
        drain.on_saturation(Saturation(source=LLAMA, waiting=0, running=3), in_flight=12)
    assert drain.limit == 4


def test_another_client_on_the_server_lowers_our_share() -> None:
    limit = adaptive(Clock(), initial=4)
    limit.on_saturation(deferred(1), in_flight=4)  # one slot is someone else's
    assert limit.limit == 3


def test_never_below_the_floor() -> None:
    limit = adaptive(Clock(), floor=2, initial=4)
    limit.on_saturation(deferred(20), in_flight=4)
    assert limit.limit == 2


def test_rises_by_one_when_full_and_clean_at_most_once_per_interval() -> None:
    clock = Clock()
    limit = adaptive(clock, initial=4)
    full_release(limit)
    assert limit.limit == 4  # not before increase_interval (2 s) since the start
    clock.now += 2.1
    limit.on_sample(rtt=1.0, in_flight=2, result=Result.SUCCESS)  # demand below the limit: no reason to rise
    assert limit.limit == 4
    full_release(limit)
    assert limit.limit == 5 and "up from 4" in limit.reason
    full_release(limit)
    assert limit.limit == 5
    clock.now += 2.1
    limit.on_saturation(Saturation(source=LLAMA, waiting=0, running=5), in_flight=5)
    full_release(limit)
    assert limit.limit == 6


def test_not_above_the_ceiling() -> None:
    clock = Clock()
    limit = adaptive(clock)
    clock.now += 10
    full_release(limit)
    assert limit.limit == 16


def test_a_confirmed_edge_is_probed_ever_more_rarely() -> None:
    clock = Clock()
    limit = adaptive(clock)
    limit.on_saturation(deferred(12), in_flight=16)  # edge found at 4
    waits = []
    for _ in range(4):
        start = clock.now
        limit.on_saturation(Saturation(source=LLAMA, waiting=0), in_flight=4)  # the server's queue is empty
        while limit.limit == 4:
            clock.now += 0.5
            full_release(limit)
        waits.append(clock.now - start)
        limit.on_saturation(deferred(1), in_flight=5)  # 5 is one too many again
        assert limit.limit == 4
    assert waits == [2.0, 4.0, 8.0, 16.0]


def test_an_edge_that_no_longer_holds_is_passed_and_the_climb_resumes() -> None:
    clock = Clock()
    limit = adaptive(clock)
    limit.on_saturation(deferred(12), in_flight=16)
    for expected in (5, 6, 7, 8):
        clock.now += 2.1
        limit.on_saturation(Saturation(source=LLAMA, waiting=0), in_flight=limit.limit)
        full_release(limit)
        assert limit.limit == expected


def test_follows_a_server_with_fewer_slots_down() -> None:
    limit = adaptive(Clock(), initial=4)
    limit.on_saturation(deferred(2, running=2), in_flight=4)
    assert limit.limit == 2


def test_a_saturated_probe_blocks_increases_until_it_is_stale() -> None:
    clock = Clock()
    limit = adaptive(clock, initial=4, kv_high=0.9, probe_ttl=5)
    limit.on_saturation(Saturation(source="vLLM /metrics", waiting=0, kv_cache_usage=0.5), in_flight=4)
    clock.now += 2.1
    limit.on_saturation(Saturation(source="vLLM /metrics", waiting=0, kv_cache_usage=0.95), in_flight=4)
    assert limit.limit == 3 and "KV cache 95% full" in limit.reason
    limit.on_saturation(Saturation(source="vLLM /metrics", waiting=0, kv_cache_usage=0.97), in_flight=3)
    assert limit.limit == 3  # one multiplicative decrease per cooldown (1 s)
    clock.now += 1.1
    limit.on_saturation(Saturation(source="vLLM /metrics", waiting=0, kv_cache_usage=0.97), in_flight=3)
    assert limit.limit == 2


def test_ollama_model_out_of_vram_counts_as_saturation() -> None:
    limit = adaptive(Clock(), initial=4)
    limit.on_saturation(Saturation(source="Ollama /api/ps", memory_pressure=True), in_flight=4)
    assert limit.limit == 3 and "not fully in GPU memory" in limit.reason


def test_latency_per_token_well_above_its_baseline_means_congestion_when_no_queue_metric() -> None:
    clock = Clock()
    limit = adaptive(clock, initial=8)
    for _ in range(10):
        limit.on_sample(rtt=0.64, in_flight=4, result=Result.SUCCESS, output_tokens=64)  # 10 ms a token
    assert limit.limit == 8
    for _ in range(4):
        limit.on_sample(rtt=3.2, in_flight=8, result=Result.SUCCESS, output_tokens=64)  # 50 ms a token
    assert limit.limit == 7 and "latency per output token" in limit.reason
    limit.on_sample(rtt=3.2, in_flight=7, result=Result.SUCCESS, output_tokens=64)
    assert limit.limit == 7  # cooldown
    clock.now += 1.1
    limit.on_sample(rtt=3.2, in_flight=7, result=Result.SUCCESS, output_tokens=64)
    assert limit.limit == 6


def test_latency_is_not_judged_from_short_replies_or_when_the_server_reports_its_queue() -> None:
    clock = Clock()
    limit = adaptive(clock, initial=8)
    for _ in range(10):
        limit.on_sample(rtt=0.64, in_flight=4, result=Result.SUCCESS, output_tokens=64)
    for _ in range(5):
        limit.on_sample(rtt=9.0, in_flight=4, result=Result.SUCCESS, output_tokens=1)  # a long prompt, one token
        limit.on_sample(rtt=9.0, in_flight=4, result=Result.SUCCESS, output_tokens=None)
    assert limit.limit == 8
    limit.on_saturation(Saturation(source=LLAMA, waiting=0, running=4), in_flight=4)
    for _ in range(5):
        limit.on_sample(rtt=3.2, in_flight=4, result=Result.SUCCESS, output_tokens=64)
    assert limit.limit == 8  # the server says nothing waits: its queue metric wins over latency


def test_an_upstream_error_is_a_decrease() -> None:
    limit = adaptive(Clock(), initial=10)
    limit.on_sample(rtt=0.1, in_flight=10, result=Result.DROPPED)
    assert limit.limit == 9 and "error" in limit.reason


def test_reconfigure_clamps_into_the_new_bounds() -> None:
    limit = adaptive(Clock())
    limit.reconfigure(floor=2, ceiling=6)
    assert (limit.limit, limit.floor, limit.ceiling) == (6, 2, 6)
    assert "reload" in limit.reason
    with pytest.raises(ValueError):
        limit.reconfigure(floor=5, ceiling=3)


def test_history_is_bounded_and_fixed_limits_keep_one_too() -> None:
    clock = Clock()
    limit = AdaptiveLimit(ceiling=1000, clock=clock, cooldown=0)
    for _ in range(1, 400):
        clock.now += 1
        limit.on_saturation(deferred(1), in_flight=limit.limit)
    assert len(limit.history) == HISTORY
    fixed = FixedLimit(4)
    fixed.set(6, "operator")
    assert [(c.limit, c.reason) for c in fixed.history][-1] == (6, "operator")


async def test_the_gate_follows_the_limit_without_preempting(clock: FakeClock) -> None:
    limit = AdaptiveLimit(ceiling=4, clock=clock.time)
    gate = Gate("gpu", limit, [LanePolicy(name="batch", queue_timeout=600)])
    held = [await gate.acquire("batch", "p") for _ in range(4)]
    waiting = asyncio.ensure_future(gate.acquire("batch", "p"))
    await settle()
    limit.on_saturation(deferred(2, running=2), in_flight=4)  # the server now runs 2
    assert gate.limit == 2 and gate.in_flight == 4  # nothing in flight is dropped
    for permit in held[:2]:
        permit.release()
    await settle()
    assert not waiting.done()  # 2 still in flight: at the new limit
    held[2].release()
    await settle()
    assert waiting.done() and gate.in_flight == 2
    for permit in (held[3], waiting.result()):
        permit.release()


def test_a_lane_held_at_its_cap_counts_as_demand() -> None:
    clock = Clock()
    limit = adaptive(clock, initial=4)
    clock.now += 2.1
    limit.on_sample(rtt=1.0, in_flight=3, result=Result.SUCCESS, blocked=False)
    assert limit.limit == 4
    limit.on_sample(rtt=1.0, in_flight=3, result=Result.SUCCESS, blocked=True)  # batch at limit - headroom, queued
    assert limit.limit == 5


async def test_the_gate_reports_a_headroom_bound_lane_as_blocked(clock: FakeClock) -> None:
    limit = AdaptiveLimit(ceiling=8, initial=4, clock=clock.time, increase_interval=1.0)
    gate = Gate("gpu", limit, [LanePolicy(name="batch", queue_timeout=600, headroom=1)])
    held = [await gate.acquire("batch", "p") for _ in range(3)]
    waiting = asyncio.ensure_future(gate.acquire("batch", "p"))
    await clock.advance(1.5)
    assert not waiting.done() and gate.in_flight == 3  # the fourth slot is kept for other lanes
    held.pop().release()  # the waiter gets the slot; the limit hears that the lane held someone back
    await settle()
    assert limit.limit == 5 and waiting.done()
    for permit in [*held, waiting.result()]:
        permit.release()


async def test_only_an_upstream_failure_counts_as_a_drop(clock: FakeClock) -> None:
    limit = AdaptiveLimit(ceiling=8, clock=clock.time)
    admission = Admission({"gpu": Gate("gpu", limit, [LanePolicy(name="batch")])}, RateLimiter())
    for error in (UpstreamUnavailable("down"), ClientDisconnected(), UpstreamTimeout("slow")):
        with contextlib.suppress(Exception):
            async with admission.enter("gpu", "batch", "p"):
                raise error
        await clock.advance(UNLEARNT_SECONDS + 0.2)  # cut before a first chunk: the slot's grace has passed
    assert [c.limit for c in limit.history] == [8, 7]
    assert "timeout" in limit.reason


async def test_connect_failures_with_requests_queued_never_raise_the_limit(clock: FakeClock) -> None:
    """Fast connect failures (the upstream is down) say nothing about its capacity: no climb to the ceiling."""
    limit = AdaptiveLimit(floor=2, ceiling=8, initial=2, increase_interval=0.1, clock=clock.time)
    admission = Admission({"gpu": Gate("gpu", limit, [LanePolicy(name="batch")])}, RateLimiter())

    async def failing() -> None:
        with contextlib.suppress(UpstreamUnavailable):
            async with admission.enter("gpu", "batch", "p"):
                raise UpstreamUnavailable("connection refused")

    for _ in range(4):
        tasks = [asyncio.ensure_future(failing()) for _ in range(5)]  # 5 at a time: 3 queue behind the cap
        for _ in range(5):
            await clock.advance(0.2)
        await asyncio.gather(*tasks)
    assert limit.limit == 2, limit.reason
