from __future__ import annotations

from pathlib import Path

import pytest

from gateway_guard.errors import ConfigError
from gateway_guard.settings import env_overrides, load_settings, parse_settings

BASE = {"upstreams": {"gpu": {"url": "http://127.0.0.1:8080"}}}


def test_defaults_suit_hermes_workers() -> None:
    s = parse_settings(BASE)
    assert s.server.host == "127.0.0.1"
    lanes = s.upstreams["gpu"].lanes
    assert lanes["interactive"].priority < lanes["batch"].priority
    assert lanes["batch"].queue_timeout > 600  # held for minutes, not rejected
    assert lanes["interactive"].queue_timeout < lanes["batch"].queue_timeout
    assert lanes["batch"].headroom == 1


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"upstreams": {"gpu": {"url": "http://x", "max_inflight": 0}}}, "upstreams.gpu.max_inflight"),
        ({"upstreams": {"gpu": {"url": "ftp://x"}}}, "upstreams.gpu.url"),
        ({"upstreams": {"gpu": {"url": "http://x", "max_inflite": 3}}}, "upstreams.gpu.max_inflite"),
        ({**BASE, "lanes": {"batch": {"queue_timeout": -1}}}, "lanes.batch.queue_timeout"),
        ({**BASE, "server": {"port": "eighty"}}, "server.port"),
        ({**BASE, "server": {"default_lane": "bulk"}}, "server.default_lane"),
        ({**BASE, "server": {"status_page": "public"}}, "server.status_page"),
        ({**BASE, "server": {"status_page": "token"}}, "server.status_page"),  # no admin token to ask for
        ({**BASE, "lanes": {"batch": {"refusal_status": 500}}}, "lanes.batch.refusal_status"),
        ({**BASE, "profiles": {"w": {"lane": "bulk"}}}, "profiles.w.lane"),
        ({**BASE, "profiles": {"w": {"upstream": "cpu"}}}, "profiles.w.upstream"),
        ({**BASE, "keys": {"w": 5}}, "keys.w"),
        ({**BASE, "keys": {"a": "k", "b": "k"}}, "keys.b"),
        (
            {"upstreams": {"gpu": {"url": "http://x", "max_inflight": 2, "lanes": {"batch": {"headroom": 2}}}}},
            "upstreams.gpu.lanes.batch.headroom",
        ),
        ({"upstreams": {}}, "upstreams"),
        ({**BASE, "surprise": 1}, "surprise"),
    ],
)
def test_errors_name_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw)
    assert info.value.key == key
    assert key in str(info.value)


def test_secrets_never_shown() -> None:
    raw = {"upstreams": {"gpu": {"url": "http://x", "api_key": 12345}}}
    with pytest.raises(ConfigError) as info:
        parse_settings(raw)
    assert "12345" not in str(info.value)
    s = parse_settings({"upstreams": {"gpu": {"url": "http://x", "api_key": "sk-up"}}, "keys": {"w": "sk-w"}})
    assert "sk-up" not in repr(s) and "sk-w" not in repr(s)


def test_env_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "guard.toml"
    path.write_text('[upstreams.gpu]\nurl = "http://127.0.0.1:8080"\nmax_inflight = 4\n')
    env = {"GUARD__UPSTREAMS__GPU__MAX_INFLIGHT": "8", "GUARD__SERVER__LOG_JSON": "true", "OTHER": "x"}
    s = load_settings(path, environ=env)
    assert s.upstreams["gpu"].max_inflight == 8
    assert s.server.log_json is True
    assert env_overrides({"GUARD__SERVER__HOST": "0.0.0.0"}) == {"server.host": "0.0.0.0"}


def test_bad_env_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="upstreams.gpu.max_inflight"):
        load_settings(
            None, environ={"GUARD__UPSTREAMS__GPU__URL": "http://x", "GUARD__UPSTREAMS__GPU__MAX_INFLIGHT": "lots"}
        )


def test_keys_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("W1_KEY", "sk-from-env")
    s = parse_settings({**BASE, "keys": {"w1": {"env": "W1_KEY"}}})
    assert s.keys == {"sk-from-env": "w1"}
    assert "w1" in s.profiles
    with pytest.raises(ConfigError, match="keys.w2"):
        parse_settings({**BASE, "keys": {"w2": {"env": "MISSING_KEY_VAR"}}})


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[upstreams.gpu\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, environ={})


def test_example_configs_are_valid() -> None:
    root = Path(__file__).resolve().parent.parent / "config"
    examples = sorted(root.glob("guard*.toml"))
    assert examples, "config/ has no guard example"
    for path in examples:
        load_settings(path, environ={"GUARD_TEST_DUMMY": "1", "VLLM_API_KEY": "x", "WORKER_KEY": "y"})
