"""The ticket: rate limits then a slot inside one deadline, and exactly one release per admitted request, with
the right ``Result``, on every way out -- driven through ``Admission.enter`` only, on a fake clock."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import pytest

from gateway_guard.admission.first_chunk import DECAY, MARGIN, UNLEARNT_SECONDS, FirstChunkEstimate
from gateway_guard.admission.gate import Gate, LanePolicy
from gateway_guard.admission.limit import FixedLimit, LimitChange
from gateway_guard.admission.policy import RatePolicy, Result
from gateway_guard.admission.rate import RateLimiter
from gateway_guard.admission.ticket import ABORT_GRACE_SECONDS, MAX_FIRST_CHUNK_GRACE_SECONDS, Admission, Usage
from gateway_guard.app.asgi import ClientDisconnected
from gateway_guard.errors import DeadlineExceeded, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway_guard.upstream.saturation import Saturation
from tests.admission.conftest import FakeClock, settle


class RecordingLimit:
    """A fixed cap that records every sample the gate hands it (the adaptive limit's input)."""

    def __init__(self, limit: int) -> None:
        self._fixed = FixedLimit(limit)
        self.samples: list[Result] = []
        self.reason = "fixed"
        self.history: deque[LimitChange] = deque()

    @property
    def limit(self) -> int:
        return self._fixed.limit

    def on_sample(
        self, *, rtt: float, in_flight: int, result: Result, output_tokens: int | None = None, blocked: bool = False
    ) -> None:
        self.samples.append(result)

    def on_saturation(self, sat: Saturation, *, in_flight: int) -> None:
        return None

    def set(self, limit: int, reason: str = "set by operator") -> None:
        self._fixed.set(limit, reason)

    def subscribe(self, listener: Callable[[int], None]) -> None:
        self._fixed.subscribe(listener)


def doors(limit: int = 2, rates: RateLimiter | None = None) -> tuple[Admission, Gate, RecordingLimit]:
    recording = RecordingLimit(limit)
    gate = Gate("gpu", recording, [LanePolicy(name="batch", queue_timeout=10)])
    return Admission({"gpu": gate}, rates or RateLimiter()), gate, recording


@pytest.mark.parametrize(
    ("exc", "result", "grace"),
    [
        (None, Result.SUCCESS, False),
        (UpstreamUnavailable("connect refused"), Result.IGNORED, False),  # never reached the server
        (UpstreamTimeout("silent"), Result.DROPPED, True),
        (UpstreamError("reset mid-stream"), Result.DROPPED, True),
        (ClientDisconnected(), Result.IGNORED, True),
        (asyncio.CancelledError(), Result.IGNORED, True),
    ],
)
async def test_every_way_out_releases_once_with_its_result(
    clock: FakeClock, exc: BaseException | None, result: Result, grace: bool
) -> None:
    admission, gate, limit = doors()
    with pytest.raises(type(exc)) if exc is not None else _nothing():
        async with admission.enter("gpu", "batch", "p") as ticket:
            assert gate.in_flight == 1
            ticket.usage = Usage(10, 5)
            ticket.chunk_arrived()  # the answer had begun (before it, see the first-chunk tests below)
            if exc is not None:
                raise exc
    if grace:  # cut off after reaching the server: the slot is the server's a moment longer
        assert gate.in_flight == 1
        await clock.advance(ABORT_GRACE_SECONDS / 2)
        assert gate.in_flight == 1
        await clock.advance(ABORT_GRACE_SECONDS)
    assert gate.in_flight == 0
    assert limit.samples == [result]
    await clock.advance(10)
    assert limit.samples == [result] and gate.in_flight == 0  # released exactly once


async def test_an_explicit_finish_wins_over_the_exit(clock: FakeClock) -> None:
    admission, gate, limit = doors()
    with pytest.raises(ClientDisconnected):
        async with admission.enter("gpu", "batch", "p") as ticket:
            ticket.finish(Result.SUCCESS, Usage(1, 1))
            assert gate.in_flight == 0
            raise ClientDisconnected()
    await clock.advance(1)
    assert limit.samples == [Result.SUCCESS]


async def test_tokens_used_are_charged_to_the_token_rate(clock: FakeClock) -> None:
    rates = RateLimiter({}, {"p": RatePolicy(tokens_per_minute=600)})
    admission, _, _ = doors(rates=rates)
    async with admission.enter("gpu", "batch", "p") as ticket:
        ticket.usage = Usage(prompt_tokens=500, output_tokens=100)
    assert rates.snapshot()["profile p"]["tokens_level"] == pytest.approx(600, abs=1)


async def test_admit_shares_one_deadline_between_the_rate_wait_and_the_queue(clock: FakeClock) -> None:
    rates = RateLimiter({}, {"p": RatePolicy(requests_per_minute=15)})  # one every 4 s
    admission, gate, _ = doors(limit=1, rates=rates)
    holder = admission.enter("gpu", "batch", "p")
    await holder.__aenter__()
    for _ in range(14):
        await rates.admit("batch", "p", max_wait=0)

    async def late_request() -> None:
        async with admission.enter("gpu", "batch", "p"):
            pass

    late = asyncio.ensure_future(late_request())
    await settle()
    await clock.advance(4.1)  # the rate wait is over; now it queues for the slot with ~6 s left
    assert not late.done()
    await clock.advance(5)
    assert not late.done()
    await clock.advance(1)
    assert isinstance(late.exception(), DeadlineExceeded)
    await holder.__aexit__(None, None, None)
    assert gate.in_flight == 0


async def test_admit_adds_the_rate_wait_to_the_queue_wait(clock: FakeClock) -> None:
    rates = RateLimiter({}, {"p": RatePolicy(requests_per_minute=60)})
    admission, _, _ = doors(rates=rates)
    for _ in range(60):
        await rates.admit("batch", "p", max_wait=0)
    waits: list[float] = []

    async def request() -> None:
        async with admission.enter("gpu", "batch", "p") as ticket:
            waits.append(ticket.queue_wait)

    task = asyncio.ensure_future(request())
    await settle()
    await clock.advance(1.01)
    await task
    assert waits == [pytest.approx(1.01)]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


async def test_a_slow_server_gets_a_longer_grace_to_notice_the_hang_up(clock: FakeClock) -> None:
    """llama.cpp notices a closed connection when it next writes a token: at 0.2 s a token, the slot of a cut-off
    stream stays counted three gaps (0.6 s), not the 0.1 s a fast server needs."""
    admission, gate, _ = doors()
    with pytest.raises(ClientDisconnected):
        async with admission.enter("gpu", "batch", "p") as ticket:
            for _ in range(10):
                await clock.advance(0.2)
                ticket.chunk_arrived()
            assert ticket.grace == pytest.approx(0.6, rel=0.05)
            raise ClientDisconnected()
    await clock.advance(0.5)
    assert gate.in_flight == 1
    await clock.advance(0.15)
    assert gate.in_flight == 0


async def test_cut_off_before_its_first_chunk_the_slot_stays_while_the_prompt_is_expected_to_be_read(
    clock: FakeClock,
) -> None:
    """llama.cpp reads the whole prompt before it notices a closed connection (5.8 s after a hang-up during a
    2,700-token prompt, measured): the permit stays for what is left of this upstream's learnt time to a first
    chunk for a prompt this long, not the 0.1 s of a request that was already answering."""
    admission, gate, _ = doors()
    async with admission.enter("gpu", "batch", "p", prompt_tokens=1000) as ticket:  # teaches: 2 ms a token
        await clock.advance(2.0)
        ticket.chunk_arrived()
    assert gate.in_flight == 0
    with pytest.raises(ClientDisconnected):
        async with admission.enter("gpu", "batch", "p", prompt_tokens=1000):
            await clock.advance(0.5)  # the client leaves while the server still reads its prompt
            raise ClientDisconnected()
    await clock.advance(MARGIN * 2.0 - 0.5)  # 2.0 s learnt (with its margin) from admission: still reading
    assert gate.in_flight == 1
    await clock.advance(ABORT_GRACE_SECONDS + 0.05)
    assert gate.in_flight == 0


async def test_before_anything_is_learnt_a_cut_off_before_the_first_chunk_keeps_its_slot_a_while(
    clock: FakeClock,
) -> None:
    admission, gate, _ = doors()
    with pytest.raises(ClientDisconnected):
        async with admission.enter("gpu", "batch", "p", prompt_tokens=50_000):
            raise ClientDisconnected()
    await clock.advance(UNLEARNT_SECONDS)
    assert gate.in_flight == 1
    await clock.advance(ABORT_GRACE_SECONDS + 0.05)
    assert gate.in_flight == 0


async def test_a_prompt_longer_than_any_grace_frees_its_slot_at_the_bound(clock: FakeClock) -> None:
    admission, gate, _ = doors()
    async with admission.enter("gpu", "batch", "p", prompt_tokens=100) as ticket:  # 1 s a token
        await clock.advance(100)
        ticket.chunk_arrived()
    with pytest.raises(ClientDisconnected):
        async with admission.enter("gpu", "batch", "p", prompt_tokens=100_000):
            raise ClientDisconnected()
    await clock.advance(MAX_FIRST_CHUNK_GRACE_SECONDS - 0.1)
    assert gate.in_flight == 1
    await clock.advance(0.2)
    assert gate.in_flight == 0  # bounded: the timer always fires


def test_the_first_chunk_estimate_holds_its_peak_and_decays_slowly() -> None:
    """A cached prompt prefix answers early; following it down would free an uncached request's slot early."""
    estimate = FirstChunkEstimate()
    estimate.observe(1000, 2.0)
    estimate.observe(1000, 0.01)  # a cached prefix
    assert estimate.expected(1000) == pytest.approx(MARGIN * 2.0 * DECAY)
    estimate.observe(1000, 3.0)
    assert estimate.expected(1000) == pytest.approx(MARGIN * 3.0)
    assert estimate.expected(10) == estimate.expected(64)  # a short prompt is the server's fixed latency
    estimate.observe(10, -1.0)  # a clock that went back teaches nothing
    assert estimate.expected(1000) == pytest.approx(MARGIN * 3.0)
