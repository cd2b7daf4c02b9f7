"""The tick decision with plain values: min(free, target - running), pools, per-profile guard limits."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway_guard.dispatch.decide import (
    Policy,
    Pool,
    ReadyCard,
    Snapshot,
    Stop,
    decide,
    needs_queue,
    pool_overshoot,
)
from gateway_guard.dispatch.windows import Schedule

NOON = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def policy(target: int, *pools: Pool) -> Policy:
    return Policy(schedule=Schedule(default_target=target), pools=pools)


def cards(*assignees: str | None, priority: int = 0) -> list[ReadyCard]:
    """Ready cards in claim order: distinct created_at, so no ties."""
    return [ReadyCard(task_id=f"t{i}", assignee=a, priority=priority, created_at=i) for i, a in enumerate(assignees)]


REASONING = Pool(name="reasoning", profiles=frozenset({"researcher", "planner"}), limit=1)
LIGHT = Pool(name="lightweight", profiles=frozenset({"summarizer", "tagger"}), limit=3)


@pytest.mark.parametrize(
    ("free", "target", "running", "add", "stop"),
    [
        (3, 3, 0, 3, Stop.TARGET),
        (3, 5, 0, 3, Stop.GUARD_FREE),
        (1, 3, 0, 1, Stop.GUARD_FREE),
        (3, 3, 1, 2, Stop.TARGET),
        (3, 3, 3, 0, Stop.AT_TARGET),
        (3, 3, 5, 0, Stop.AT_TARGET),  # more running than the target (target lowered): never negative
        (0, 3, 0, 0, Stop.GUARD_FULL),
        (-2, 3, 0, 0, Stop.GUARD_FULL),  # a negative free from a confused guard counts as none
        (4, 0, 0, 0, Stop.AT_TARGET),  # target 0 pauses dispatching
    ],
)
def test_adds_min_of_free_and_room_under_target(free: int, target: int, running: int, add: int, stop: Stop) -> None:
    d = decide(policy(target), Snapshot(free=free, running={"w": running}), NOON)
    assert (d.add, d.stop) == (add, stop)
    assert d.running == running
    assert d.free == max(0, free)


def test_running_counts_every_profile_and_unassigned_cards() -> None:
    d = decide(policy(5), Snapshot(free=9, running={"a": 1, "b": 2, "": 1}), NOON)
    assert (d.running, d.add) == (4, 1)


def test_queue_bounds_the_ask_when_it_was_read() -> None:
    d = decide(policy(5), Snapshot(free=5, running={}, ready=cards("a", "b")), NOON)
    assert (d.add, d.stop) == (2, Stop.QUEUE_EMPTY)


def test_unassigned_cards_are_skipped_like_hermes_skips_them() -> None:
    d = decide(policy(5), Snapshot(free=5, running={}, ready=cards(None, "a", None)), NOON)
    assert (d.add, d.stop) == (1, Stop.QUEUE_EMPTY)


def test_pools_cap_running_cards_per_group_of_profiles() -> None:
    p = policy(10, REASONING, LIGHT)
    queue = cards("summarizer", "tagger", "summarizer", "summarizer", "tagger")
    d = decide(p, Snapshot(free=10, running={}, ready=queue), NOON)
    assert (d.add, d.stop, d.detail) == (3, Stop.POOL, "lightweight(3/3)")
    d = decide(p, Snapshot(free=10, running={"tagger": 2}, ready=queue), NOON)
    assert (d.add, d.stop) == (1, Stop.POOL)
    assert d.pool_room == {"reasoning": 1, "lightweight": 1}


def test_a_full_pool_at_the_head_of_the_queue_holds_back_the_cards_behind_it() -> None:
    # Hermes claims in order and cannot be told to skip a card: starting the summarizer card behind the
    # researcher card would start the researcher too.
    p = policy(10, REASONING, LIGHT)
    d = decide(p, Snapshot(free=10, running={"planner": 1}, ready=cards("researcher", "summarizer")), NOON)
    assert (d.add, d.stop, d.detail) == (0, Stop.POOL, "reasoning(1/1)")
    d = decide(p, Snapshot(free=10, running={"planner": 1}, ready=cards("summarizer", "researcher", "tagger")), NOON)
    assert (d.add, d.stop) == (1, Stop.POOL)


def test_pool_walk_follows_priority_then_age_not_list_order() -> None:
    queue = [
        ReadyCard(task_id="old-low", assignee="researcher", priority=0, created_at=1),
        ReadyCard(task_id="new-high", assignee="summarizer", priority=5, created_at=9),
        ReadyCard(task_id="mid", assignee="planner", priority=5, created_at=10),
    ]
    d = decide(policy(10, REASONING, LIGHT), Snapshot(free=10, running={}, ready=queue), NOON)
    # claim order: new-high (light), mid (reasoning 1/1), old-low (reasoning full) -> 2
    assert (d.add, d.stop) == (2, Stop.POOL)


def test_tied_cards_are_taken_only_as_far_as_any_choice_of_them_fits() -> None:
    tied = [ReadyCard(task_id=f"t{i}", assignee=a, priority=1, created_at=7)
            for i, a in enumerate(["researcher", "summarizer", "planner"])]
    d = decide(policy(10, REASONING, LIGHT), Snapshot(free=10, running={}, ready=tied), NOON)
    # Hermes may claim any of the three first; two could both be reasoning cards.
    assert (d.add, d.stop) == (1, Stop.POOL)
    d = decide(policy(10, REASONING, LIGHT), Snapshot(free=10, running={"researcher": 1}, ready=tied), NOON)
    assert d.add == 0


def test_profiles_outside_every_pool_are_bounded_only_by_free_and_target() -> None:
    d = decide(policy(4, REASONING), Snapshot(free=9, running={}, ready=cards(*["other"] * 6)), NOON)
    assert (d.add, d.stop) == (4, Stop.TARGET)


def test_guard_per_profile_free_slots_limit_that_profile() -> None:
    queue = cards("worker1", "worker1", "worker2", "worker1")
    snap = Snapshot(free=5, running={}, ready=queue, profile_free={"worker1": 1})
    d = decide(policy(5), snap, NOON)
    assert (d.add, d.stop, d.detail) == (1, Stop.PROFILE_FREE, "worker1(0 free)")
    snap = Snapshot(free=5, running={}, ready=queue, profile_free={"worker1": 2})
    assert decide(policy(5), snap, NOON).add == 3


def test_target_comes_from_the_window_in_force() -> None:
    from datetime import time
    from zoneinfo import ZoneInfo

    from gateway_guard.dispatch.windows import Window

    schedule = Schedule(
        default_target=2, timezone=ZoneInfo("Europe/Berlin"),
        windows=(Window(name="day", start=time(8), end=time(20), target=1),
                 Window(name="night", start=time(20), end=time(8), target=6)),
    )
    p = Policy(schedule=schedule)
    snap = Snapshot(free=10, running={"w": 1}, ready=None)
    day = decide(p, snap, datetime(2026, 11, 23, 10, 0, tzinfo=UTC))  # 11:00 in Berlin
    night = decide(p, snap, datetime(2026, 11, 23, 22, 30, tzinfo=UTC))  # 23:30 in Berlin
    assert (day.target.label, day.add, day.stop) == ("day", 0, Stop.AT_TARGET)
    assert (night.target.label, night.add) == ("night", 5)


def test_pools_need_the_ready_queue() -> None:
    assert needs_queue(policy(1, REASONING), {})
    assert needs_queue(policy(1), {"worker1": 1})
    assert not needs_queue(policy(1), {})
    with pytest.raises(ValueError, match="ready queue"):
        decide(policy(3, REASONING), Snapshot(free=3, running={}), NOON)


def test_pool_overshoot_reports_pools_given_more_than_their_room() -> None:
    p = policy(10, REASONING, LIGHT)
    d = decide(p, Snapshot(free=10, running={}, ready=cards("researcher", "summarizer")), NOON)
    assert pool_overshoot(p, d, ["researcher", "summarizer"]) == {}
    assert pool_overshoot(p, d, ["researcher", "planner", None, "x"]) == {"reasoning": 2}


def test_auto_target_without_a_queue_starts_into_free_slots_only() -> None:
    auto = Policy(schedule=Schedule(default_target=6), auto=True, queue_per_slot=0)
    assert decide(auto, Snapshot(free=3, running={"w": 2}, slots=3), NOON).add == 3  # more cards than slots: fine
    assert decide(auto, Snapshot(free=5, running={"w": 2}, slots=5), NOON).add == 4  # max_running bounds it
    queued = decide(auto, Snapshot(free=0, running={"w": 2}, queued=1, in_flight=2, slots=2), NOON)
    assert (queued.add, queued.stop) == (0, Stop.GUARD_QUEUED)
    fixed = decide(policy(6), Snapshot(free=2, running={"w": 2}, queued=1), NOON)
    assert fixed.add == 2  # a fixed target reads free only (already net of the queue)


@pytest.mark.parametrize(
    ("free", "in_flight", "queued", "starting", "running", "add", "stop"),
    [
        (2, 0, 0, 0, 0, 2, Stop.GUARD_FREE),  # cold start: the free slots only, no queue before anything is served
        (2, 0, 0, 2, 2, 0, Stop.STARTING),  # ... and nothing more while those two start
        (1, 1, 0, 0, 0, 5, Stop.GUARD_FREE),  # serving: the free slot, and two waiting per slot (2 x 2)
        (0, 2, 0, 0, 3, 3, Stop.TARGET),  # full, nothing waiting: four to start a queue, max_running (6) says 3
        (0, 2, 1, 0, 2, 3, Stop.GUARD_FREE),
        (0, 2, 4, 0, 3, 0, Stop.GUARD_QUEUED),  # the standing queue is there
        (0, 2, 9, 0, 3, 0, Stop.GUARD_QUEUED),
        (0, 2, 0, 4, 4, 0, Stop.STARTING),  # four workers starting will make the queue
        (0, 2, 1, 2, 4, 1, Stop.GUARD_FREE),
        (0, 2, 0, 0, 6, 0, Stop.AT_TARGET),
        (-1, 2, 0, 0, 0, 4, Stop.GUARD_FREE),  # a negative free counts as 0
    ],
)
def test_auto_target_counts_starting_cards_and_keeps_a_short_batch_queue(
    free: int, in_flight: int, queued: int, starting: int, running: int, add: int, stop: Stop
) -> None:
    auto = Policy(schedule=Schedule(default_target=6), auto=True, queue_per_slot=2)
    snapshot = Snapshot(free=free, running={"w": running}, queued=queued, in_flight=in_flight, slots=2,
                        starting=starting)
    decision = decide(auto, snapshot, NOON)
    assert (decision.add, decision.stop) == (add, stop)


def test_the_queue_is_per_slot_and_rounds_up() -> None:
    auto = Policy(schedule=Schedule(default_target=100), auto=True, queue_per_slot=0.5)
    assert decide(auto, Snapshot(free=0, running={}, in_flight=8, slots=8), NOON).add == 4
    assert decide(auto, Snapshot(free=0, running={}, in_flight=3, slots=3), NOON).add == 2


def test_a_tick_and_a_fixed_target_ignore_the_queue_and_starting_cards() -> None:
    auto = Policy(schedule=Schedule(default_target=6), auto=True, queue_per_slot=2)
    assert decide(auto.without_queue(), Snapshot(free=2, running={}, in_flight=1, slots=3), NOON).add == 2
    assert decide(auto.without_queue(), Snapshot(free=0, running={}, in_flight=2, slots=2), NOON).add == 0
    fixed = decide(policy(4), Snapshot(free=3, running={"w": 1}, in_flight=1, slots=4, starting=1), NOON)
    assert (fixed.add, fixed.stop) == (3, Stop.TARGET)
