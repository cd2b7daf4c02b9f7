"""Client for the guard's ``GET /guard/capacity``: free batch slots, per upstream and per profile.

Fails closed: anything but a well-formed answer (refused, timeout, HTTP error, bad JSON, missing keys)
raises :class:`CapacityUnavailable`, whose message names the URL, and the tick dispatches nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

CAPACITY_PATH = "/guard/capacity"


class CapacityUnavailable(Exception):
    """The guard could not tell how much room there is; the tick must not dispatch."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"guard capacity unavailable at {url}: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class Slots:
    """``limit`` and ``free`` are None where the guard sets no cap (e.g. a profile without max_inflight)."""

    limit: int | None
    in_flight: int
    queued: int
    free: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamCapacity:
    slots: Slots
    lanes: Mapping[str, Slots] = field(default_factory=dict)
    profiles: Mapping[str, Slots] = field(default_factory=dict)

    @property
    def batch_free(self) -> int:
        batch = self.lanes.get("batch")
        for free in (batch.free if batch is not None else None, self.slots.free):
            if free is not None:
                return free
        return 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Capacity:
    free: int
    lanes: Mapping[str, Slots] = field(default_factory=dict)
    upstreams: Mapping[str, UpstreamCapacity] = field(default_factory=dict)

    def batch_free(self, upstream: str | None = None) -> int:
        """Free batch slots: over all upstreams, or of one named upstream. Never negative."""
        if upstream is None:
            return max(0, self.free)
        return max(0, self._upstream(upstream).batch_free)

    def profile_free(self, upstream: str | None = None) -> dict[str, int]:
        """Free slots of the profiles the guard limits, summed over upstreams (or of one upstream)."""
        chosen = self.upstreams.values() if upstream is None else [self._upstream(upstream)]
        free: dict[str, int] = {}
        for up in chosen:
            for name, slots in up.profiles.items():
                if slots.free is not None:  # None: the guard puts no cap on this profile
                    free[name] = free.get(name, 0) + max(0, slots.free)
        return free

    def _upstream(self, name: str) -> UpstreamCapacity:
        try:
            return self.upstreams[name]
        except KeyError:
            known = ", ".join(sorted(self.upstreams)) or "none"
            raise ValueError(f"upstream {name!r} is not in the guard's capacity (known: {known})") from None


def parse_capacity(body: Any) -> Capacity:
    """Build a :class:`Capacity` from the decoded JSON; ValueError names the first bad field."""
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object, got {type(body).__name__}")
    upstreams_raw = body.get("upstreams", {})
    if not isinstance(upstreams_raw, dict):
        raise ValueError("'upstreams' is not an object")
    upstreams = {
        str(name): UpstreamCapacity(
            slots=_slots(raw, f"upstreams.{name}"),
            lanes=_slot_map(raw.get("lanes", {}), f"upstreams.{name}.lanes"),
            profiles=_slot_map(raw.get("profiles", {}), f"upstreams.{name}.profiles"),
        )
        for name, raw in upstreams_raw.items()
    }
    return Capacity(
        free=_int(body, "free", "free"),
        lanes=_slot_map(body.get("lanes", {}), "lanes"),
        upstreams=upstreams,
    )


def _slot_map(raw: Any, where: str) -> dict[str, Slots]:
    if not isinstance(raw, dict):
        raise ValueError(f"'{where}' is not an object")
    return {str(name): _slots(value, f"{where}.{name}") for name, value in raw.items()}


def _slots(raw: Any, where: str) -> Slots:
    if not isinstance(raw, dict):
        raise ValueError(f"'{where}' is not an object")
    if "free" not in raw:
        raise ValueError(f"'{where}.free' is missing")
    return Slots(
        limit=_optional_int(raw, "limit", where),
        in_flight=_int(raw, "in_flight", where, default=0),
        queued=_int(raw, "queued", where, default=0),
        free=_optional_int(raw, "free", where),
    )


def _int(raw: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        path = where if where == key else f"{where}.{key}"
        raise ValueError(f"'{path}' must be an integer, got {value!r}")
    return value


def _optional_int(raw: dict[str, Any], key: str, where: str) -> int | None:
    return None if raw.get(key) is None else _int(raw, key, where)


class CapacityClient:
    """Reads the guard's capacity over one keep-alive connection (reused across ticks)."""

    def __init__(self, guard_url: str, *, timeout_s: float = 2.0, transport: httpx.BaseTransport | None = None):
        self.url = guard_url.rstrip("/") + CAPACITY_PATH
        self._client = httpx.Client(timeout=timeout_s, transport=transport, trust_env=False)

    def fetch(self) -> Capacity:
        try:
            response = self._client.get(self.url, headers={"Accept": "application/json"})
        except httpx.TimeoutException as exc:
            raise CapacityUnavailable(self.url, f"timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise CapacityUnavailable(self.url, f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise CapacityUnavailable(self.url, f"HTTP {response.status_code}: {response.text[:200]!r}")
        try:
            return parse_capacity(response.json())
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            raise CapacityUnavailable(self.url, f"bad capacity JSON: {exc}") from exc

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> CapacityClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
