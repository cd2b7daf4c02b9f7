"""From settings to each upstream's limit, token budget and gate, and to the shared rate limiter.

Used when the guard starts (``GuardState.build``) and when it reloads its config (``app/reload.py``).
"""

from __future__ import annotations

from gateway_guard.admission.budget import TokenBudget
from gateway_guard.admission.gate import Gate, ProfilePolicy
from gateway_guard.admission.limit import AdaptiveLimit, FixedLimit, Limit
from gateway_guard.admission.rate import RateLimiter, RatePolicy
from gateway_guard.settings import Settings, UpstreamSettings


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
