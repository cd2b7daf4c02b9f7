"""The status page's history: bounded ring buffers on a fake clock (no sleeps)."""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
from collections.abc import Mapping
from typing import Any

import pytest

from gateway_guard.app.history import MAX_PROFILES, OTHER, History, sample_forever
from gateway_guard.errors import Outcome
from gateway_guard.telemetry import RequestRecord

T0 = 1_800_000_000.0  # a fixed wall-clock start


def capacity(in_flight: int = 0, queued: int = 0, limit: int = 4, name: str = "gpu") -> dict[str, Any]:
    return {"free": 0, "lanes": {}, "upstreams": {name: {"limit": limit, "in_flight": in_flight, "queued": queued}}}


def record(outcome: Outcome, status: int, *, profile: str = "alpha", tokens: int = 0, error: str | None = None) -> Any:
    r = RequestRecord(method="POST", path="/v1/chat/completions", lane="batch", profile=profile, upstream="gpu")
    r.outcome, r.status, r.error = outcome, status, error
    if tokens:
        r.prompt_tokens, r.completion_tokens = tokens // 2, tokens - tokens // 2
    return r


def test_a_step_keeps_the_most_seen_and_the_last_limit() -> None:
    h = History(window=60, resolution=10)
    h.sample(capacity(1, 0, 4), T0)
    h.sample(capacity(3, 2, 4), T0 + 3)
    h.sample(capacity(2, 0, 5), T0 + 6)
    h.sample(capacity(0, 0, 5), T0 + 10)
    assert h.points("gpu", T0 + 10) == [[T0, 3, 2, 5], [T0 + 10, 0, 0, 5]]


def test_points_older_than_the_window_leave() -> None:
    h = History(window=60, resolution=10)
    for i in range(20):
        h.sample(capacity(i, 0), T0 + 10 * i)
    pts = h.points("gpu", T0 + 190)
    assert len(pts) == 6 and [p[1] for p in pts] == [14, 15, 16, 17, 18, 19]


def test_state_changes_keep_their_since_and_requests_move_it() -> None:
    h = History()
    h.set_state("gpu", "up", "GET /health -> 200", T0)
    h.set_state("gpu", "up", "GET /health -> 200", T0 + 5)
    assert h.as_dict(T0 + 6)["upstreams"]["gpu"] | {"points": []} == {
        "state": "up",
        "since": T0,
        "detail": "GET /health -> 200",
        "points": [],
    }
    h.observe(record(Outcome.UPSTREAM_ERROR, 502, error="upstream 'gpu' is unreachable"), T0 + 7)
    gpu = h.as_dict(T0 + 8)["upstreams"]["gpu"]
    assert (gpu["state"], gpu["since"], gpu["detail"]) == ("down", T0 + 7, "upstream 'gpu' is unreachable")
    h.observe(record(Outcome.ADMITTED, 200), T0 + 9)
    assert h.as_dict(T0 + 9)["upstreams"]["gpu"]["state"] == "up"


def test_refusals_newest_first_and_bounded() -> None:
    h = History(max_refusals=3)
    h.observe(record(Outcome.ADMITTED, 200), T0)
    h.observe(record(Outcome.REJECTED_CLIENT, 401, error="an API key is required"), T0)
    for i in range(5):
        h.observe(record(Outcome.REJECTED_PROFILE_QUEUE, 429, profile=f"p{i}", error="queue full"), T0 + i)
    refusals = h.as_dict(T0 + 5)["refusals"]
    assert [r["profile"] for r in refusals] == ["p4", "p3", "p2"]
    assert refusals[0] == {
        "at": T0 + 4,
        "status": 429,
        "lane": "batch",
        "profile": "p4",
        "upstream": "gpu",
        "outcome": "rejected_profile_queue",
        "reason": "queue full",
    }


def test_tokens_per_minute_is_a_sliding_minute_per_profile() -> None:
    h = History()
    h.observe(record(Outcome.ADMITTED, 200, profile="alpha", tokens=100), T0)
    h.observe(record(Outcome.ADMITTED, 200, profile="beta", tokens=30), T0 + 25)
    h.observe(record(Outcome.ADMITTED, 200, profile="alpha", tokens=20), T0 + 45)
    assert h.tokens_per_minute(T0 + 50) == {"alpha": 120, "beta": 30}
    assert h.tokens_per_minute(T0 + 61) == {"alpha": 20, "beta": 30}
    assert h.tokens_per_minute(T0 + 200) == {}


def test_profiles_beyond_the_cap_are_summed_as_other() -> None:
    h = History()
    for i in range(MAX_PROFILES + 10):
        h.observe(record(Outcome.ADMITTED, 200, profile=f"p{i:03d}", tokens=2), T0)
    tpm = h.tokens_per_minute(T0)
    assert len(tpm) == MAX_PROFILES + 1 and tpm[OTHER] == 20


def test_a_removed_upstream_leaves_the_history() -> None:
    h = History()
    h.sample(capacity(name="old"), T0)
    h.set_state("old", "up", "ok", T0)
    h.sample(capacity(name="new"), T0 + 1)
    assert list(h.as_dict(T0 + 1)["upstreams"]) == ["new"]


def _a_busy_second(h: History, t: float, i: int) -> None:
    h.sample(capacity(i % 5, i % 7, 4 + i % 3), t)
    if i % 3 == 0:
        h.observe(record(Outcome.ADMITTED, 200, profile=f"p{i % 9}", tokens=50), t)
    if i % 11 == 0:
        h.observe(record(Outcome.REJECTED_QUEUE_FULL, 503, profile=f"p{i % 9}", error=f"queue full #{i}"), t)
    if i % 300 == 0:
        h.set_state("gpu", "up" if i % 600 == 0 else "down", f"probe {i}", t)


def test_a_day_of_fake_time_keeps_memory_flat() -> None:
    """Two seconds per step over 24 h: after the first hour, memory held by the history does not grow."""
    h = History()
    tracemalloc.start()
    try:
        t, i = T0, 0
        while t < T0 + 3600 + 60:
            _a_busy_second(h, t, i)
            t, i = t + 2, i + 1
        gc.collect()
        after_an_hour = tracemalloc.get_traced_memory()[0]
        while t < T0 + 86400:
            _a_busy_second(h, t, i)
            t, i = t + 2, i + 1
        gc.collect()
        after_a_day = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after_a_day - after_an_hour < 16 * 1024, (after_an_hour, after_a_day)
    payload = h.as_dict(t)
    assert len(payload["upstreams"]["gpu"]["points"]) <= 361
    assert len(payload["refusals"]) == 10
    assert len(json.dumps(payload)) < 64 * 1024


async def test_the_sampler_samples_and_reads_states_on_its_clock() -> None:
    """``sample_forever`` with a fake clock; stopped by cancellation after a few steps (no sleeping on time)."""
    h = History(resolution=1)
    now = [T0]
    steps: list[float] = []

    def read() -> Mapping[str, Any]:
        steps.append(now[0])
        if len(steps) == 4:
            raise RuntimeError("a failing read is logged, not fatal")
        return capacity(len(steps))

    def states() -> Mapping[str, tuple[str, str]]:
        return {"gpu": ("up" if len(steps) < 3 else "loading", f"reading at step {len(steps)}")}

    def clock() -> float:
        now[0] += 1
        return now[0]

    task = asyncio.create_task(sample_forever(h, read, states, clock, every=0))
    while len(steps) < 6:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    d = h.as_dict(now[0])["upstreams"]["gpu"]
    assert [p[1] for p in d["points"]][:3] == [1, 2, 3]
    assert (d["state"], d["since"]) == ("loading", T0 + 3)
    assert d["detail"].startswith("reading at step")
