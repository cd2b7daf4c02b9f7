"""[cluster] in the settings, and a guard built with it: its gates are shared ones, its requests take leases."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from redis.asyncio import Redis

from gateway_guard.admission.cluster import ClusterGate
from gateway_guard.admission.cluster.store import prefix_for
from gateway_guard.admission.gate import Gate
from gateway_guard.app.state import GuardState
from gateway_guard.errors import ConfigError
from gateway_guard.settings import load_settings
from tests.integration.conftest import guard_in_process, guard_settings
from tests.support.llamacpp import sim_server
from tests.support.redis import RedisServer

BASE = {"upstreams.default.url": "http://127.0.0.1:9"}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("cluster.redis_url", "http://127.0.0.1:6379", "redis://"),
        ("cluster.replica_id", "a|b", "'|'"),
        ("cluster.lease_seconds", 0.1, "at least 0.3"),
        ("cluster.lease_seconds", -1, "> 0"),
        ("cluster.redis_ttl", 3, "unknown key"),
    ],
)
def test_a_bad_cluster_key_is_named(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(overrides=BASE | {key: value}, environ={})
    assert key in str(error.value) and message in str(error.value)


def test_the_redis_password_stays_out_of_reprs_and_errors() -> None:
    settings = load_settings(overrides=BASE | {"cluster.redis_url": "redis://:s3cret@127.0.0.1:6379/0"}, environ={})
    assert settings.cluster is not None and "s3cret" not in repr(settings)
    with pytest.raises(ConfigError) as error:
        load_settings(overrides=BASE | {"cluster.redis_url": "tcp://:s3cret@h:1"}, environ={})
    assert "s3cret" not in str(error.value)


async def test_without_cluster_the_guard_is_as_before() -> None:
    state = GuardState(load_settings(overrides=BASE, environ={}))
    try:
        assert state.cluster is None and isinstance(state.gates["default"], Gate)
    finally:
        await state.aclose()


async def test_a_guard_with_cluster_admits_through_leases(shared_redis: RedisServer, upstream_name: str) -> None:
    with sim_server(mode="zero", no_ollama=True) as sim:
        settings = guard_settings(sim, **{"cluster.redis_url": shared_redis.url, "cluster.namespace": upstream_name})
        async with guard_in_process(settings) as (url, state):
            gate = state.gates["default"]
            assert isinstance(gate, ClusterGate) and state.cluster is not None
            redis = Redis.from_url(shared_redis.url)
            try:
                await redis.set(f"{prefix_for('default', upstream_name)}:epoch", 0)  # no first-start quiet period
                async with httpx.AsyncClient(timeout=30) as client:
                    for _ in range(3):
                        body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
                        response = await client.post(f"{url}/v1/chat/completions", json=body)
                        assert response.status_code == 200, response.text
                    capacity = (await client.get(f"{url}/guard/capacity")).json()
                    ready = (await client.get(f"{url}/guard/ready")).json()
                    metrics = (await client.get(f"{url}/metrics")).text
                assert capacity["upstreams"]["default"]["limit"] == 2
                assert state.cluster.shared
                cluster = ready["upstreams"]["default"]["cluster"]
                assert cluster["mode"] == "shared" and cluster["replica"] == state.cluster.replica
                assert 'gateway_guard_cluster_shared{upstream="default"} 1.0' in metrics
                leases = f"{prefix_for('default', upstream_name)}:leases"
                # released just after the response: to the replica's pool (still a lease in Redis), which gives it
                # back to Redis when no request comes for it (keep_idle)
                assert gate.status.held == 0 and await redis.zcard(leases) == gate.status.idle <= 1
                async with asyncio.timeout(10):
                    while await redis.zcard(leases):
                        await asyncio.sleep(0.02)  # polling the server's state: no event to wait on
                assert gate.status.idle == 0
            finally:
                await redis.aclose()


def test_the_cluster_example_config_parses() -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "config" / "cluster" / "guard.cluster.toml"
    settings = load_settings(path, environ={"GUARD__CLUSTER__REPLICA_ID": "guard-a"})
    assert settings.cluster is not None
    assert (settings.cluster.replica_id, settings.cluster.lease_seconds) == ("guard-a", 10)
    assert settings.upstreams["gpu"].max_inflight == 4
