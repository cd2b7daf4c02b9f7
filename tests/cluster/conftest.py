from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from tests.support.redis import REDIS_BIN, RedisServer, redis_server

_names = itertools.count()


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    """One server for the tests that never stop it; each test uses its own upstream name (key prefix)."""
    _need_redis()
    with redis_server() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server of this test's own, which it may stop and start."""
    _need_redis()
    with redis_server() as server:
        yield server


@pytest.fixture
def upstream_name() -> str:
    return f"up{next(_names)}"


def _need_redis() -> None:
    if REDIS_BIN is None:  # ./run-tests installs the Debian package; say so rather than fail obscurely
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
