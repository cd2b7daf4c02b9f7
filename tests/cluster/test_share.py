"""The static share a replica falls back to when Redis is gone: plain values, no Redis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway_guard.admission.cluster.share import ShareLimit, fallback_share, shares
from gateway_guard.admission.limit import FixedLimit


def test_the_cap_is_divided_among_the_replicas_seen_alive() -> None:
    seen = {"a": 0, "b": 0, "c": 0}
    assert [fallback_share(7, r, seen) for r in "abc"] == [3, 2, 2]


def test_at_least_one_where_the_cap_allows_and_never_more_than_the_cap() -> None:
    seen = {"a": 0, "b": 0, "c": 0}
    assert [fallback_share(2, r, seen) for r in "abc"] == [1, 1, 0]


def test_what_another_replica_holds_beyond_its_share_is_taken_from_ours() -> None:
    assert fallback_share(4, "b", {"a": 3, "b": 1}) == 1  # a keeps its 3 until they end
    assert fallback_share(4, "b", {"a": 4, "b": 0}) == 0


def test_a_replica_that_never_saw_the_cluster_admits_nothing() -> None:
    assert fallback_share(8, "a", None) == 0


@given(
    cap=st.integers(1, 12),
    held=st.lists(st.integers(0, 12), min_size=1, max_size=5),
)
def test_shares_plus_what_each_holds_never_pass_the_cap(cap: int, held: list[int]) -> None:
    """Each replica ends at most at max(what it held, its allowance): together never above the cap, given that
    what they held (granted by Redis under the cap) was within it."""
    if sum(held) > cap:
        held = [min(h, cap) for h in held]
        while sum(held) > cap:
            held[held.index(max(held))] -= 1
    seen = {f"r{i}": h for i, h in enumerate(held)}
    assert sum(shares(cap, list(seen)).values()) == cap
    worst = sum(max(h, fallback_share(cap, r, seen)) for r, h in seen.items())
    assert worst <= cap


def test_the_share_limit_follows_the_cap_and_the_allowance() -> None:
    cap = FixedLimit(6)
    share = ShareLimit(cap)
    heard: list[int] = []
    share.subscribe(heard.append)
    share.restrict(2)
    assert share.limit == 2 and "fallback" in share.reason
    cap.set(1)
    assert share.limit == 1
    share.restrict(None)
    share.follow(FixedLimit(5))
    cap.set(3)  # the old limit no longer speaks
    assert share.limit == 5
    assert heard == [2, 1, 1, 5]
