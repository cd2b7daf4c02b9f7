"""Rate limits on a fake clock: request buckets, tokens charged after the fact (debt), deadlines, refunds."""

from __future__ import annotations

import asyncio

import pytest

from gateway_guard.admission.rate import RateLimiter, RatePolicy
from gateway_guard.errors import RateLimited
from tests.admission.conftest import FakeClock, settle


def limiter(lane: RatePolicy | None = None, profile: RatePolicy | None = None) -> RateLimiter:
    return RateLimiter({"batch": lane} if lane else {}, {"p": profile} if profile else {})


async def test_unlimited_names_pass_at_once(clock: FakeClock) -> None:
    rates = limiter(profile=RatePolicy(requests_per_minute=1))
    for _ in range(100):
        await rates.admit("batch", "other", max_wait=0)
    assert not limiter().active


async def test_requests_per_minute_allows_a_burst_then_waits(clock: FakeClock) -> None:
    rates = limiter(profile=RatePolicy(requests_per_minute=60))
    for _ in range(60):
        await rates.admit("batch", "p", max_wait=0)
    late = asyncio.ensure_future(rates.admit("batch", "p", max_wait=30))
    await settle()
    assert not late.done() and rates.waiting == 1
    await clock.advance(0.5)
    assert not late.done()
    await clock.advance(0.6)  # one request leaks out per second
    assert late.done() and late.exception() is None
    assert rates.waiting == 0


async def test_over_the_limit_past_the_deadline_is_429_at_once_with_time_until_room(clock: FakeClock) -> None:
    rates = limiter(profile=RatePolicy(requests_per_minute=6))  # one every 10 s
    for _ in range(6):
        await rates.admit("batch", "p", max_wait=0)
    with pytest.raises(RateLimited) as info:
        await rates.admit("batch", "p", max_wait=5)
    assert info.value.status == 429
    assert info.value.retry_after == pytest.approx(10.0)
    assert info.value.headers() == {"retry-after": "10"}
    assert "profile p" in info.value.message and "6 requests per minute" in info.value.message


async def test_tokens_are_charged_after_the_fact_and_a_long_answer_puts_the_bucket_in_debt(clock: FakeClock) -> None:
    rates = limiter(profile=RatePolicy(tokens_per_minute=600))  # 10 tokens/s
    await rates.admit("batch", "p", max_wait=0)  # nothing charged yet: admitted
    rates.charge("batch", "p", 1200)  # the answer was long: 600 over the limit
    with pytest.raises(RateLimited) as info:
        await rates.admit("batch", "p", max_wait=30)
    assert info.value.retry_after == pytest.approx(60.0)  # 600 tokens of debt at 10/s
    waiting = asyncio.ensure_future(rates.admit("batch", "p", max_wait=100))
    await clock.advance(59)
    assert not waiting.done()
    await clock.advance(1.5)
    assert waiting.done() and waiting.exception() is None


async def test_tokens_under_the_limit_do_not_block(clock: FakeClock) -> None:
    rates = limiter(lane=RatePolicy(tokens_per_minute=1000))
    for _ in range(5):
        await rates.admit("batch", "p", max_wait=0)
        rates.charge("batch", "p", 150)
    await rates.admit("batch", "p", max_wait=0)
    assert rates.snapshot()["lane batch"]["tokens_level"] == pytest.approx(750)


async def test_a_waiter_that_loses_the_race_is_rejected_at_its_deadline(clock: FakeClock) -> None:
    rates = limiter(profile=RatePolicy(requests_per_minute=60))
    for _ in range(60):
        await rates.admit("batch", "p", max_wait=0)
    first = asyncio.ensure_future(rates.admit("batch", "p", max_wait=1.5))
    await settle()
    second = asyncio.ensure_future(rates.admit("batch", "p", max_wait=1.5))
    await settle()
    await clock.advance(1.05)
    assert first.done() and first.exception() is None
    assert not second.done()
    await clock.advance(0.5)
    assert isinstance(second.exception(), RateLimited)
    assert rates.waiting == 0


async def test_a_unit_taken_from_one_bucket_is_given_back_when_another_says_no(clock: FakeClock) -> None:
    rates = limiter(lane=RatePolicy(requests_per_minute=60), profile=RatePolicy(requests_per_minute=6))  # leaks 0.1/s
    for _ in range(60):
        await rates.admit("batch", "q", max_wait=0)  # fills the lane; q has no limit of its own
    ahead = asyncio.ensure_future(rates.admit("batch", "q", max_wait=1.5))
    await settle()
    attempt = asyncio.ensure_future(rates.admit("batch", "p", max_wait=1.5))
    await settle()
    assert rates.snapshot()["profile p"]["requests_level"] == pytest.approx(1)  # taken, now waiting on the lane
    await clock.advance(1.05)
    assert ahead.done() and not attempt.done()
    await clock.advance(0.5)
    assert isinstance(attempt.exception(), RateLimited)
    assert rates.snapshot()["profile p"]["requests_level"] == 0  # given back


async def test_cancelled_waiter_gives_back_what_it_took(clock: FakeClock) -> None:
    rates = limiter(lane=RatePolicy(requests_per_minute=60), profile=RatePolicy(requests_per_minute=600))
    for _ in range(60):
        await rates.admit("batch", "p", max_wait=0)
    attempt = asyncio.ensure_future(rates.admit("batch", "p", max_wait=10))
    await settle()
    attempt.cancel()
    await settle()
    assert attempt.cancelled() and rates.waiting == 0
    assert rates.snapshot()["profile p"]["requests_level"] == pytest.approx(60)


async def test_reconfigure_keeps_levels_retunes_and_wakes_waiters(clock: FakeClock) -> None:
    rates = limiter(profile=RatePolicy(requests_per_minute=6))
    for _ in range(6):
        await rates.admit("batch", "p", max_wait=0)
    waiting = asyncio.ensure_future(rates.admit("batch", "p", max_wait=60))
    await settle()
    assert not waiting.done()
    rates.reconfigure({}, {"p": RatePolicy(requests_per_minute=12)})  # room at once: 6 of 12 used
    await settle()
    assert waiting.done() and waiting.exception() is None
    rates.reconfigure({}, {})
    assert not rates.active and rates.snapshot() == {}
