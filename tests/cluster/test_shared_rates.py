"""Rate limits shared by replicas through the Lua leaky bucket on a real redis-server; local shares without it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from gateway_guard.admission.cluster.rates import SharedRateLimiter
from gateway_guard.admission.cluster.spec import ClusterSpec
from gateway_guard.admission.cluster.store import connect
from gateway_guard.admission.policy import RatePolicy
from gateway_guard.errors import RateLimited
from tests.support.redis import RedisServer

Make = Callable[[str, str, dict[str, RatePolicy]], SharedRateLimiter]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    made: list[SharedRateLimiter] = []

    def limiter(url: str, namespace: str, profiles: dict[str, RatePolicy]) -> SharedRateLimiter:
        redis = connect(ClusterSpec(redis_url=url, lease_seconds=2))
        rates = SharedRateLimiter(redis, replicas=lambda: 2, namespace=namespace)
        rates.reconfigure({}, profiles)
        made.append(rates)
        return rates

    yield limiter
    for rates in made:
        await rates.aclose()
        await rates.redis.aclose()


async def test_a_request_rate_is_shared_by_two_replicas(
    shared_redis: RedisServer, upstream_name: str, make: Make
) -> None:
    policy = {"p": RatePolicy(requests_per_minute=2)}
    a, b = make(shared_redis.url, upstream_name, policy), make(shared_redis.url, upstream_name, policy)
    await a.admit("batch", "p", max_wait=0.5)
    await b.admit("batch", "p", max_wait=0.5)
    with pytest.raises(RateLimited) as refused:
        await a.admit("batch", "p", max_wait=0.5)
    assert 25 <= refused.value.retry_after <= 30  # one request leaks out every 30 s
    await b.admit("batch", "q", max_wait=0.5)  # another profile is not limited
    assert a.snapshot()["profile p"]["requests_level"] == pytest.approx(2, abs=0.1)


async def test_tokens_charged_at_one_replica_hold_back_the_other(
    shared_redis: RedisServer, upstream_name: str, make: Make
) -> None:
    policy = {"p": RatePolicy(tokens_per_minute=100)}
    a, b = make(shared_redis.url, upstream_name, policy), make(shared_redis.url, upstream_name, policy)
    await b.admit("batch", "p", max_wait=0.5)
    a.charge("batch", "p", 150)  # after the fact, into debt
    await a.aclose()  # the charge has been sent (closing waits for it)
    with pytest.raises(RateLimited) as refused:
        await b.admit("batch", "p", max_wait=0.5)
    assert 25 <= refused.value.retry_after <= 31  # 50 tokens over, at 100 a minute


async def test_without_redis_each_replica_keeps_its_share(
    own_redis: RedisServer, upstream_name: str, make: Make
) -> None:
    a = make(own_redis.url, upstream_name, {"p": RatePolicy(requests_per_minute=2)})
    own_redis.stop()
    await a.admit("batch", "p", max_wait=0.5)  # its share: 2 a minute over 2 replicas
    assert not a.shared
    with pytest.raises(RateLimited):
        await a.admit("batch", "p", max_wait=0.5)
