"""TOML configuration: the shipped example loads; every error names the key and the bad value."""

from __future__ import annotations

from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

import pytest

from gateway_guard.dispatch.config import ConfigError, DispatchConfig, from_mapping, load
from gateway_guard.dispatch.hermes import MaxMeaning

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "dispatch.example.toml"


def test_the_example_config_loads_with_windows_and_pools() -> None:
    config = load(EXAMPLE)
    assert config.guard_url == "http://127.0.0.1:8090"
    assert config.max_meaning is None  # auto
    schedule = config.policy.schedule
    assert schedule.timezone.key == "Europe/Berlin"
    assert [(w.name, w.start, w.end, w.target) for w in schedule.windows] == [
        ("day", time(8), time(20), 1), ("night", time(20), time(8), 6),
    ]
    assert schedule.target_at(datetime(2026, 11, 23, 23, 0, tzinfo=UTC)).value == 6
    assert {(p.name, p.limit) for p in config.policy.pools} == {("reasoning", 1), ("lightweight", 3)}
    assert config.policy.pool_of("planner") is not None
    assert config.policy.pool_of("planner").name == "reasoning"  # type: ignore[union-attr]


def test_defaults_without_a_file() -> None:
    config = from_mapping({})
    assert config == DispatchConfig()
    assert config.policy.schedule.target_at(datetime.now(UTC)).value == 1


def test_explicit_meaning_and_paths() -> None:
    config = from_mapping({"max_meaning": "per_pass", "lock_file": "~/x.lock", "guard_url": "http://h:1/"})
    assert config.max_meaning is MaxMeaning.PER_PASS
    assert config.lock_file == Path("~/x.lock").expanduser()
    assert config.guard_url == "http://h:1"


@pytest.mark.parametrize(
    ("raw", "key", "value"),
    [
        ({"target": -1}, "target", -1),
        ({"target": "3"}, "target", "3"),
        ({"targt": 3}, "targt", 3),
        ({"guard_url": "127.0.0.1:8090"}, "guard_url", "127.0.0.1:8090"),
        ({"timezone": "Mars/Olympus"}, "timezone", "Mars/Olympus"),
        ({"max_meaning": "sometimes"}, "max_meaning", "sometimes"),
        ({"guard_timeout_s": 0}, "guard_timeout_s", 0),
        ({"log_json": "yes"}, "log_json", "yes"),
        ({"window": [{"start": "25:00", "end": "08:00", "target": 1}]}, "window[1].start", "25:00"),
        ({"window": [{"start": "20:00", "end": "8:00", "target": 1}]}, "window[1].end", "8:00"),
        ({"window": [{"start": "20:00", "end": "08:00"}]}, "window[1].target", None),
        ({"window": [{"start": "20:00", "end": "08:00", "target": 1, "days": "mon"}]}, "window[1].days", "mon"),
        ({"window": {"start": "20:00"}}, "window", {"start": "20:00"}),
        ({"pools": {"r": {"profiles": [], "limit": 1}}}, "pools.r.profiles", []),
        ({"pools": {"r": {"profiles": ["a"], "limit": -1}}}, "pools.r.limit", -1),
        ({"pools": {"r": {"profiles": ["a"]}}}, "pools.r.limit", None),
        ({"pools": {"r": {"profiles": ["a"], "limit": 1}, "s": {"profiles": ["b", "a"], "limit": 1}}},
         "pools.s.profiles", ["b", "a"]),
    ],
)
def test_errors_name_the_key_and_the_bad_value(raw: dict[str, Any], key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(raw, source="config test.toml")
    assert (info.value.key, info.value.value) == (key, value)
    assert str(info.value).startswith(f"config test.toml: {key} = {value!r}: ")


def test_unreadable_and_invalid_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("target = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load(bad)
    assert info.value.value == str(bad)


def test_auto_target_and_reservations() -> None:
    config = from_mapping({"target": "auto", "max_running": 5, "reserve": False, "reservation_ttl_s": 30})
    assert config.policy.auto and config.policy.schedule.default_target == 5
    assert config.reserve is False and config.reservation_ttl_s == 30
    assert from_mapping({"target": "auto"}).policy.schedule.default_target == 8
    assert from_mapping({}).reserve is True and not from_mapping({}).policy.auto
    with pytest.raises(ConfigError, match="max_running.*only applies"):
        from_mapping({"target": 2, "max_running": 4})
    assert from_mapping({"target": "auto"}).policy.queue_per_slot == 2
    assert from_mapping({"target": "auto", "queue_per_slot": 0.5}).policy.queue_per_slot == 0.5
    with pytest.raises(ConfigError, match="queue_per_slot = 1: only applies"):
        from_mapping({"target": 2, "queue_per_slot": 1})
    with pytest.raises(ConfigError, match="queue_per_slot = -1: must be a number from 0 to 1000"):
        from_mapping({"target": "auto", "queue_per_slot": -1})
    with pytest.raises(ConfigError, match=r"target = 'lots': must be a whole number >= 0 or \"auto\""):
        from_mapping({"target": "lots"})
    with pytest.raises(ConfigError, match="reservation_ttl_s"):
        from_mapping({"reservation_ttl_s": 0})
