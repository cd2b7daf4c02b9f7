"""Random acquire / release / cancel / deadline / limit-change / reconfigure sequences, with a token budget: the
cap, the budget and the profile caps hold and nothing leaks after every step."""

from __future__ import annotations

import asyncio
import dataclasses

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway_guard.admission.budget import TokenBudget
from gateway_guard.admission.gate import Gate, LanePolicy, Permit, ProfilePolicy
from gateway_guard.admission.limit import FixedLimit
from gateway_guard.admission.policy import BudgetSpec, FixedLimitSpec, Result, UpstreamPolicy
from gateway_guard.errors import Rejected, UnknownLane

LIMIT = 3
LANES = [
    LanePolicy(name="interactive", priority=0, queue_size=3, queue_timeout=5),
    LanePolicy(name="batch", priority=1, queue_size=6, queue_timeout=20, headroom=1),
]
PROFILES = {"a": ProfilePolicy(max_inflight=1, max_queued=3), "b": ProfilePolicy(max_inflight=2)}
BUDGET = 100  # context tokens in flight; requests need prompt + learnt output (default 10), some more than all


class GateMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now = 0.0
        self.loop.time = lambda: self.now  # type: ignore[method-assign]
        self.limit = FixedLimit(LIMIT)
        self.gate = self.run(self._make_gate())
        self.pending: list[asyncio.Task[Permit]] = []
        self.held: list[Permit] = []
        self.granted_now: list[Permit] = []
        self.budget_cap = BUDGET
        self.cap_a = 1
        self.interactive_open = True

    async def _make_gate(self) -> Gate:
        return Gate("up", self.limit, LANES, PROFILES, aging_seconds=4, budget=TokenBudget(BUDGET, default_output=10))

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def settle(self) -> None:
        async def _settle() -> None:
            for _ in range(6):
                await asyncio.sleep(0)

        self.run(_settle())
        self.granted_now = []
        for task in list(self.pending):
            if task.done():
                self.pending.remove(task)
                if not task.cancelled() and task.exception() is None:
                    self.held.append(task.result())
                    self.granted_now.append(task.result())
                elif not task.cancelled():
                    error = task.exception()
                    assert isinstance(error, Rejected) or (isinstance(error, UnknownLane) and not self.interactive_open)

    @rule(
        lane=st.sampled_from(["interactive", "batch"]),
        profile=st.sampled_from(["a", "b", "c"]),
        prompt=st.sampled_from([0, 30, 80, 150]),
    )
    def acquire(self, lane: str, profile: str, prompt: int) -> None:
        self.pending.append(self.loop.create_task(self.gate.acquire(lane, profile, prompt_tokens=prompt)))
        self.settle()

    @precondition(lambda self: self.held)
    @rule(i=st.integers(min_value=0), dropped=st.booleans(), output=st.sampled_from([None, 0, 5, 60]))
    def release(self, i: int, dropped: bool, output: int | None) -> None:
        permit = self.held.pop(i % len(self.held))
        permit.report_usage(prompt_tokens=None, output_tokens=output)  # teaches the budget
        permit.release(Result.DROPPED if dropped else Result.SUCCESS)
        if i % 3 == 0:
            permit.release()  # double release must be harmless
        self.settle()

    @precondition(lambda self: self.pending)
    @rule(i=st.integers(min_value=0))
    def cancel_waiting(self, i: int) -> None:
        self.pending[i % len(self.pending)].cancel()
        self.settle()

    @precondition(lambda self: self.held and self.pending)
    @rule(i=st.integers(min_value=0), j=st.integers(min_value=0))
    def release_then_cancel_same_turn(self, i: int, j: int) -> None:
        self.held.pop(i % len(self.held)).release()
        self.pending[j % len(self.pending)].cancel()
        self.settle()

    @rule(limit=st.integers(min_value=1, max_value=4))
    def change_limit(self, limit: int) -> None:
        self.limit.set(limit)
        self.settle()

    @rule(
        batch_headroom=st.integers(min_value=0, max_value=1),
        budget=st.sampled_from([50, 100, 200]),
        cap_a=st.integers(min_value=1, max_value=2),
        interactive=st.booleans(),
    )
    def reconfigure(self, batch_headroom: int, budget: int, cap_a: int, interactive: bool) -> None:
        """A config reload: queued and in-flight requests stay; a removed lane drains."""
        lanes = [dataclasses.replace(LANES[1], headroom=batch_headroom)] + ([LANES[0]] if interactive else [])
        profiles = {**PROFILES, "a": ProfilePolicy(max_inflight=cap_a, max_queued=3)}
        before = self.gate.snapshot()
        policy = UpstreamPolicy(
            name="gpu",
            limit=FixedLimitSpec(value=self.limit.limit),
            lanes={lane.name: lane for lane in lanes},
            budget=BudgetSpec(max_context_tokens=budget),
        )
        self.gate.reconfigure(policy, profiles=profiles, aging_seconds=4, limit=self.limit)
        self.budget_cap, self.cap_a, self.interactive_open = budget, cap_a, interactive
        after = self.gate.snapshot()
        assert after.queued + (after.in_flight - before.in_flight) == before.queued, "a queued request was lost"
        self.settle()

    @rule(seconds=st.floats(min_value=0.1, max_value=12))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.settle()

    @invariant()
    def cap_holds_and_nothing_leaks(self) -> None:
        snap = self.gate.snapshot()
        limit = self.limit.limit
        assert snap.in_flight == len(self.held), "permit leaked or double counted"
        assert snap.in_flight <= 4
        by_profile = {p: sum(1 for h in self.held if h.profile == p) for p in "abc"}
        if self.granted_now:  # granted under the current policy (a lowered one drains, never preempts)
            assert snap.in_flight <= limit
            headroom = self.gate.lane_policy("batch").headroom
            if any(p.lane == "batch" for p in self.granted_now):
                assert snap.lanes["batch"].in_flight <= max(1, limit - headroom)
            assert len(self.held) <= 1 or snap.tokens_in_flight <= self.budget_cap, "over budget, not alone"
            if any(p.profile == "a" for p in self.granted_now):
                assert by_profile["a"] <= self.cap_a
        assert snap.tokens_in_flight == sum(p.tokens for p in self.held), "budget tokens leaked"
        assert by_profile["a"] <= 2 and by_profile["b"] <= 2
        waiting = sum(1 for t in self.pending if not t.done())
        assert snap.queued == waiting
        # work-conserving: a free slot and an eligible waiter never coexist
        if snap.in_flight < limit and snap.queued:
            assert all(
                not t.done() for t in self.pending
            )  # anything eligible would already have been granted in settle()

    def teardown(self) -> None:
        for permit in self.held:
            permit.release()
        for task in self.pending:
            task.cancel()
        self.settle()
        snap = self.gate.snapshot()
        assert (snap.in_flight, snap.queued, snap.tokens_in_flight) == (0, 0, 0)
        self.loop.close()


TestGateMachine = GateMachine.TestCase
TestGateMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
