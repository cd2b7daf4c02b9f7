"""Everything a running guard holds, and the one way it is (re)configured: ``apply(policy)``.

Built empty from the settings that only a restart can change (the upstreams' URLs, keys and timeouts: one
client and one prober each), then ``apply(settings.compile())`` builds the gates, limits, budgets, rate limits
and routing. A config reload calls the same ``apply`` with the new policy: gates are reconfigured in place
(in-flight and queued requests stay), a limit of the same kind keeps its state, rate buckets keep their level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from gateway_guard.admission.gate import AdmissionGate, Gate
from gateway_guard.admission.limit import build_limit
from gateway_guard.admission.policy import Policy, ProbeSpec
from gateway_guard.admission.rate import RateLimiter
from gateway_guard.admission.reservations import Reservations
from gateway_guard.admission.ticket import Admission
from gateway_guard.app.classify import Classifier
from gateway_guard.settings import Settings
from gateway_guard.telemetry import Telemetry
from gateway_guard.upstream.client import Upstream
from gateway_guard.upstream.probe import DOWN, LOADING, Prober, Reading

if TYPE_CHECKING:
    from gateway_guard.admission.cluster import Cluster

READINESS_ONLY = ProbeSpec(kind="off")


class GuardState:
    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.upstreams = {name: Upstream(up, transport=transport) for name, up in settings.upstreams.items()}
        self.gates: dict[str, AdmissionGate] = {}
        self.cluster: Cluster | None = None  # [cluster]: gates and rates shared with other replicas (Redis)
        self.rates = RateLimiter()
        if settings.cluster is not None:
            from gateway_guard.admission.cluster import Cluster  # imports redis: only when asked for

            self.cluster = Cluster(settings.cluster)
            self.rates = self.cluster.rates
        self.reservations = Reservations()  # batch slots booked by dispatchers (POST /guard/reservations)
        self.admission = Admission(self.gates, self.rates, self.reservations)
        self.probers = {
            name: Prober(up, self._reading_for(name), on_state=self._state_for(name))
            for name, up in self.upstreams.items()
        }
        self.telemetry = Telemetry.from_settings(settings, self.gates, self.probers)
        if self.cluster is not None:
            cluster = self.cluster
            self.telemetry.metrics_registry.watch_cluster(lambda: cluster.status)
        self.policy: Policy | None = None
        self.classifier: Classifier
        self.apply(settings.compile())

    @classmethod
    def build(cls, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> GuardState:
        return cls(settings, transport=transport)

    def apply(self, policy: Policy) -> list[str]:
        """Build (at start) or reconfigure (on reload) everything the policy decides; returns what changed."""
        notes: list[str] = []
        for name, up in policy.upstreams.items():
            gate = self.gates.get(name)
            before = None if gate is None else (gate.limit_source.limit, type(gate.limit_source).__name__)
            limit = build_limit(up.limit, None if gate is None else gate.limit_source)
            if gate is None:
                make = Gate if self.cluster is None else self.cluster.gate
                gate = self.gates[name] = make(name, limit, up.lanes.values(), aging_seconds=policy.aging_seconds)
            gate.reconfigure(up, profiles=policy.profiles, aging_seconds=policy.aging_seconds, limit=limit)
            after = (limit.limit, type(limit).__name__)
            if before is not None and before != after:
                notes.append(f"upstreams.{name}: limit {before[0]} -> {after[0]} ({up.limit.kind})")
            probe = up.probe or READINESS_ONLY
            self.probers[name].configure(kind=probe.kind, interval=probe.interval)
        self.rates.reconfigure(policy.lane_rates, policy.profile_rates)
        self.classifier = Classifier(policy.routing)
        self.telemetry.apply(policy)
        old, self.policy = self.policy, policy
        if old is not None and (old.profiles.keys(), old.routing.keys) != (policy.profiles.keys(), policy.routing.keys):
            notes.append(f"profiles: {', '.join(sorted(policy.profiles)) or '-'}; {len(policy.routing.keys)} keys")
        return notes

    def _reading_for(self, name: str) -> Callable[[Reading], None]:
        def on_reading(reading: Reading) -> None:
            gate = self.gates.get(name)
            if gate is not None and reading.saturation is not None:
                gate.on_saturation(reading.saturation)

        return on_reading

    def _state_for(self, name: str) -> Callable[[str, str], None]:
        """An upstream that is down or loading holds its gate: requests wait in their lanes until it is back."""

        def on_state(state: str, detail: str) -> None:
            gate = self.gates.get(name)
            if gate is None:
                return
            if state in (DOWN, LOADING):
                gate.hold(f"{state}: {detail}")
            else:
                gate.resume()

        return on_state

    def start(self) -> None:
        """Start the background work (upstream probes); in the running loop, idempotent."""
        for prober in self.probers.values():
            prober.start()
        if self.cluster is not None:
            self.cluster.start()

    async def aclose(self) -> None:
        for prober in self.probers.values():
            await prober.stop()
        for upstream in self.upstreams.values():
            await upstream.aclose()
        await self.telemetry.aclose()
        if self.cluster is not None:
            await self.cluster.aclose()
