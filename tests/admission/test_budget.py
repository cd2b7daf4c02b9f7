"""Token budget: estimates learnt per profile, and the gate granting only what fits, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from gateway_guard.admission.budget import TokenBudget, estimate_prompt_tokens
from gateway_guard.admission.gate import Gate, LanePolicy, Permit
from gateway_guard.admission.limit import FixedLimit
from gateway_guard.errors import DeadlineExceeded
from tests.admission.conftest import FakeClock, settle

BATCH = LanePolicy(name="batch", queue_size=100, queue_timeout=60)


def budget_gate(capacity: int = 1000, *, limit: int = 8, default_output: int = 100) -> Gate:
    return Gate("gpu", FixedLimit(limit), [BATCH], budget=TokenBudget(capacity, default_output=default_output))


async def enqueue(gate: Gate, profile: str = "p", prompt_tokens: int = 0) -> asyncio.Task[Permit]:
    task = asyncio.ensure_future(gate.acquire("batch", profile, prompt_tokens=prompt_tokens))
    await settle()
    return task


def test_prompt_estimate_is_body_bytes_over_four() -> None:
    assert estimate_prompt_tokens(b"") == 0
    assert estimate_prompt_tokens(b"x" * 400) == 100
    assert estimate_prompt_tokens(b"x" * 401) == 101


def test_need_is_prompt_plus_the_default_output_until_the_profile_has_a_history() -> None:
    budget = TokenBudget(10_000, default_output=256)
    assert budget.need("p", 1000) == 1256


def test_every_request_needs_at_least_one_token() -> None:
    budget = TokenBudget(100, default_output=0)
    assert budget.need("p", 0) == 1  # so a request over the budget really goes alone (found by the stateful test)
    budget.learn("p", prompt_estimate=0, prompt_tokens=None, output_tokens=0)
    assert budget.need("p", 0) == 1


def test_output_estimate_is_learnt_from_usage_never_from_max_tokens() -> None:
    budget = TokenBudget(10_000, default_output=256)
    budget.learn("p", prompt_estimate=1000, prompt_tokens=None, output_tokens=40)
    assert budget.output_estimate("p") == 40  # the first answer replaces the default
    budget.learn("p", prompt_estimate=1000, prompt_tokens=None, output_tokens=140)
    assert budget.output_estimate("p") == pytest.approx(60)  # EWMA, alpha 0.2
    assert budget.output_estimate("q") == 256  # per profile


def test_prompt_estimate_is_calibrated_per_profile_from_reported_prompt_tokens() -> None:
    budget = TokenBudget(100_000, default_output=0)
    for _ in range(40):
        budget.learn("p", prompt_estimate=1000, prompt_tokens=500, output_tokens=0)
    assert budget.need("p", 1000) == pytest.approx(500, abs=2)
    for _ in range(60):
        budget.learn("q", prompt_estimate=10, prompt_tokens=10_000, output_tokens=0)
    assert budget.need("q", 10) == 40  # the correction is kept within 0.05..4


async def test_a_request_waits_until_its_tokens_fit_though_a_slot_is_free(clock: FakeClock) -> None:
    gate = budget_gate(1000)
    first = await gate.acquire("batch", "p", prompt_tokens=500)  # needs 600
    second = await enqueue(gate, prompt_tokens=500)
    assert not second.done() and gate.in_flight == 1
    snap = gate.snapshot()
    assert (snap.tokens_in_flight, snap.max_context_tokens) == (600, 1000)
    first.release()
    await settle()
    assert second.done()
    assert gate.snapshot().tokens_in_flight == 600
    second.result().release()
    assert gate.snapshot().tokens_in_flight == 0


async def test_a_request_larger_than_the_budget_is_admitted_alone(clock: FakeClock) -> None:
    gate = budget_gate(1000)
    small = await gate.acquire("batch", "p", prompt_tokens=100)
    huge = await enqueue(gate, prompt_tokens=50_000)
    assert not huge.done()
    small.release()
    await settle()
    assert huge.done()  # nothing else holds tokens: it goes, alone
    other = await enqueue(gate, prompt_tokens=10)
    assert not other.done()
    huge.result().release()
    await settle()
    assert other.done()
    other.result().release()


async def test_nobody_overtakes_the_head_that_waits_for_tokens(clock: FakeClock) -> None:
    gate = budget_gate(1000)
    held = await gate.acquire("batch", "a", prompt_tokens=400)  # 500 held
    big = await enqueue(gate, "b", prompt_tokens=800)  # needs 900: waits
    small = await enqueue(gate, "c", prompt_tokens=50)  # needs 150: would fit now, but must not overtake
    assert not big.done() and not small.done()
    held.release()
    await settle()
    assert big.done() and not small.done()
    big.result().release()
    await settle()
    assert small.done()
    small.result().release()


async def test_waiting_for_tokens_ends_at_the_queue_deadline_without_leaking(clock: FakeClock) -> None:
    gate = budget_gate(1000)
    held = await gate.acquire("batch", "p", prompt_tokens=800)
    waiting = await enqueue(gate, prompt_tokens=800)
    await clock.advance(61)
    assert isinstance(waiting.exception(), DeadlineExceeded)
    cancelled = await enqueue(gate, prompt_tokens=800)
    cancelled.cancel()
    await settle()
    held.release()
    snap = gate.snapshot()
    assert (snap.in_flight, snap.queued, snap.tokens_in_flight) == (0, 0, 0)


async def test_usage_reported_on_the_permit_teaches_the_budget(clock: FakeClock) -> None:
    gate = budget_gate(10_000, default_output=100)
    permit = await gate.acquire("batch", "p", prompt_tokens=1000)
    assert permit.tokens == 1100
    permit.report_usage(prompt_tokens=500, output_tokens=2000)
    assert permit.tokens_used == 2500
    permit.release()
    assert gate.budget is not None and gate.budget.output_estimate("p") == 2000
    again = await gate.acquire("batch", "p", prompt_tokens=1000)
    assert again.tokens == round(1000 * 0.9 + 2000)  # prompt ratio 1 -> 0.5 moves by alpha 0.2
    again.release()


async def test_tokens_used_stands_in_the_estimate_for_an_unreported_prompt(clock: FakeClock) -> None:
    gate = Gate("gpu", FixedLimit(1), [BATCH])  # no budget: the estimate still rides on the permit
    permit = await gate.acquire("batch", "p", prompt_tokens=300)
    permit.report_usage(prompt_tokens=None, output_tokens=25)
    assert (permit.tokens, permit.tokens_used) == (0, 325)
    permit.release()
    assert gate.snapshot().tokens_in_flight is None


async def test_a_limit_change_before_the_first_acquire_is_harmless(clock: FakeClock) -> None:
    limit = FixedLimit(2)
    gate = Gate("gpu", limit, [BATCH])
    limit.set(3)
    assert gate.limit == 3
