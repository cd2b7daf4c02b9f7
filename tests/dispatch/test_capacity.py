"""The capacity client against a real HTTP server on 127.0.0.1; it fails closed on anything odd."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from gateway_guard.dispatch.capacity import CapacityClient, CapacityUnavailable, parse_capacity
from tests.dispatch.conftest import CAPACITY_EXAMPLE, CapacityServer


def test_reads_the_agreed_json(capacity_server: CapacityServer) -> None:
    with CapacityClient(capacity_server.url) as client:
        cap = client.fetch()
    assert cap.batch_free() == 3
    assert cap.batch_free("default") == 2  # that upstream's batch lane
    assert cap.profile_free() == {"worker1": 1}
    assert cap.upstreams["default"].slots.in_flight == 1
    assert cap.lanes["interactive"].free == 4


def test_one_connection_serves_many_ticks(capacity_server: CapacityServer) -> None:
    with CapacityClient(capacity_server.url + "/") as client:
        assert client.url == capacity_server.url + "/guard/capacity"
        capacity_server.report_free(1)
        assert client.fetch().batch_free() == 1
        capacity_server.report_free(0, {"worker2": 2})
        cap = client.fetch()
        assert (cap.batch_free(), cap.profile_free()) == (0, {"worker2": 2})
    assert capacity_server.requests == 2


def test_negative_free_reads_as_none() -> None:
    body = {"free": -1, "upstreams": {"u": {"free": -3, "profiles": {"p": {"free": -2}}}}}
    cap = parse_capacity(body)
    assert (cap.batch_free(), cap.batch_free("u"), cap.profile_free()) == (0, 0, {"p": 0})


def test_uncapped_profiles_and_lanes_are_no_limit() -> None:
    # The guard sends null limit/free for a profile it does not cap (and adds fields such as limit_reason).
    body = {
        "free": 2,
        "upstreams": {"u": {
            "limit": 4, "limit_reason": "fixed", "in_flight": 0, "queued": 0, "free": 4,
            "lanes": {"batch": {"limit": None, "in_flight": 0, "queued": 0, "free": None}},
            "profiles": {"chat": {"limit": None, "in_flight": 1, "queued": 0, "free": None},
                         "reasoning": {"limit": 1, "in_flight": 1, "queued": 0, "free": 0}},
        }},
    }
    cap = parse_capacity(body)
    assert cap.profile_free() == {"reasoning": 0}
    assert cap.batch_free("u") == 4  # no batch lane cap: the upstream's own free slots


def test_profile_free_sums_over_upstreams_unless_one_is_chosen() -> None:
    up = {"free": 1, "profiles": {"p": {"free": 1}}}
    cap = parse_capacity({"free": 2, "upstreams": {"a": up, "b": up}})
    assert cap.profile_free() == {"p": 2}
    assert cap.profile_free("a") == {"p": 1}
    with pytest.raises(ValueError, match="upstream 'c' is not in the guard's capacity"):
        cap.batch_free("c")


def test_connection_refused_names_the_url(refused_url: str) -> None:
    with CapacityClient(refused_url) as client, pytest.raises(CapacityUnavailable) as info:
        client.fetch()
    assert refused_url + "/guard/capacity" in str(info.value)
    assert "ConnectError" in str(info.value)


@pytest.mark.parametrize(
    ("status", "raw", "reason"),
    [
        (503, None, "HTTP 503"),
        (200, b"<html>not json</html>", "bad capacity JSON"),
        (200, b"[1, 2]", "expected a JSON object"),
        (200, b'{"lanes": {}}', "'free' must be an integer"),
        (200, b'{"free": "3"}', "'free' must be an integer"),
        (200, b'{"free": 3, "upstreams": {"u": {"free": true}}}', "'upstreams.u.free' must be an integer"),
        (200, b'{"free": 3, "upstreams": {"u": {"free": 1, "profiles": {"p": {}}}}}',
         "'upstreams.u.profiles.p.free' is missing"),
        (200, b'{"free": 3, "upstreams": {"u": {"free": 1, "profiles": {"p": {"free": 1.5}}}}}',
         "'upstreams.u.profiles.p.free' must be an integer"),
        (200, b'{"free": null}', "'free' must be an integer"),
    ],
)
def test_bad_answers_fail_closed(capacity_server: CapacityServer, status: int, raw: bytes | None, reason: str) -> None:
    capacity_server.status = status
    capacity_server.raw = raw
    with CapacityClient(capacity_server.url) as client, pytest.raises(CapacityUnavailable, match=reason):
        client.fetch()


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.05)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join(2)
    for conn in accepted:
        conn.close()
    sock.close()


def test_a_guard_that_never_answers_times_out(silent_url: str) -> None:
    with CapacityClient(silent_url, timeout_s=0.2) as client, pytest.raises(CapacityUnavailable, match="timed out"):
        client.fetch()


def test_example_fixture_matches_the_agreed_contract() -> None:
    assert parse_capacity(CAPACITY_EXAMPLE).upstreams["default"].profiles["worker1"].limit == 2
