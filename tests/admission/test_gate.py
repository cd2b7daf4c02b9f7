from __future__ import annotations

import asyncio

import pytest

from gateway_guard.admission.gate import Gate, LanePolicy, Permit, ProfilePolicy
from gateway_guard.admission.limit import FixedLimit
from gateway_guard.errors import DeadlineExceeded, ProfileQueueFull, QueueFull, UnknownLane
from tests.admission.conftest import FakeClock, settle

INTERACTIVE = LanePolicy(name="interactive", priority=0, queue_size=8, queue_timeout=30)
BATCH = LanePolicy(name="batch", priority=1, queue_size=100, queue_timeout=600, headroom=0)


def make_gate(limit: int = 1, lanes: list[LanePolicy] | None = None, **kw: object) -> Gate:
    return Gate("gpu", FixedLimit(limit), lanes or [INTERACTIVE, BATCH], **kw)  # type: ignore[arg-type]


def spawn(gate: Gate, lane: str, profile: str = "p", **kw: float) -> asyncio.Task[Permit]:
    """Start an acquire in its own task; it enqueues at the next ``settle()``/``advance()``."""
    return asyncio.ensure_future(gate.acquire(lane, profile, **kw))


async def enqueue(gate: Gate, lane: str, profile: str = "p", **kw: float) -> asyncio.Task[Permit]:
    """Start an acquire and let it reach the queue at the current (fake) time."""
    task = spawn(gate, lane, profile, **kw)
    await settle()
    return task


async def test_grants_up_to_the_limit_then_queues(clock: FakeClock) -> None:
    gate = make_gate(limit=2)
    a = await gate.acquire("batch", "p")
    b = await gate.acquire("batch", "p")
    c = spawn(gate, "batch")
    await settle()
    assert not c.done()
    assert gate.in_flight == 2
    a.release()
    await settle()
    assert c.done() and gate.in_flight == 2
    b.release()
    c.result().release()
    assert gate.in_flight == 0


async def test_release_is_idempotent(clock: FakeClock) -> None:
    gate = make_gate(limit=1)
    p = await gate.acquire("batch", "p")
    p.release()
    p.release()
    assert gate.in_flight == 0
    assert gate.snapshot().free == 1


async def test_interactive_goes_before_batch(clock: FakeClock) -> None:
    gate = make_gate(limit=1)
    held = await gate.acquire("batch", "p")
    batch = await enqueue(gate, "batch")
    await clock.advance(1)
    interactive = spawn(gate, "interactive")
    await settle()
    held.release()
    await settle()
    assert interactive.done() and not batch.done()
    interactive.result().release()
    await settle()
    assert batch.done()
    batch.result().release()


async def test_aged_batch_request_beats_fresh_interactive(clock: FakeClock) -> None:
    gate = make_gate(limit=1, aging_seconds=10.0)
    held = await gate.acquire("interactive", "p")
    batch = await enqueue(gate, "batch")
    await clock.advance(11)  # batch rank 1 - 11/10 < 0: it has aged past any fresh interactive request
    interactive = spawn(gate, "interactive")
    await settle()
    held.release()
    await settle()
    assert batch.done() and not interactive.done()
    batch.result().release()
    await settle()
    interactive.result().release()


async def test_batch_is_not_starved_by_a_continuous_interactive_stream(clock: FakeClock) -> None:
    gate = make_gate(limit=1, aging_seconds=5.0)
    current = await gate.acquire("interactive", "p")
    batch = await enqueue(gate, "batch")
    for _ in range(20):  # each second an interactive request arrives and the slot turns over
        nxt = spawn(gate, "interactive")
        await clock.advance(1)
        current.release()
        await settle()
        if batch.done():
            break
        current = await nxt
    assert batch.done(), "batch request starved"
    batch.result().release()
    await settle()
    for t in asyncio.all_tasks():
        if t is not asyncio.current_task() and not t.done():
            (await t).release()


async def test_headroom_keeps_last_slot_for_interactive(clock: FakeClock) -> None:
    batch_lane = LanePolicy(name="batch", priority=1, queue_size=100, queue_timeout=600, headroom=1)
    gate = make_gate(limit=4, lanes=[INTERACTIVE, batch_lane])
    held = [await gate.acquire("batch", "p") for _ in range(3)]
    fourth = spawn(gate, "batch")
    await settle()
    assert not fourth.done(), "batch took the slot reserved for interactive"
    assert gate.snapshot().lanes["batch"].free == 0
    assert gate.snapshot().lanes["interactive"].free == 1
    interactive = await gate.acquire("interactive", "q")  # no wait: the reserved slot is there
    assert gate.in_flight == 4
    interactive.release()
    await settle()
    assert not fourth.done()
    held[0].release()
    await settle()
    assert fourth.done()
    for p in [*held[1:], fourth.result()]:
        p.release()


async def test_profile_cap_skips_capped_profile(clock: FakeClock) -> None:
    gate = make_gate(limit=4, profiles={"hog": ProfilePolicy(max_inflight=1)})
    first = await gate.acquire("batch", "hog")
    second = spawn(gate, "batch", "hog")
    await settle()
    assert not second.done(), "profile cap exceeded"
    other = await gate.acquire("batch", "other")
    assert gate.snapshot().profiles["hog"].free == 0
    first.release()
    await settle()
    assert second.done()
    second.result().release()
    other.release()


async def test_profiles_take_turns_within_a_lane(clock: FakeClock) -> None:
    gate = make_gate(limit=1)
    held = await gate.acquire("batch", "x")
    big = [spawn(gate, "batch", "big") for _ in range(40)]
    await settle()
    small = [spawn(gate, "batch", "small") for _ in range(2)]
    await settle()
    order: list[str] = []
    current = held
    for _ in range(42):
        current.release()
        await settle()
        granted = [t for t in big + small if t.done() and not t.result().released]
        assert len(granted) == 1
        current = granted[0].result()
        order.append(current.profile)
    current.release()
    assert order[:4] == ["big", "small", "big", "small"], order
    assert order.count("small") == 2


async def test_queue_deadline_raises_with_retry_after(clock: FakeClock) -> None:
    gate = make_gate(limit=1)
    held = await gate.acquire("interactive", "p")
    waiting = await enqueue(gate, "interactive")
    await clock.advance(29)
    assert not waiting.done()
    await clock.advance(2)
    assert waiting.done()
    err = waiting.exception()
    assert isinstance(err, DeadlineExceeded)
    assert err.status == 429 and err.lane == "interactive" and err.retry_after is not None and err.retry_after > 0
    assert gate.snapshot().queued == 0
    held.release()
    assert gate.snapshot().free == 1


async def test_explicit_max_wait_overrides_lane_deadline(clock: FakeClock) -> None:
    gate = make_gate(limit=1)
    held = await gate.acquire("batch", "p")
    waiting = await enqueue(gate, "batch", max_wait=5)
    await clock.advance(6)
    assert isinstance(waiting.exception(), DeadlineExceeded)
    held.release()


async def test_full_queue_rejects_at_once_with_honest_retry_after(clock: FakeClock) -> None:
    lane = LanePolicy(name="batch", priority=1, queue_size=2, queue_timeout=600)
    gate = make_gate(limit=1, lanes=[lane])
    held = await gate.acquire("batch", "p")
    await clock.advance(8)
    held.release()  # teaches the gate that a request holds its slot ~ (1 + 0.2*(8-1)) s on average
    held = await gate.acquire("batch", "p")
    queued = [spawn(gate, "batch") for _ in range(2)]
    await settle()
    with pytest.raises(QueueFull) as info:
        await gate.acquire("batch", "p")
    assert info.value.status == 429
    assert info.value.retry_after == pytest.approx(3 * 2.4)  # 2 ahead + itself, 2.4 s mean hold, 1 slot
    assert gate.snapshot().queued == 2
    held.release()
    for t in queued:
        await settle()
        (await t).release()


async def test_profile_queue_limit_is_a_429(clock: FakeClock) -> None:
    gate = make_gate(limit=1, profiles={"w": ProfilePolicy(max_queued=1)})
    held = await gate.acquire("batch", "w")
    first = spawn(gate, "batch", "w")
    await settle()
    with pytest.raises(ProfileQueueFull) as info:
        await gate.acquire("batch", "w")
    assert info.value.status == 429
    other = spawn(gate, "batch", "other")  # another profile still queues
    await settle()
    assert not other.done() and gate.snapshot().queued == 2
    held.release()
    await settle()
    (await first).release()
    await settle()
    (await other).release()


async def test_zero_queue_size_never_queues(clock: FakeClock) -> None:
    gate = make_gate(limit=1, lanes=[LanePolicy(name="batch", queue_size=0)])
    held = await gate.acquire("batch", "p")
    with pytest.raises(QueueFull):
        await gate.acquire("batch", "p")
    held.release()


async def test_unknown_lane_is_a_client_error(clock: FakeClock) -> None:
    gate = make_gate()
    with pytest.raises(UnknownLane) as info:
        await gate.acquire("bulk", "p")
    assert info.value.status == 400 and "interactive" in info.value.message


async def test_cancel_while_queued_leaves_no_trace(clock: FakeClock) -> None:
    gate = make_gate(limit=1)
    held = await gate.acquire("batch", "p")
    waiting = spawn(gate, "batch")
    await settle()
    waiting.cancel()
    await settle()
    assert waiting.cancelled()
    assert gate.snapshot().queued == 0
    held.release()
    await settle()
    assert gate.in_flight == 0 and gate.snapshot().free == 1


async def test_cancel_after_grant_before_resume_returns_the_permit(clock: FakeClock) -> None:
    gate = make_gate(limit=1)
    held = await gate.acquire("batch", "p")
    waiting = spawn(gate, "batch")
    await settle()
    held.release()  # grants the waiter's future synchronously ...
    waiting.cancel()  # ... and the task is cancelled before it runs again
    await settle()
    assert waiting.cancelled()
    assert gate.in_flight == 0, "permit leaked by a cancel racing a grant"


async def test_deadline_racing_a_grant_never_double_counts(clock: FakeClock) -> None:
    gate = make_gate(limit=1)
    held = await gate.acquire("batch", "p")
    waiting = spawn(gate, "batch", max_wait=5)
    await settle()
    clock.now += 5  # deadline is due, but the grant happens first in the same turn
    held.release()
    await settle()
    assert waiting.done() and not waiting.cancelled() and waiting.exception() is None
    assert gate.in_flight == 1
    waiting.result().release()
    assert gate.in_flight == 0


async def test_raising_the_limit_admits_waiters(clock: FakeClock) -> None:
    limit = FixedLimit(1)
    gate = Gate("gpu", limit, [BATCH])
    held = await gate.acquire("batch", "p")
    waiting = spawn(gate, "batch")
    await settle()
    limit.set(2)
    await settle()
    assert waiting.done() and gate.in_flight == 2
    held.release()
    waiting.result().release()


async def test_lowering_the_limit_stops_new_grants_until_below(clock: FakeClock) -> None:
    limit = FixedLimit(3)
    gate = Gate("gpu", limit, [BATCH])
    held = [await gate.acquire("batch", "p") for _ in range(3)]
    limit.set(1)
    waiting = spawn(gate, "batch")
    held[0].release()
    held[1].release()
    await settle()
    assert not waiting.done(), "granted while in-flight was still at the lowered limit"
    held[2].release()
    await settle()
    assert waiting.done()
    waiting.result().release()


async def test_capacity_snapshot_counts(clock: FakeClock) -> None:
    gate = make_gate(limit=3, profiles={"w": ProfilePolicy(max_inflight=2)})
    a = await gate.acquire("batch", "w")
    snap = gate.snapshot()
    assert (snap.limit, snap.in_flight, snap.queued, snap.free) == (3, 1, 0, 2)
    assert snap.lanes["batch"].as_dict() == {"limit": 3, "in_flight": 1, "queued": 0, "free": 2}
    assert snap.profiles["w"].as_dict() == {"limit": 2, "in_flight": 1, "queued": 0, "free": 1}
    a.release()


async def test_cancel_then_release_in_same_turn_grants_the_next_live_waiter(clock: FakeClock) -> None:
    gate = make_gate(limit=1)
    held = await gate.acquire("batch", "p")
    doomed = await enqueue(gate, "batch")
    alive = await enqueue(gate, "batch")
    doomed.cancel()  # its future is cancelled now; its cleanup runs only when the task resumes
    held.release()  # must skip the cancelled waiter, not crash on it
    await settle()
    assert doomed.cancelled()
    assert alive.done() and gate.in_flight == 1
    alive.result().release()
    assert gate.in_flight == 0
