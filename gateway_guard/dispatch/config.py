"""guard-dispatch configuration: a TOML file read with tomllib into frozen, validated values.

Every error names the key and the bad value (``config dispatch.toml: window[2].start = '25:00': ...``).
See ``config/dispatch.example.toml`` for every key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from datetime import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway_guard.dispatch.decide import Policy, Pool
from gateway_guard.dispatch.hermes import MaxMeaning
from gateway_guard.dispatch.windows import Schedule, Window

DEFAULT_GUARD_URL = "http://127.0.0.1:8090"
DEFAULT_TARGET = 1

_TOP_KEYS = {
    "guard_url", "upstream", "board", "hermes", "target", "lock_file", "guard_timeout_s", "hermes_timeout_s",
    "max_meaning", "log_json", "timezone", "window", "pools", "max_running", "reserve", "reservation_ttl_s",
    "admin_token_env", "queue_per_slot",
}
DEFAULT_QUEUE_PER_SLOT = 2.0  # target = "auto": batch requests kept waiting per batch slot (decide.auto_room)
DEFAULT_MAX_RUNNING = 8  # what newer Hermes defaults its host-wide max_in_progress to at most


class ConfigError(Exception):
    def __init__(self, key: str, value: object, reason: str, *, source: str = "config") -> None:
        super().__init__(f"{source}: {key} = {value!r}: {reason}")
        self.key = key
        self.value = value


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchConfig:
    guard_url: str = DEFAULT_GUARD_URL
    upstream: str | None = None
    board: str | None = None
    hermes: str | None = None
    lock_file: Path | None = None
    guard_timeout_s: float = 2.0
    hermes_timeout_s: float = 180.0
    max_meaning: MaxMeaning | None = None
    log_json: bool = False
    reserve: bool = True
    reservation_ttl_s: float = 60.0
    admin_token_env: str = "GUARD_ADMIN_TOKEN"
    policy: Policy = field(default_factory=lambda: Policy(schedule=Schedule(default_target=DEFAULT_TARGET)))


def load(path: Path) -> DispatchConfig:
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("--config", str(path), f"cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", str(path), f"not valid TOML: {exc}") from exc
    return from_mapping(raw, source=f"config {path}")


def from_mapping(raw: dict[str, Any], *, source: str = "config") -> DispatchConfig:
    reader = _Reader(source)
    for key in raw:
        if key not in _TOP_KEYS:
            raise ConfigError(key, raw[key], f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})", source=source)
    timezone = reader.timezone(raw.get("timezone", "UTC"))
    windows = tuple(reader.window(i, w) for i, w in enumerate(reader.list_of_tables(raw, "window"), 1))
    auto = raw.get("target") == "auto"
    if auto:
        target = reader.count(raw, "max_running", DEFAULT_MAX_RUNNING)
        queue_per_slot = reader.number(raw, "queue_per_slot", DEFAULT_QUEUE_PER_SLOT)
    else:
        target = reader.count(raw, "target", DEFAULT_TARGET)
        queue_per_slot = DEFAULT_QUEUE_PER_SLOT
        for key in ("max_running", "queue_per_slot"):
            if key in raw:
                raise ConfigError(key, raw[key], 'only applies with target = "auto"', source=source)
    schedule = Schedule(default_target=target, timezone=timezone, windows=windows)
    meaning = reader.string(raw, "max_meaning") or "auto"
    if meaning not in {"auto", *MaxMeaning}:
        raise ConfigError("max_meaning", meaning, "must be auto, running_cap or per_pass", source=source)
    lock_file = reader.string(raw, "lock_file")
    return DispatchConfig(
        guard_url=reader.url(raw.get("guard_url", DEFAULT_GUARD_URL)),
        upstream=reader.string(raw, "upstream"),
        board=reader.string(raw, "board"),
        hermes=reader.string(raw, "hermes"),
        lock_file=Path(lock_file).expanduser() if lock_file else None,
        guard_timeout_s=reader.seconds(raw, "guard_timeout_s", 2.0),
        hermes_timeout_s=reader.seconds(raw, "hermes_timeout_s", 180.0),
        max_meaning=None if meaning == "auto" else MaxMeaning(meaning),
        log_json=reader.boolean(raw, "log_json"),
        reserve=reader.boolean(raw, "reserve", True),
        reservation_ttl_s=reader.seconds(raw, "reservation_ttl_s", 60.0),
        admin_token_env=reader.string(raw, "admin_token_env") or "GUARD_ADMIN_TOKEN",
        policy=Policy(schedule=schedule, pools=reader.pools(raw.get("pools", {})), auto=auto,
                      queue_per_slot=queue_per_slot),
    )


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, value: object, reason: str) -> ConfigError:
        return ConfigError(key, value, reason, source=self.source)

    def string(self, raw: dict[str, Any], key: str) -> str | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, value, "must be a non-empty string")
        return value

    def boolean(self, raw: dict[str, Any], key: str, default: bool = False) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, value, "must be true or false")
        return value

    def count(self, raw: dict[str, Any], key: str, default: int, *, where: str = "") -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            allowed = ' or "auto"' if key == "target" and not where else ""
            raise self.fail(where + key, value, f"must be a whole number >= 0{allowed}")
        return value

    def number(self, raw: dict[str, Any], key: str, default: float) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1000:
            raise self.fail(key, value, "must be a number from 0 to 1000")
        return float(value)

    def seconds(self, raw: dict[str, Any], key: str, default: float) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.fail(key, value, "must be a number of seconds > 0")
        return float(value)

    def url(self, value: object) -> str:
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise self.fail("guard_url", value, "must be an http:// or https:// URL")
        return value.rstrip("/")

    def timezone(self, value: object) -> ZoneInfo:
        if not isinstance(value, str):
            raise self.fail("timezone", value, "must be an IANA zone name such as 'Europe/Berlin'")
        try:
            return ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise self.fail("timezone", value, "unknown IANA time zone") from None

    def clock(self, key: str, value: object) -> time:
        try:
            if not isinstance(value, str) or len(value) != 5 or value[2] != ":":
                raise ValueError
            return time(int(value[:2]), int(value[3:]))
        except ValueError:
            raise self.fail(key, value, "must be a time of day 'HH:MM' (00:00-23:59)") from None

    def list_of_tables(self, raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(key, value, f"must be an array of tables ([[{key}]])")
        return value

    def window(self, index: int, raw: dict[str, Any]) -> Window:
        where = f"window[{index}]."
        for key in raw:
            if key not in {"name", "start", "end", "target"}:
                raise self.fail(where + key, raw[key], "unknown key (known: name, start, end, target)")
        name = raw.get("name", f"window{index}")
        if not isinstance(name, str) or not name:
            raise self.fail(where + "name", name, "must be a non-empty string")
        if "target" not in raw:
            raise self.fail(where + "target", None, "is required")
        return Window(
            name=name,
            start=self.clock(where + "start", raw.get("start")),
            end=self.clock(where + "end", raw.get("end")),
            target=self.count(raw, "target", 0, where=where),
        )

    def pools(self, raw: object) -> tuple[Pool, ...]:
        if not isinstance(raw, dict):
            raise self.fail("pools", raw, "must be a table of [pools.NAME] tables")
        pools: list[Pool] = []
        owner: dict[str, str] = {}
        for name, body in raw.items():
            where = f"pools.{name}."
            if not isinstance(body, dict):
                raise self.fail(f"pools.{name}", body, "must be a table with 'profiles' and 'limit'")
            for key in body:
                if key not in {"profiles", "limit"}:
                    raise self.fail(where + key, body[key], "unknown key (known: profiles, limit)")
            profiles = body.get("profiles")
            if (
                not isinstance(profiles, list) or not profiles
                or not all(isinstance(p, str) and p for p in profiles)
            ):
                raise self.fail(where + "profiles", profiles, "must be a non-empty list of profile names")
            for profile in profiles:
                if profile in owner:
                    raise self.fail(where + "profiles", profiles, f"{profile!r} is already in pool {owner[profile]!r}")
                owner[profile] = name
            if "limit" not in body:
                raise self.fail(where + "limit", None, "is required")
            pools.append(Pool(name=name, profiles=frozenset(profiles), limit=self.count(body, "limit", 0, where=where)))
        return tuple(pools)
