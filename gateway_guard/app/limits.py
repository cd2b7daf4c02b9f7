"""From settings to each upstream's limit, token budget and gate, and to the shared rate limiter.

Used when the guard starts (``GuardState.build``) and when it reloads its config (``app/reload.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gateway_guard.admission.budget import TokenBudget
from gateway_guard.admission.gate import AdmissionGate, Gate, ProfilePolicy
from gateway_guard.admission.limit import AdaptiveLimit, FixedLimit, Limit, Saturation
from gateway_guard.admission.rate import RateLimiter, RatePolicy
from gateway_guard.settings import Settings, UpstreamSettings
from gateway_guard.upstream.client import Upstream
from gateway_guard.upstream.probe import Prober


def build_limit(up: UpstreamSettings) -> Limit:
    if up.limit == "adaptive":
        return AdaptiveLimit(floor=up.floor, ceiling=up.ceiling)
    return FixedLimit(up.max_inflight)


def build_budget(up: UpstreamSettings) -> TokenBudget | None:
    if up.max_context_tokens is None:
        return None
    return TokenBudget(up.max_context_tokens, default_output=up.default_output_tokens)


def profile_policies(settings: Settings) -> dict[str, ProfilePolicy]:
    return {name: p.policy() for name, p in settings.profiles.items()}


def build_gate(up: UpstreamSettings, settings: Settings) -> Gate:
    return Gate(
        up.name,
        build_limit(up),
        up.lanes.values(),
        profile_policies(settings),
        aging_seconds=settings.server.aging_seconds,
        budget=build_budget(up),
    )


def profile_rates(settings: Settings) -> dict[str, RatePolicy]:
    return {name: p.rate for name, p in settings.profiles.items() if p.rate != RatePolicy()}


def build_rates(settings: Settings) -> RateLimiter:
    return RateLimiter(settings.lane_rates, profile_rates(settings))


def build_probers(
    settings: Settings, gates: Mapping[str, AdmissionGate], upstreams: Mapping[str, Upstream]
) -> list[Prober]:
    """One prober per adaptive upstream (unless ``probe = "off"``), feeding that gate's limit."""
    probers = []
    for name, up in settings.upstreams.items():
        gate = gates.get(name)
        if up.limit == "adaptive" and up.probe != "off" and isinstance(gate, Gate):
            probers.append(Prober(upstreams[name], feed(gate), kind=up.probe, interval=up.probe_interval))
    return probers


def feed(gate: Gate) -> Callable[[Saturation], None]:
    """Hands a reading to whatever adaptive limit the gate has at that moment (a reload may replace it)."""

    def on_saturation(sat: Saturation) -> None:
        limit = gate.limit_source
        if isinstance(limit, AdaptiveLimit):
            limit.on_saturation(sat, in_flight=gate.in_flight)

    return on_saturation
