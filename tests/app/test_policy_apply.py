"""One build path: a guard started with a config and a guard reloaded into it are the same guard.

For each example config, ``GuardState(settings)`` (start) is compared with a guard started from a bare config
(the same upstreams, nothing else) and then given the policy by ``apply`` (reload): the same capacity view,
the same limits, lanes, budgets, rate limits, probes and the same classification of the same requests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway_guard.app.endpoints import capacity_payload
from gateway_guard.app.state import GuardState
from gateway_guard.errors import GuardError
from gateway_guard.settings import Settings, load_settings, parse_settings

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "config").glob("guard*.toml"))
ENV = {"GUARD_TEST_DUMMY": "sk-from-env", "VLLM_API_KEY": "sk-upstream", "WORKER_KEY": "sk-worker"}
PATHS = ("/v1/chat/completions", "/p/worker1/v1/chat/completions", "/p/nightly/v1/completions", "/api/chat")


def view(state: GuardState) -> dict[str, Any]:
    payload = capacity_payload(state.gates)
    for up in payload["upstreams"].values():  # why the limit moved differs (config vs reload), not the limit
        up.pop("limit_reason", None)
        up.pop("limit_history", None)
    gates: dict[str, Any] = {}
    for name, gate in state.gates.items():
        limit = gate.limit_source
        gates[name] = {
            "limit": (
                type(limit).__name__,
                limit.limit,
                getattr(limit, "floor", None),
                getattr(limit, "ceiling", None),
            ),
            "lanes": {lane: gate.queue_timeout(lane) for lane in gate.lane_names()},
            "snapshot": gate.snapshot(),
            "probe": (state.probers[name].reads_load, state.probers[name].interval),
        }
    return {"capacity": payload, "gates": gates, "rates": state.rates.snapshot(), "classified": classified(state)}


def classified(state: GuardState) -> list[object]:
    assert state.policy is not None
    keys = [None, "sk-unknown", *state.policy.routing.keys]
    out: list[object] = []
    for key in keys:
        for path in PATHS:
            for lane in (None, "interactive", "nope"):
                headers = {"authorization": f"Bearer {key}"} if key else {}
                if lane:
                    headers["x-guard-lane"] = lane
                try:
                    cls = state.classifier.classify(path, headers)
                    out.append((cls, state.classifier.upstream_for(cls.profile, None)))
                except GuardError as exc:
                    out.append((type(exc).__name__, exc.status))
    return out


def bare(settings: Settings) -> Settings:
    """The same upstreams (what only a restart changes), everything else left to the defaults."""
    ups = {
        n: {"url": u.url, "max_inflight": 1, "lanes": {"batch": {"headroom": 0}}} for n, u in settings.upstreams.items()
    }
    return parse_settings({"upstreams": ups}, environ={})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
async def test_reloading_a_config_equals_starting_with_it(path: Path) -> None:
    settings = load_settings(path, environ=ENV)
    fresh = GuardState(settings)
    reloaded = GuardState(bare(settings))
    before = view(reloaded)
    reloaded.apply(settings.compile())
    try:
        assert view(reloaded) == view(fresh)
        assert before != view(fresh), "the bare guard already looked like the config: the test proves nothing"
    finally:
        await fresh.aclose()
        await reloaded.aclose()


def test_every_example_config_is_covered() -> None:
    assert {p.name for p in CONFIGS} >= {"guard.example.toml", "guard.limits.example.toml"}
