"""The config keys of rate limits, token budgets and the adaptive cap: read, defaulted, and refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway_guard.admission.policy import AdaptiveLimitSpec, BudgetSpec, FixedLimitSpec, ProbeSpec, RatePolicy
from gateway_guard.errors import ConfigError
from gateway_guard.settings import load_settings, parse_settings

UP = {"url": "http://127.0.0.1:8080"}


def parse(**sections: Any) -> Any:
    return parse_settings({"upstreams": {"gpu": dict(UP)}, **sections})


def test_rates_per_profile_and_per_lane() -> None:
    s = parse(
        profiles={"w": {"requests_per_minute": 30, "tokens_per_minute": 20000.5}},
        lanes={"batch": {"tokens_per_minute": 100000, "queue_timeout": 900}},
    )
    assert s.profiles["w"].rate == RatePolicy(requests_per_minute=30.0, tokens_per_minute=20000.5)
    assert s.lane_rates == {"batch": RatePolicy(tokens_per_minute=100000.0)}
    assert s.upstreams["gpu"].lanes["batch"].queue_timeout == 900
    assert "interactive" not in s.lane_rates


def test_the_raw_config_is_not_changed_by_reading_it() -> None:
    raw = {"upstreams": {"gpu": dict(UP)}, "lanes": {"batch": {"requests_per_minute": 5}}}
    assert parse_settings(raw).lane_rates == parse_settings(raw).lane_rates != {}


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"profiles": {"w": {"requests_per_minute": 0}}}, "profiles.w.requests_per_minute"),
        ({"profiles": {"w": {"tokens_per_minute": "lots"}}}, "profiles.w.tokens_per_minute"),
        ({"lanes": {"batch": {"requests_per_minute": 0.5}}}, "lanes.batch.requests_per_minute"),
        ({"upstreams": {"gpu": {**UP, "lanes": {"batch": {"tokens_per_minute": 9}}}}}, "upstreams.gpu.lanes.batch"),
        ({"upstreams": {"gpu": {**UP, "limit": "auto"}}}, "upstreams.gpu.limit"),
        ({"upstreams": {"gpu": {**UP, "ceiling": 8}}}, "upstreams.gpu.ceiling"),
        ({"upstreams": {"gpu": {**UP, "limit": "adaptive", "floor": 6, "ceiling": 4}}}, "upstreams.gpu.ceiling"),
        ({"upstreams": {"gpu": {**UP, "limit": "adaptive", "floor": 0}}}, "upstreams.gpu.floor"),
        ({"upstreams": {"gpu": {**UP, "limit": "adaptive", "probe": "prom"}}}, "upstreams.gpu.probe"),
        ({"upstreams": {"gpu": {**UP, "limit": "adaptive", "probe_interval": 0}}}, "upstreams.gpu.probe_interval"),
        ({"upstreams": {"gpu": {**UP, "max_context_tokens": 0}}}, "upstreams.gpu.max_context_tokens"),
    ],
)
def test_a_bad_value_is_refused_naming_its_key(sections: dict[str, Any], key: str) -> None:
    raw: dict[str, Any] = {"upstreams": {"gpu": dict(UP)}, **sections}
    with pytest.raises(ConfigError) as info:
        parse_settings(raw)
    assert info.value.key.startswith(key)


def test_adaptive_defaults_and_bounds() -> None:
    up = parse(upstreams={"gpu": {**UP, "limit": "adaptive", "ceiling": 16, "probe_interval": 0.5}}).upstreams["gpu"]
    assert up.limit == AdaptiveLimitSpec(floor=1, ceiling=16)
    assert up.probe == ProbeSpec(kind="auto", interval=0.5)
    fixed = parse(upstreams={"gpu": {**UP, "max_inflight": 6}}).upstreams["gpu"]
    assert fixed.limit == FixedLimitSpec(value=6)
    assert parse(upstreams={"gpu": {**UP, "limit": "adaptive", "probe": "off"}}).upstreams["gpu"].probe is None


def test_token_budget_keys() -> None:
    up = parse(upstreams={"gpu": {**UP, "max_context_tokens": 32768, "default_output_tokens": 300}}).upstreams["gpu"]
    assert up.budget == BudgetSpec(max_context_tokens=32768, default_output_tokens=300)
    assert parse().upstreams["gpu"].budget is None


def test_the_example_config_parses() -> None:
    path = Path(__file__).resolve().parents[1] / "config" / "guard.limits.example.toml"
    s = load_settings(path, environ={})
    up = s.upstreams["gpu"]
    assert up.limit == AdaptiveLimitSpec(floor=1, ceiling=16) and up.budget is not None
    assert up.budget.max_context_tokens == 32768
    assert s.lane_rates["batch"].tokens_per_minute == 600000
    assert s.profiles["reasoning"].rate.requests_per_minute == 20
