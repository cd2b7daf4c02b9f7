from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest


class FakeClock:
    """Replaces ``loop.time`` (as aiolimiter's tests do): timers fire when the test moves time, never by sleeping."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = 1000.0
        self._loop = loop

    def time(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        await settle()


async def settle(rounds: int = 5) -> None:
    """Let every ready callback run (futures resolved, tasks woken) without moving time."""
    for _ in range(rounds):
        await asyncio.sleep(0)


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeClock]:
    loop = asyncio.get_running_loop()
    fake = FakeClock(loop)
    monkeypatch.setattr(loop, "time", fake.time)
    yield fake
