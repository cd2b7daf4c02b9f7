"""Request- and token-rate limits shared by every replica: the same leaky buckets as ``admission/rate.py``, kept
in Redis by one small Lua script (level + time of the last leak, Redis ``TIME``), with the same surface.

A bucket is ``gg:rate:<kind>:<lane|profile name>``; ``take`` passes when level + amount fits the limit (a token
bucket needs amount 0: it passes while not over), else says how long until it would; ``charge`` adds after the
fact, into debt if need be. When Redis is gone, local ``aiolimiter`` buckets at the rate divided by the replicas
seen alive take over (``RateLimiter``), and the shared ones again when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway_guard.admission.policy import RatePolicy
from gateway_guard.admission.rate import RateLimiter
from gateway_guard.errors import RateLimited

log = logging.getLogger("gateway_guard.cluster")
RETRY_SECONDS = 1.0

BUCKET = r"""
local key, per_ms, limit, amount, mode = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = redis.call('HMGET', key, 'level', 'at')
local level = tonumber(v[1]) or 0
level = math.max(0, level - (now - (tonumber(v[2]) or now)) * per_ms)
local wait = 0
if mode == 'take' then
  if level + amount > limit then wait = math.ceil((level + amount - limit) / per_ms) else level = level + amount end
else
  level = math.max(0, level + amount)
end
redis.call('HSET', key, 'level', tostring(level), 'at', now)
redis.call('PEXPIRE', key, math.ceil(math.max(level, limit) / per_ms) + 1000)
return {wait, tostring(level)}
"""


class SharedRateLimiter(RateLimiter):
    """``RateLimiter``'s surface (reconfigure, active, admit, charge, snapshot, waiting), buckets in Redis."""

    def __init__(self, redis: Redis, *, replicas: Callable[[], int], namespace: str = "gg") -> None:
        self.redis = redis
        self._script = redis.register_script(BUCKET)
        self._replicas = replicas
        self._prefix = f"{namespace}:rate"
        self._rpm: dict[str, float] = {}  # bucket name -> per minute
        self._tpm: dict[str, float] = {}
        self._levels: dict[str, float] = {}  # as last seen, for snapshot()
        self._lanes: Mapping[str, RatePolicy] = {}
        self._profiles: Mapping[str, RatePolicy] = {}
        self._fallback: RateLimiter | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retry_at = 0.0  # in fallback: when to try Redis again
        super().__init__()  # last (it calls reconfigure); its local buckets stay empty: the fallback has its own

    def reconfigure(self, lanes: Mapping[str, RatePolicy], profiles: Mapping[str, RatePolicy]) -> None:
        self._lanes, self._profiles = dict(lanes), dict(profiles)
        wanted = {f"lane {n}": p for n, p in lanes.items()} | {f"profile {n}": p for n, p in profiles.items()}
        self._rpm = {k: p.requests_per_minute for k, p in wanted.items() if p.requests_per_minute is not None}
        self._tpm = {k: p.tokens_per_minute for k, p in wanted.items() if p.tokens_per_minute is not None}
        if self._fallback is not None:
            self._fallback.reconfigure(*self._shares())

    @property
    def active(self) -> bool:
        return bool(self._rpm or self._tpm)

    @property
    def shared(self) -> bool:
        return self._fallback is None

    async def admit(self, lane: str, profile: str, *, max_wait: float) -> None:
        needed = self._needed(lane, profile)
        if not needed:
            return
        loop = asyncio.get_running_loop()
        if self._fallback is not None and loop.time() < self._retry_at:
            await self._fallback.admit(lane, profile, max_wait=max_wait)
            return
        deadline = loop.time() + max_wait
        taken: list[tuple[str, str, float, float]] = []
        self.waiting += 1
        try:
            for kind, key, per_minute, amount in needed:
                while True:
                    wait = await self._call(kind, key, per_minute, amount, "take")
                    if wait is None:  # Redis went away: the local shares decide from here
                        await self._give_back(taken)
                        await self._fallback_admit(lane, profile, deadline)
                        return
                    if wait == 0:
                        taken.append((kind, key, per_minute, amount))
                        break
                    if loop.time() + wait > deadline:
                        raise RateLimited(
                            f"{key} is over its limit of {per_minute:g} {kind} per "
                            f"minute (shared by the replicas); room again in {wait:.1f}s",
                            lane=lane,
                            retry_after=wait,
                        )
                    await asyncio.sleep(wait)
        except BaseException:
            await self._give_back(taken)
            raise
        finally:
            self.waiting -= 1

    def charge(self, lane: str, profile: str, tokens: int) -> None:
        if tokens <= 0:
            return
        if self._fallback is not None:
            self._fallback.charge(lane, profile, tokens)
        for key in (f"lane {lane}", f"profile {profile}"):
            per_minute = self._tpm.get(key)
            if per_minute is not None:
                self._spawn(self._call("tokens", key, per_minute, tokens, "charge"))

    def snapshot(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for kind, rates in (("requests", self._rpm), ("tokens", self._tpm)):
            for key, per_minute in rates.items():
                entry = out.setdefault(key, {})
                entry[f"{kind}_per_minute"] = per_minute
                entry[f"{kind}_level"] = round(self._levels.get(f"{kind}:{key}", 0.0), 1)
        return out

    async def aclose(self) -> None:
        """Wait for the charges still on their way (each is one round trip, bounded by the client's timeout)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- internals ----------------------------------------------------------------------------------------------

    def _needed(self, lane: str, profile: str) -> list[tuple[str, str, float, float]]:
        """(kind, bucket, per minute, amount): a request takes 1 from request buckets, and needs a token bucket
        not over its limit."""
        out = []
        for key in (f"profile {profile}", f"lane {lane}"):
            if (requests := self._rpm.get(key)) is not None:
                out.append(("requests", key, requests, 1.0))
            if (tokens := self._tpm.get(key)) is not None:
                out.append(("tokens", key, tokens, 0.0))
        return out

    async def _call(self, kind: str, key: str, per_minute: float, amount: float, mode: str) -> float | None:
        """Seconds to wait (0: taken / charged); None when Redis is gone (then in fallback)."""
        try:
            wait_ms, level = await self._script(
                args=[f"{self._prefix}:{kind}:{key}", per_minute / 60_000, per_minute, amount, mode]
            )
        except RedisError as exc:
            self._enter_fallback(exc)
            return None
        if self._fallback is not None:
            log.warning("rate limits: shared again (Redis is back)")
            self._fallback = None
        self._levels[f"{kind}:{key}"] = float(level)
        return int(wait_ms) / 1000

    async def _give_back(self, taken: list[tuple[str, str, float, float]]) -> None:
        for kind, key, per_minute, amount in taken:
            with contextlib.suppress(RedisError):
                await self._call(kind, key, per_minute, -amount, "charge")

    async def _fallback_admit(self, lane: str, profile: str, deadline: float) -> None:
        assert self._fallback is not None
        await self._fallback.admit(lane, profile, max_wait=max(0.0, deadline - asyncio.get_running_loop().time()))

    def _enter_fallback(self, exc: Exception) -> None:
        self._retry_at = asyncio.get_running_loop().time() + RETRY_SECONDS
        if self._fallback is None:
            log.warning("rate limits: Redis unreachable (%s); each replica keeps its share of every limit", exc)
            self._fallback = RateLimiter(*self._shares())

    def _shares(self) -> tuple[dict[str, RatePolicy], dict[str, RatePolicy]]:
        n = max(1, self._replicas())

        def share(p: RatePolicy) -> RatePolicy:
            rpm, tpm = p.requests_per_minute, p.tokens_per_minute
            return RatePolicy(
                requests_per_minute=None if rpm is None else max(1.0, rpm / n),
                tokens_per_minute=None if tpm is None else max(1.0, tpm / n),
            )

        return {k: share(p) for k, p in self._lanes.items()}, {k: share(p) for k, p in self._profiles.items()}

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
