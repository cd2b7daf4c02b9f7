"""Everything a running guard holds: settings, classifier, one gate and one client per upstream."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from gateway_guard.admission.classify import Classifier
from gateway_guard.admission.gate import AdmissionGate, Gate
from gateway_guard.admission.limit import FixedLimit
from gateway_guard.settings import Settings
from gateway_guard.telemetry import Telemetry
from gateway_guard.upstream.client import Upstream


@dataclass
class GuardState:
    settings: Settings
    classifier: Classifier
    gates: dict[str, AdmissionGate]
    upstreams: dict[str, Upstream]
    telemetry: Telemetry

    @classmethod
    def build(cls, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> GuardState:
        profile_policies = {name: p.policy() for name, p in settings.profiles.items()}
        gates: dict[str, AdmissionGate] = {
            name: Gate(
                name,
                FixedLimit(up.max_inflight),
                up.lanes.values(),
                profile_policies,
                aging_seconds=settings.server.aging_seconds,
            )
            for name, up in settings.upstreams.items()
        }
        upstreams = {name: Upstream(up, transport=transport) for name, up in settings.upstreams.items()}
        telemetry = Telemetry.from_settings(settings, gates, upstreams)
        return cls(settings, Classifier(settings), gates, upstreams, telemetry)

    async def aclose(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.aclose()
        await self.telemetry.aclose()
