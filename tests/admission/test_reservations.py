"""Reservations: booking, consumption, expiry by a fake clock, the capacity they take off, and who hears of it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway_guard.admission.reservations import NoRoom, Reservations, apply_reservations


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def payload() -> dict[str, Any]:
    batch = {"limit": 4, "in_flight": 1, "queued": 0, "free": 3}
    return {
        "free": 3,
        "lanes": {"batch": dict(batch), "interactive": {"limit": 4, "in_flight": 0, "queued": 0, "free": 4}},
        "upstreams": {
            "a": {"limit": 4, "in_flight": 1, "queued": 0, "free": 3, "lanes": {"batch": dict(batch)}},
            "b": {"limit": 2, "in_flight": 0, "queued": 0, "free": 2, "lanes": {}},
        },
    }


def test_book_consume_and_count() -> None:
    clock = Clock()
    res = Reservations(clock=clock)
    first = res.book("worker1", 2, 30)
    res.book("worker2", 1, 30, upstream="a")
    assert res.reserved() == 3 and res.reserved("a") == 1 and res.reserved("b") == 0
    assert res.consume("b", "worker2") is False  # booked on upstream a only
    assert res.consume("b", "worker1") is True  # booked on no upstream: any will do
    assert res.get(first.id) is not None and res.get(first.id).n == 1  # type: ignore[union-attr]
    assert res.consume("a", "worker1") and res.get(first.id) is None  # used up: gone
    assert res.consume("a", "worker1") is False
    assert res.consume("a", "worker2") and res.reserved() == 0


def test_consume_prefers_the_booking_on_its_own_upstream() -> None:
    res = Reservations(clock=Clock())
    anywhere = res.book("w", 1, 30)
    on_a = res.book("w", 1, 30, upstream="a")
    assert res.consume("a", "w")
    assert res.get(on_a.id) is None and res.get(anywhere.id) is not None


def test_expiry_follows_the_clock() -> None:
    clock = Clock()
    res = Reservations(clock=clock)
    res.book("w", 2, 10)
    late = res.book("w", 1, 20)
    clock.now += 10  # the first expires exactly now
    assert res.reserved() == 1
    assert [r["id"] for r in res.list()] == [late.id] and res.list()[0]["expires_in"] == 10
    clock.now += 10
    assert res.reserved() == 0 and res.consume("x", "w") is False


def test_cancel() -> None:
    res = Reservations(clock=Clock())
    booked = res.book("w", 3, 10)
    assert res.cancel(booked.id) is True and res.reserved() == 0
    assert res.cancel(booked.id) is False
    assert res.cancel("nope") is False


def test_room_bounds_a_booking() -> None:
    res = Reservations(clock=Clock())
    assert res.book("w", 5, 10, room=2).n == 2
    with pytest.raises(NoRoom):
        res.book("w", 1, 10, room=0)
    assert res.reserved() == 2


@pytest.mark.parametrize(("args", "message"), [
    (("", 1, 10), "profile"), (("w", 0, 10), "n must be"), (("w", 1, 0), "ttl"), (("w", 1, float("nan")), "ttl"),
])
def test_bad_bookings_are_refused(args: tuple[str, int, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Reservations(clock=Clock()).book(*args)


def test_listeners_hear_every_change_and_can_leave() -> None:
    clock = Clock()
    res = Reservations(clock=clock)
    heard: list[int] = []
    stop = res.watch(lambda: heard.append(res.reserved()))
    booked = res.book("w", 2, 10)
    res.consume("a", "w")
    res.cancel(booked.id)
    res.book("w", 1, 5)
    clock.now += 5
    res.prune()  # expiry is a change too
    assert heard == [2, 1, 0, 1, 0]
    stop()
    res.book("w", 1, 5)
    assert heard == [2, 1, 0, 1, 0]


def test_apply_reservations_takes_booked_slots_off_free() -> None:
    res = Reservations(clock=Clock())
    original = payload()
    assert apply_reservations(original, res) == original | {
        "reserved": 0, "upstreams": {k: v | {"reserved": 0} for k, v in original["upstreams"].items()}
    }
    res.book("w", 2, 10)
    res.book("w", 1, 10, upstream="a")
    res.book("w", 5, 10, upstream="b")
    out = apply_reservations(original, res)
    assert original == payload()  # not changed in place
    assert out["reserved"] == 8
    assert out["free"] == 0 and out["lanes"]["batch"]["free"] == 0  # 3 - 8, never below 0
    assert out["lanes"]["interactive"]["free"] == 4
    assert out["upstreams"]["a"]["free"] == 2 and out["upstreams"]["a"]["lanes"]["batch"]["free"] == 2
    assert out["upstreams"]["a"]["reserved"] == 1
    assert out["upstreams"]["b"]["free"] == 0 and out["upstreams"]["b"]["reserved"] == 5


async def test_expiry_is_announced_by_a_loop_timer() -> None:
    res = Reservations()  # the loop's own clock
    expired = asyncio.Event()
    res.book("w", 1, 0.01)
    res.watch(lambda: expired.set() if res.reserved() == 0 else None)
    async with asyncio.timeout(5):
        await expired.wait()
    assert res.list() == []
