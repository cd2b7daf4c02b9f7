"""Request- and token-rate limits per profile and per lane: aiolimiter leaky buckets, shared by all upstreams.

* ``requests_per_minute``: a request takes one unit from its profile's and its lane's bucket before it queues
  for a slot (up to a minute's worth may come in a burst, as with aiolimiter).
* ``tokens_per_minute``: charged *after the fact*, from the usage the upstream reported or the guard counted
  (``upstream/usage.py``), for a stream the client left mid-way too (the tokens seen so far). A request is let
  through while the bucket is not over its limit; a long answer puts the bucket in debt and the next request
  waits until it has leaked back under. So a long answer cannot slip past the limit, however long it is.

Over a limit, a request waits while its queue deadline allows; if the bucket cannot have room by then it gets
``RateLimited`` (429) at once, with ``Retry-After`` = the time until the bucket has room. Units a request took
are given back when it does not get through (deadline, cancellation, a second bucket saying no).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from aiolimiter import AsyncLimiter

from gateway_guard.admission.policy import RatePolicy as RatePolicy
from gateway_guard.errors import RateLimited


class Bucket(AsyncLimiter):
    """An ``AsyncLimiter`` that can be charged after the fact, past its capacity (debt), and retuned live."""

    __slots__ = ()

    def __init__(self, per_minute: float) -> None:
        super().__init__(per_minute, 60.0)

    @property
    def level(self) -> float:
        self._leak()
        return float(self._level)

    def charge(self, amount: float) -> None:
        """Add ``amount`` (negative gives back) without waiting; the level may go over ``max_rate``."""
        self._leak()
        self._level = max(0.0, self._level + amount)
        self._wake_next()

    def seconds_until(self, amount: float) -> float:
        """Time until ``acquire(amount)`` could pass, were nobody else to take from the bucket."""
        self._leak()
        excess = self._level + amount - self.max_rate
        return max(0.0, excess / self._rate_per_sec)

    def retune(self, per_minute: float) -> None:
        self._leak()
        self.max_rate = per_minute
        self._rate_per_sec = per_minute / self.time_period
        self._wake_next()


class RateLimiter:
    """Buckets per lane and per profile (one per configured limit); unconfigured names are not limited."""

    def __init__(
        self, lanes: Mapping[str, RatePolicy] | None = None, profiles: Mapping[str, RatePolicy] | None = None
    ) -> None:
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}
        self.waiting = 0
        self.reconfigure(lanes or {}, profiles or {})

    def reconfigure(self, lanes: Mapping[str, RatePolicy], profiles: Mapping[str, RatePolicy]) -> None:
        """New limits (config reload): buckets keep their level; removed limits disappear."""
        wanted = {f"lane {n}": p for n, p in lanes.items()} | {f"profile {n}": p for n, p in profiles.items()}
        for kind, store in (("requests_per_minute", self._requests), ("tokens_per_minute", self._tokens)):
            rates = {key: getattr(p, kind) for key, p in wanted.items() if getattr(p, kind) is not None}
            for key in list(store):
                if key not in rates:
                    del store[key]
            for key, rate in rates.items():
                if key in store:
                    store[key].retune(rate)
                else:
                    store[key] = Bucket(rate)

    @property
    def active(self) -> bool:
        return bool(self._requests or self._tokens)

    async def admit(self, lane: str, profile: str, *, max_wait: float) -> None:
        """Wait (at most ``max_wait`` seconds) until every bucket of this lane and profile has room."""
        needed = self._buckets(lane, profile)
        if not needed:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        for key, bucket, amount in needed:
            if bucket.seconds_until(amount) > max_wait:
                raise self._rejected(key, bucket, amount, lane)
        taken: list[tuple[Bucket, float]] = []
        self.waiting += 1
        try:
            for key, bucket, amount in needed:
                try:
                    async with asyncio.timeout_at(deadline):
                        await bucket.acquire(amount)
                except TimeoutError:
                    raise self._rejected(key, bucket, amount, lane) from None
                taken.append((bucket, amount))
        except BaseException:
            for bucket, amount in taken:
                bucket.charge(-amount)
            raise
        finally:
            self.waiting -= 1

    def charge(self, lane: str, profile: str, tokens: int) -> None:
        """Tokens a request used (prompt + completion), known once its response has ended."""
        if tokens <= 0:
            return
        for key in (f"lane {lane}", f"profile {profile}"):
            bucket = self._tokens.get(key)
            if bucket is not None:
                bucket.charge(tokens)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per limited lane/profile: the limits and how full each bucket is now."""
        out: dict[str, dict[str, float]] = {}
        for kind, store in (("requests", self._requests), ("tokens", self._tokens)):
            for key, bucket in store.items():
                entry = out.setdefault(key, {})
                entry[f"{kind}_per_minute"] = bucket.max_rate
                entry[f"{kind}_level"] = round(bucket.level, 1)
        return out

    def _buckets(self, lane: str, profile: str) -> list[tuple[str, Bucket, float]]:
        """(name, bucket, amount): a request takes 1 from request buckets, and needs a token bucket not over."""
        out = []
        for key in (f"profile {profile}", f"lane {lane}"):
            if (requests := self._requests.get(key)) is not None:
                out.append((key, requests, 1.0))
            if (tokens := self._tokens.get(key)) is not None:
                out.append((key, tokens, 0.0))
        return out

    def _rejected(self, key: str, bucket: Bucket, amount: float, lane: str) -> RateLimited:
        kind = "requests" if amount else "tokens"
        return RateLimited(
            f"{key} is over its limit of {bucket.max_rate:g} {kind} per minute; "
            f"room again in {bucket.seconds_until(amount):.1f}s",
            lane=lane,
            retry_after=bucket.seconds_until(amount),
        )
