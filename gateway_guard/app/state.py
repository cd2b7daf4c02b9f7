"""Everything a running guard holds: settings, classifier, one gate and one client per upstream."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from gateway_guard.admission.classify import Classifier
from gateway_guard.admission.gate import AdmissionGate
from gateway_guard.admission.rate import RateLimiter
from gateway_guard.app.limits import build_gate, build_probers, build_rates
from gateway_guard.settings import Settings
from gateway_guard.telemetry import Telemetry
from gateway_guard.upstream.client import Upstream
from gateway_guard.upstream.probe import Prober


@dataclass
class GuardState:
    settings: Settings
    classifier: Classifier
    gates: dict[str, AdmissionGate]
    upstreams: dict[str, Upstream]
    telemetry: Telemetry
    rates: RateLimiter = field(default_factory=RateLimiter)
    probers: list[Prober] = field(default_factory=list)  # the adaptive limits' eyes on the upstreams

    @classmethod
    def build(cls, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> GuardState:
        gates: dict[str, AdmissionGate] = {name: build_gate(up, settings) for name, up in settings.upstreams.items()}
        upstreams = {name: Upstream(up, transport=transport) for name, up in settings.upstreams.items()}
        telemetry = Telemetry.from_settings(settings, gates, upstreams)
        probers = build_probers(settings, gates, upstreams)
        return cls(settings, Classifier(settings), gates, upstreams, telemetry, build_rates(settings), probers)

    def start(self) -> None:
        """Start the background work (upstream probes); in the running loop, idempotent."""
        for prober in self.probers:
            prober.start()

    async def aclose(self) -> None:
        for prober in self.probers:
            await prober.stop()
        for upstream in self.upstreams.values():
            await upstream.aclose()
        await self.telemetry.aclose()
