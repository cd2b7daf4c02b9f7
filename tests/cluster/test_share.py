"""The limit a replica's local gate enforces: the cap, or at most what it may keep while Redis is gone."""

from __future__ import annotations

from gateway_guard.admission.cluster.share import ShareLimit
from gateway_guard.admission.limit import FixedLimit


def test_the_share_limit_follows_the_cap_and_the_allowance() -> None:
    cap = FixedLimit(6)
    share = ShareLimit(cap)
    heard: list[int] = []
    share.subscribe(heard.append)
    share.restrict(2)
    assert share.limit == 2 and "unavailable" in share.reason
    cap.set(1)
    assert share.limit == 1
    share.restrict(None)
    share.follow(FixedLimit(5))
    cap.set(3)  # the old limit no longer speaks
    assert share.limit == 5
    assert heard == [2, 1, 1, 5]
