"""Typed configuration: one TOML file plus ``GUARD__SECTION__KEY`` environment overrides, validated once.

Every error names the key and the bad value (``upstreams.gpu.max_inflight: must be an integer >= 1 (got 0)``).
Secrets (upstream API keys, client keys, the admin token) never appear in reprs, logs or errors.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from gateway_guard.admission.policy import (
    AdaptiveLimitSpec,
    BudgetSpec,
    ClusterSpec,
    FixedLimitSpec,
    LanePolicy,
    LimitSpec,
    Policy,
    ProbeSpec,
    ProfilePolicy,
    RatePolicy,
    Routing,
    UpstreamPolicy,
)
from gateway_guard.errors import ConfigError

ENV_PREFIX = "GUARD__"
T = TypeVar("T")

DEFAULT_LANES: dict[str, dict[str, Any]] = {
    # Interactive chats: first in line, a short queue deadline (a person is waiting).
    "interactive": {"priority": 0, "queue_size": 64, "queue_timeout": 30.0, "headroom": 0},
    # Hermes kanban workers: held for minutes rather than rejected (they give up after 3 quick retries and
    # their client waits 1800 s), and kept out of the last slot so an interactive request finds one free.
    "batch": {"priority": 1, "queue_size": 1024, "queue_timeout": 1500.0, "headroom": 1},
}
LIMIT_MODES = ("fixed", "adaptive")
PROBES = ("auto", "llamacpp", "vllm", "ollama", "off")
ADAPTIVE_KEYS = ("floor", "ceiling")
RATE_KEYS = ("requests_per_minute", "tokens_per_minute")
REFUSAL_STATUSES = (429, 503)
STATUS_PAGE_MODES = ("open", "token", "off")


@dataclass(frozen=True, kw_only=True)
class UpstreamSettings:
    name: str
    url: str
    max_inflight: int = 4
    api_key: str | None = field(default=None, repr=False)
    models: tuple[str, ...] = ()
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    lanes: dict[str, LanePolicy] = field(default_factory=dict)
    # fixed at max_inflight, or adaptive: moves between floor and ceiling (starts at the ceiling)
    limit: LimitSpec = field(default_factory=lambda: FixedLimitSpec(value=4))
    probe: ProbeSpec | None = field(default_factory=ProbeSpec)  # how its own load is read; None: probe = "off"
    budget: BudgetSpec | None = None  # token budget: context tokens in flight (KV cache)

    def policy(self) -> UpstreamPolicy:
        return UpstreamPolicy(
            name=self.name, limit=self.limit, lanes=self.lanes, budget=self.budget, probe=self.probe, models=self.models
        )


@dataclass(frozen=True, kw_only=True)
class ProfileSettings:
    name: str
    lane: str | None = None
    upstream: str | None = None
    max_inflight: int | None = None
    max_queued: int | None = None
    rate: RatePolicy = field(default_factory=RatePolicy)

    def policy(self) -> ProfilePolicy:
        return ProfilePolicy(max_inflight=self.max_inflight, max_queued=self.max_queued)


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8090
    max_body_bytes: int = 16 * 1024 * 1024
    admin_token: str | None = field(default=None, repr=False)
    default_lane: str | None = "batch"
    lane_header: bool = True
    aging_seconds: float = 10.0
    log_level: str = "info"
    log_json: bool = False
    # The edge (docs/edge.md): what a client may hold before admission, each bounded.
    max_header_bytes: int = 32 * 1024  # request line + headers; over it: 431
    max_headers: int = 100  # header lines; over it: 431
    header_timeout: float = 10.0  # from the connection (or the request's first byte) to the end of its headers: 408
    body_timeout: float = 60.0  # from the end of the headers to the end of the body: 408
    keep_alive_timeout: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 512  # open connections; past it the oldest idle one is closed, else 503
    max_idle_connections: int = 64  # idle keep-alive connections kept; past it the oldest is closed
    body_budget_bytes: int = 256 * 1024 * 1024  # bodies held by the proxy at once (global); past it: 429
    metrics_token: str | None = field(default=None, repr=False)  # when set, GET /metrics needs it (Bearer)
    status_page: str = "open"  # GET /guard/: "open" (like /guard/capacity), "token" (admin token) or "off"
    read_rate: float = 50.0  # requests/s to each of the guard's read endpoints (/metrics, ...); past it: 429; 0 = off


@dataclass(frozen=True, kw_only=True)
class Settings:
    server: ServerSettings
    upstreams: dict[str, UpstreamSettings]
    profiles: dict[str, ProfileSettings] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict, repr=False)  # client API key -> profile name
    lane_rates: dict[str, RatePolicy] = field(default_factory=dict)
    cluster: ClusterSpec | None = None  # [cluster]: the cap shared with other replicas through Redis (restart only)

    @property
    def default_upstream(self) -> UpstreamSettings:
        return next(iter(self.upstreams.values()))

    def compile(self) -> Policy:
        """The immutable policy the guard enforces (``GuardState.apply``): built once per config read."""
        lanes: set[str] = set()
        for up in self.upstreams.values():
            lanes |= set(up.lanes)
        routing = Routing(
            upstreams=tuple(self.upstreams),
            lanes=frozenset(lanes),
            keys=dict(self.keys),
            profile_lane={n: p.lane for n, p in self.profiles.items() if p.lane is not None},
            profile_upstream={n: p.upstream for n, p in self.profiles.items() if p.upstream is not None},
            model_owner={m: up.name for up in self.upstreams.values() for m in up.models},
            all_models_listed=all(up.models for up in self.upstreams.values()),
            default_lane=self.server.default_lane,
            lane_header=self.server.lane_header,
        )
        return Policy(
            upstreams={name: up.policy() for name, up in self.upstreams.items()},
            profiles={name: p.policy() for name, p in self.profiles.items()},
            routing=routing,
            lane_rates=self.lane_rates,
            profile_rates={name: p.rate for name, p in self.profiles.items() if p.rate != RatePolicy()},
            aging_seconds=self.server.aging_seconds,
        )


# -- reading ------------------------------------------------------------------------------------------------


def load_settings(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read the file (if any), apply environment then explicit overrides (dotted keys), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("--config", "file not found", str(path)) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"not valid TOML: {exc}", str(path)) from None
    env = os.environ if environ is None else environ
    for dotted, value in env_overrides(env).items():
        _set_dotted(raw, dotted, value)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return parse_settings(raw, environ=env)


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``GUARD__UPSTREAMS__GPU__MAX_INFLIGHT=8`` -> ``{"upstreams.gpu.max_inflight": 8}``."""
    out: dict[str, Any] = {}
    for name, text in environ.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            dotted = ".".join(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
            out[dotted] = _env_value(text)
    return out


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parents[: i + 1]), "is a value, not a table; cannot set " + dotted)
        node = child
    node[leaf] = value


# -- validation ---------------------------------------------------------------------------------------------


class _Table:
    """A TOML table being read: typed getters that name the full key, and a check for unknown keys."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, "must be a table", data)
        self.data = data
        self.path = path
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type[T], default: T) -> T:
        self.seen.add(name)
        value: Any = self.data.get(name, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise ConfigError(self.key(name), f"must be {kind.__name__}", _safe(name, value))
        return cast(T, value)

    def positive_int(self, name: str, default: int | None, *, minimum: int = 1) -> int | None:
        value = self.get(name, int, default)
        if value is not None and value < minimum:
            raise ConfigError(self.key(name), f"must be an integer >= {minimum}", value)
        return value

    def seconds(self, name: str, default: float) -> float:
        value = self.get(name, float, default)
        if value <= 0:
            raise ConfigError(self.key(name), "must be a number of seconds > 0", value)
        return value

    def rate(self) -> RatePolicy:
        values = {}
        for name in RATE_KEYS:
            value = self.get(name, float, None)
            if value is not None and value < 1:
                raise ConfigError(self.key(name), "must be a number >= 1 per minute", value)
            values[name] = value
        return RatePolicy(**values)

    def table(self, name: str) -> dict[str, Any]:
        self.seen.add(name)
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(self.key(name), "must be a table", value)
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key (misspelt?)")


def redact_url(url: str) -> str:
    """``url`` with any userinfo (``user:password@``) replaced by ``***@``: the only form of a URL ever printed."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if "@" in url else url
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}{sep}{authority}{slash}{tail}"


def _safe(name: str, value: object) -> object:
    return "<hidden>" if "key" in name or "token" in name else value


def parse_settings(raw: Mapping[str, Any], *, environ: Mapping[str, str] | None = None) -> Settings:
    """Validate a raw config; ``environ`` resolves ``*_env`` references (default: the process environment)."""
    env = os.environ if environ is None else environ
    root = _Table(dict(raw), "")
    server = _parse_server(_Table(root.table("server"), "server"), env)
    lane_tables = {n: dict(b) if isinstance(b, dict) else b for n, b in root.table("lanes").items()}
    lane_rates = {  # rate limits are per lane across upstreams: read (and taken out) here
        n: _Table({k: b.pop(k) for k in RATE_KEYS if k in b}, f"lanes.{n}").rate()
        for n, b in lane_tables.items()
        if isinstance(b, dict) and any(k in b for k in RATE_KEYS)
    }
    lanes = _parse_lanes(lane_tables, "lanes", DEFAULT_LANES)
    if server.default_lane is not None and server.default_lane not in lanes:
        raise ConfigError("server.default_lane", f"names no lane (lanes: {', '.join(lanes)})", server.default_lane)
    up_tables = root.table("upstreams")
    if not up_tables:
        raise ConfigError("upstreams", "at least one upstream is needed (or pass --upstream URL / --simulate)")
    upstreams = {name: _parse_upstream(name, body, lanes, env) for name, body in up_tables.items()}
    profiles = {
        name: _parse_profile(name, body, lanes, upstreams) for name, body in root.table("profiles").items()
    }
    keys = _parse_keys(root.table("keys"), profiles, env)
    cluster_table = root.table("cluster")
    cluster = _parse_cluster(_Table(cluster_table, "cluster")) if cluster_table else None
    root.done()
    return Settings(
        server=server, upstreams=upstreams, profiles=profiles, keys=keys, lane_rates=lane_rates, cluster=cluster
    )


def _parse_cluster(t: _Table) -> ClusterSpec:
    d = ClusterSpec()
    url = t.get("redis_url", str, d.redis_url)
    if urlsplit(url).scheme not in {"redis", "rediss", "unix"}:
        raise ConfigError(t.key("redis_url"), "must be a redis://, rediss:// or unix:// URL", "<hidden>")
    replica = t.get("replica_id", str, None) or None
    if replica is not None and "|" in replica:
        raise ConfigError(t.key("replica_id"), "must not contain '|'", replica)
    lease = t.seconds("lease_seconds", d.lease_seconds)
    if lease < 0.3:
        raise ConfigError(t.key("lease_seconds"), "must be at least 0.3 seconds", lease)
    namespace = t.get("namespace", str, d.namespace)
    t.done()
    return ClusterSpec(redis_url=url, replica_id=replica, lease_seconds=lease, namespace=namespace)


def _parse_server(t: _Table, env: Mapping[str, str]) -> ServerSettings:
    d = ServerSettings()
    token = t.get("admin_token", str, d.admin_token) or env.get("GUARD_ADMIN_TOKEN") or None
    port = t.positive_int("port", d.port, minimum=0)
    assert port is not None
    if port > 65535:
        raise ConfigError(t.key("port"), "must be a TCP port 0..65535", port)
    level = t.get("log_level", str, d.log_level).lower()
    if level not in {"debug", "info", "warning", "error"}:
        raise ConfigError(t.key("log_level"), "must be debug, info, warning or error", level)
    server = ServerSettings(
        host=t.get("host", str, d.host),
        port=port,
        max_body_bytes=t.positive_int("max_body_bytes", d.max_body_bytes) or d.max_body_bytes,
        admin_token=token,
        default_lane=t.get("default_lane", str, d.default_lane) or None,
        lane_header=t.get("lane_header", bool, d.lane_header),
        aging_seconds=t.seconds("aging_seconds", d.aging_seconds),
        log_level=level,
        log_json=t.get("log_json", bool, d.log_json),
        max_header_bytes=t.positive_int("max_header_bytes", d.max_header_bytes, minimum=1024) or d.max_header_bytes,
        max_headers=t.positive_int("max_headers", d.max_headers, minimum=8) or d.max_headers,
        header_timeout=t.seconds("header_timeout", d.header_timeout),
        body_timeout=t.seconds("body_timeout", d.body_timeout),
        keep_alive_timeout=t.seconds("keep_alive_timeout", d.keep_alive_timeout),
        max_connections=t.positive_int("max_connections", d.max_connections, minimum=2) or d.max_connections,
        max_idle_connections=t.positive_int("max_idle_connections", d.max_idle_connections, minimum=0) or 0,
        body_budget_bytes=t.positive_int("body_budget_bytes", d.body_budget_bytes) or d.body_budget_bytes,
        metrics_token=t.get("metrics_token", str, None) or env.get("GUARD_METRICS_TOKEN") or None,
        status_page=t.get("status_page", str, d.status_page),
        read_rate=t.get("read_rate", float, d.read_rate),
    )
    if server.read_rate < 0:
        raise ConfigError(t.key("read_rate"), "must be requests per second >= 0 (0: no limit)", server.read_rate)
    if server.status_page not in STATUS_PAGE_MODES:
        raise ConfigError(t.key("status_page"), 'must be "open", "token" or "off"', server.status_page)
    if server.status_page == "token" and not server.admin_token:
        raise ConfigError(t.key("status_page"), '"token" needs server.admin_token (or GUARD_ADMIN_TOKEN)')
    if server.body_budget_bytes < server.max_body_bytes:
        raise ConfigError(
            t.key("body_budget_bytes"), f"must be >= server.max_body_bytes ({server.max_body_bytes})",
            server.body_budget_bytes,
        )
    t.done()
    return server


def _parse_lanes(
    tables: dict[str, Any], path: str, base: Mapping[str, Mapping[str, Any]]
) -> dict[str, LanePolicy]:
    merged: dict[str, dict[str, Any]] = {name: dict(v) for name, v in base.items()}
    for name, body in tables.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{path}.{name}", "must be a table", body)
        merged.setdefault(name, {}).update(body)
    lanes = {}
    for name, body in merged.items():
        t = _Table(body, f"{path}.{name}")
        lanes[name] = LanePolicy(
            name=name,
            priority=t.get("priority", int, 0),
            queue_size=t.positive_int("queue_size", 64, minimum=0) or 0,
            queue_timeout=t.seconds("queue_timeout", 30.0),
            headroom=t.positive_int("headroom", 0, minimum=0) or 0,
            refusal_status=t.get("refusal_status", int, 429),
        )
        if lanes[name].refusal_status not in REFUSAL_STATUSES:
            raise ConfigError(t.key("refusal_status"), "must be 429 or 503", lanes[name].refusal_status)
        t.done()
    return lanes


def _parse_upstream(name: str, body: Any, lanes: dict[str, LanePolicy], env: Mapping[str, str]) -> UpstreamSettings:
    t = _Table(body, f"upstreams.{name}")
    url = t.get("url", str, "")
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ConfigError(t.key("url"), "must be an http(s) URL such as http://127.0.0.1:8080", redact_url(url))
    if "@" in parts.netloc:  # never printed: the message shows the URL with its userinfo cut out
        raise ConfigError(
            t.key("url"),
            "must not carry a user name or password (the guard would not send them); put the upstream's key "
            "in api_key or api_key_env",
            redact_url(url),
        )
    key_env = t.get("api_key_env", str, None)
    api_key = t.get("api_key", str, None)
    if key_env:
        api_key = env.get(key_env)
        if api_key is None:
            raise ConfigError(t.key("api_key_env"), "names an environment variable that is not set", key_env)
    models = t.get("models", list, [])
    if not all(isinstance(m, str) for m in models):
        raise ConfigError(t.key("models"), "must be a list of model names", models)
    cap = t.positive_int("max_inflight", 4)
    assert cap is not None
    lane_over = _parse_lanes(t.table("lanes"), t.key("lanes"), _policies_as_raw(lanes))
    for lane in lane_over.values():
        if lane.headroom >= cap and cap > 1:
            key = t.key(f"lanes.{lane.name}.headroom")
            raise ConfigError(key, f"must be below max_inflight ({cap})", lane.headroom)
    mode = t.get("limit", str, "fixed")
    if mode not in LIMIT_MODES:
        raise ConfigError(t.key("limit"), 'must be "fixed" or "adaptive"', mode)
    if mode == "fixed" and (stray := next((k for k in ADAPTIVE_KEYS if k in t.data), None)):
        raise ConfigError(t.key(stray), 'applies only with limit = "adaptive"', t.data[stray])
    floor = t.positive_int("floor", 1) or 1
    ceiling = t.positive_int("ceiling", cap) or cap
    if ceiling < floor:
        raise ConfigError(t.key("ceiling"), f"must be >= floor ({floor})", ceiling)
    probe = t.get("probe", str, "auto")
    if probe not in PROBES:
        raise ConfigError(t.key("probe"), f"must be one of {', '.join(PROBES)}", probe)
    limit: LimitSpec = (
        AdaptiveLimitSpec(floor=floor, ceiling=ceiling) if mode == "adaptive" else FixedLimitSpec(value=cap)
    )
    interval = t.seconds("probe_interval", 2.0)
    probe_spec = None if probe == "off" else ProbeSpec(kind=probe, interval=interval)
    max_context = t.positive_int("max_context_tokens", None)
    default_output = t.positive_int("default_output_tokens", 512) or 512
    budget = (
        None
        if max_context is None
        else BudgetSpec(max_context_tokens=max_context, default_output_tokens=default_output)
    )
    up = UpstreamSettings(
        name=name,
        url=url.rstrip("/"),
        max_inflight=cap,
        api_key=api_key,
        models=tuple(models),
        connect_timeout=t.seconds("connect_timeout", 5.0),
        read_timeout=t.seconds("read_timeout", 600.0),
        lanes=lane_over,
        limit=limit,
        probe=probe_spec,
        budget=budget,
    )
    t.done()
    return up


def _policies_as_raw(lanes: Mapping[str, LanePolicy]) -> dict[str, dict[str, Any]]:
    return {n: {k: v for k, v in asdict(p).items() if k != "name"} for n, p in lanes.items()}


def _parse_profile(
    name: str, body: Any, lanes: Mapping[str, LanePolicy], upstreams: Mapping[str, UpstreamSettings]
) -> ProfileSettings:
    t = _Table(body, f"profiles.{name}")
    lane = t.get("lane", str, None)
    if lane is not None and lane not in lanes:
        raise ConfigError(t.key("lane"), f"names no lane (lanes: {', '.join(lanes)})", lane)
    upstream = t.get("upstream", str, None)
    if upstream is not None and upstream not in upstreams:
        raise ConfigError(t.key("upstream"), f"names no upstream (upstreams: {', '.join(upstreams)})", upstream)
    profile = ProfileSettings(
        name=name,
        lane=lane,
        upstream=upstream,
        max_inflight=t.positive_int("max_inflight", None),
        max_queued=t.positive_int("max_queued", None, minimum=0),
        rate=t.rate(),
    )
    t.done()
    return profile


def _parse_keys(
    table: dict[str, Any], profiles: dict[str, ProfileSettings], env: Mapping[str, str]
) -> dict[str, str]:
    """``[keys] worker1 = "sk-..."`` or ``worker1 = { env = "WORKER1_KEY" }``: profile name -> its key."""
    keys: dict[str, str] = {}
    for profile, spec in table.items():
        path = f"keys.{profile}"
        if isinstance(spec, dict):
            var = spec.get("env")
            if not isinstance(var, str) or set(spec) != {"env"}:
                raise ConfigError(path, 'must be a key string or { env = "VAR" }')
            secret = env.get(var)
            if not secret:
                raise ConfigError(path, "names an environment variable that is not set", var)
        elif isinstance(spec, str) and spec:
            secret = spec
        else:
            raise ConfigError(path, 'must be a key string or { env = "VAR" }')
        if secret in keys:
            raise ConfigError(path, f"same key as profile {keys[secret]!r}")
        keys[secret] = profile
        profiles.setdefault(profile, ProfileSettings(name=profile))
    return keys
