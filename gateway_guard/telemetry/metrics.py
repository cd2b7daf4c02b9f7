"""Prometheus metrics of one guard, in a registry of its own (two guards in one process never collide).

Per request (counted when it ends): ``gateway_guard_requests_total{upstream,lane,outcome}``, the queue wait,
upstream latency and time-to-first-token histograms, and token counters per profile.

Read at scrape time, so there is no second set of books to drift: the gates' own snapshots
(``gateway_guard_in_flight``, ``_queued``, ``_limit``, ...) and each upstream's prober's last reading
(``upstream/probe.py``: readiness, and where the upstream exposes them its own saturation gauges, llama.cpp
``llamacpp:requests_processing`` / ``requests_deferred``, vLLM ``vllm:num_requests_running`` /
``num_requests_waiting`` / KV cache use) with its age. A scrape never calls an upstream.

Label values stay few: upstreams and lanes come from the config, outcomes from ``Outcome``; profiles are the
configured ones plus the first ``MAX_EXTRA_PROFILES`` others seen (a client may name any profile in a path or
header), then ``other``. A request that ended before it had a lane or an upstream is labelled ``none``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway_guard.admission.gate import AdmissionGate
from gateway_guard.telemetry.record import RequestRecord
from gateway_guard.upstream.probe import Prober, Reading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NONE = "none"
OTHER = "other"
MAX_EXTRA_PROFILES = 32
REUSE_SECONDS = 1.0  # the same text for scrapes this close together when nothing changed (ages are rounded)

QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# The upstream's own gauges (``upstream/probe.py`` reads llama.cpp's and vLLM's names): ours <- its field.
UPSTREAM_GAUGES: dict[str, tuple[str, str]] = {
    "requests_processing": (
        "running",
        "requests it is running (llamacpp:requests_processing, vllm:num_requests_running)",
    ),
    "requests_deferred": (
        "waiting",
        "requests it holds without running (llamacpp:requests_deferred, vllm:num_requests_waiting)",
    ),
    "kv_cache_usage_ratio": ("kv_cache_usage", "KV cache in use, 0..1 (vllm:kv_cache_usage_perc)"),
}


class ProfileLabels:
    """Profile name -> label value, bounded: configured profiles, then the first few others, then ``other``."""

    __slots__ = ("_extra", "_known", "_max_extra")

    def __init__(self, known: Iterable[str], max_extra: int = MAX_EXTRA_PROFILES) -> None:
        self._known = set(known)
        self._extra: set[str] = set()
        self._max_extra = max_extra

    def configure(self, known: Iterable[str]) -> None:
        """The configured profiles after a reload; extras seen so far keep their label."""
        self._known = set(known)

    def __call__(self, profile: str | None) -> str:
        if profile is None:
            return NONE
        if profile in self._known or profile in self._extra:
            return profile
        if len(self._extra) < self._max_extra:
            self._extra.add(profile)
            return profile
        return OTHER


class GuardMetrics:
    def __init__(
        self,
        gates: Mapping[str, AdmissionGate],
        probers: Mapping[str, Prober],
        profiles: Iterable[str] = (),
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._gates = gates
        self._probers = probers
        self._profile = ProfileLabels(profiles)
        self._version = 0  # moves with every request that ends and every change at a gate
        self._watched: set[int] = set()
        self._cached: tuple[int, float, tuple[Reading | None, ...], bytes] | None = None
        reg = self.registry
        self.requests = Counter(
            "gateway_guard_requests",
            "Requests that ended, by how they ended (admitted, rejected_queue_full, expired_deadline, ...)",
            ["upstream", "lane", "outcome"],
            registry=reg,
        )
        self.queue_wait = Histogram(
            "gateway_guard_queue_wait_seconds",
            "Time an admitted request waited in the gate's queue for a permit",
            ["upstream", "lane"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=reg,
        )
        self.upstream_latency = Histogram(
            "gateway_guard_upstream_latency_seconds",
            "From sending an admitted request upstream to the end of its response (the whole stream)",
            ["upstream", "lane"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.ttft = Histogram(
            "gateway_guard_time_to_first_token_seconds",
            "Streamed responses: from sending upstream to the first chunk (queue wait not included)",
            ["upstream", "lane"],
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.input_tokens = Counter(
            "gateway_guard_input_tokens",
            "Prompt tokens as reported by the upstream's usage",
            ["upstream", "profile"],
            registry=reg,
        )
        self.output_tokens = Counter(
            "gateway_guard_output_tokens",
            "Completion tokens as reported by the upstream's usage (estimated from chunks when it reports none)",
            ["upstream", "profile"],
            registry=reg,
        )
        self._readings: dict[str, Reading | None] = {}
        reg.register(GateCollector(gates, self._profile))
        reg.register(UpstreamSaturationCollector(self._readings))
        self._children: dict[tuple[Any, ...], Any] = {}

    def observe(self, record: RequestRecord) -> None:
        self._version += 1
        upstream = record.upstream or NONE
        lane = record.lane or NONE
        self._child(self.requests, upstream, lane, record.outcome.value).inc()
        if record.admitted:
            self._child(self.queue_wait, upstream, lane).observe(record.queue_wait)
            assert record.upstream_started is not None
            self._child(self.upstream_latency, upstream, lane).observe(
                record.started + record.duration - record.upstream_started
            )
            if record.streamed and record.ttfb is not None:
                self._child(self.ttft, upstream, lane).observe(record.ttfb)
        if record.prompt_tokens or record.completion_tokens:
            profile = self._profile(record.profile)
            if record.prompt_tokens:
                self._child(self.input_tokens, upstream, profile).inc(record.prompt_tokens)
            if record.completion_tokens:
                self._child(self.output_tokens, upstream, profile).inc(record.completion_tokens)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def set_profiles(self, profiles: Iterable[str]) -> None:
        self._profile.configure(profiles)
        for gate in self._gates.values():  # a gate's change is a change of the text
            if id(gate) not in self._watched:
                self._watched.add(id(gate))
                gate.watch(self._bump)

    def _bump(self) -> None:
        self._version += 1

    def watch_cluster(self, status: Callable[[], Mapping[str, Any]]) -> None:
        """``[cluster]``: each upstream's shared-cap status (``admission/cluster``'s ``ClusterStatus``) per scrape."""
        self.registry.register(ClusterCollector(status))

    async def render(self) -> bytes:
        """The exposition text, with each prober's last reading (before its first, waits for it, briefly).

        While nothing changed -- no request ended, nothing moved at a gate, the same readings -- and the last text
        is younger than ``REUSE_SECONDS``, that text is served again: a scrape flood costs no rendering each."""
        names = list(self._probers)
        results = tuple(await asyncio.gather(*(self._probers[n].latest() for n in names)))
        now = time.monotonic()
        cached = self._cached
        if (
            cached is not None
            and cached[0] == self._version
            and now - cached[1] < REUSE_SECONDS
            and all(a is b for a, b in zip(cached[2], results, strict=True))
        ):
            return cached[3]
        self._readings.clear()
        self._readings.update(zip(names, results, strict=True))
        text = generate_latest(self.registry)
        self._cached = (self._version, now, results, text)
        return text


class GateCollector(Collector):
    """Gauges read from each gate's ``snapshot()`` when Prometheus scrapes."""

    def __init__(self, gates: Mapping[str, AdmissionGate], profile_label: ProfileLabels) -> None:
        self._gates = gates
        self._profile = profile_label

    def describe(self) -> Iterable[Metric]:
        return []  # created per scrape: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        limit = GaugeMetricFamily(
            "gateway_guard_limit", "Cap on requests in flight at the upstream", labels=["upstream"]
        )
        lane_limit = GaugeMetricFamily(
            "gateway_guard_lane_limit", "Slots a lane may fill (limit minus its headroom)", labels=["upstream", "lane"]
        )
        in_flight = GaugeMetricFamily(
            "gateway_guard_in_flight", "Requests holding a permit (at the upstream)", labels=["upstream", "lane"]
        )
        queued = GaugeMetricFamily("gateway_guard_queued", "Requests waiting for a permit", labels=["upstream", "lane"])
        free = GaugeMetricFamily(
            "gateway_guard_free_slots", "Slots a new request of the lane would get at once", labels=["upstream", "lane"]
        )
        p_in_flight = GaugeMetricFamily(
            "gateway_guard_profile_in_flight", "Requests holding a permit, per profile", labels=["upstream", "profile"]
        )
        p_queued = GaugeMetricFamily(
            "gateway_guard_profile_queued", "Requests waiting for a permit, per profile", labels=["upstream", "profile"]
        )
        for name, gate in list(self._gates.items()):
            snap = gate.snapshot()
            limit.add_metric([name], snap.limit)
            for lane, view in snap.lanes.items():
                if view.limit is not None:
                    lane_limit.add_metric([name, lane], view.limit)
                in_flight.add_metric([name, lane], view.in_flight)
                queued.add_metric([name, lane], view.queued)
                if view.free is not None:
                    free.add_metric([name, lane], view.free)
            per_profile: dict[str, list[int]] = {}
            for profile, view in snap.profiles.items():
                totals = per_profile.setdefault(self._profile(profile), [0, 0])
                totals[0] += view.in_flight
                totals[1] += view.queued
            for label, (flying, waiting) in per_profile.items():
                p_in_flight.add_metric([name, label], flying)
                p_queued.add_metric([name, label], waiting)
        yield from (limit, lane_limit, in_flight, queued, free, p_in_flight, p_queued)


class UpstreamSaturationCollector(Collector):
    """Each upstream as its prober last saw it: ready or not, its own gauges, and how old the reading is."""

    def __init__(self, readings: Mapping[str, Reading | None]) -> None:
        self._readings = readings

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "gateway_guard_upstream_metrics_up",
            "1 when the upstream's own load metrics answered at the prober's last reading, else 0",
            labels=["upstream"],
        )
        ready = GaugeMetricFamily(
            "gateway_guard_upstream_ready", "1 when the upstream answered its health check at the last reading",
            labels=["upstream"],
        )
        age = GaugeMetricFamily(
            "gateway_guard_upstream_reading_age_seconds", "Age of the prober's last reading", labels=["upstream"]
        )
        gauges = {
            ours: GaugeMetricFamily(
                f"gateway_guard_upstream_{ours}", f"The upstream's own view: {doc}", labels=["upstream"]
            )
            for ours, (_, doc) in UPSTREAM_GAUGES.items()
        }
        for name, reading in self._readings.items():
            sat = None if reading is None else reading.saturation
            up.add_metric([name], 0 if sat is None else 1)
            if reading is not None:
                ready.add_metric([name], 1 if reading.ready else 0)
                age.add_metric([name], round(reading.age(), 3))
            for ours, (field, _) in UPSTREAM_GAUGES.items():
                value = None if sat is None else getattr(sat, field)
                if value is not None:
                    gauges[ours].add_metric([name], float(value))
        yield from (up, ready, age)
        yield from gauges.values()


class ClusterCollector(Collector):
    """The shared cap (``[cluster]``): shared or in fallback, and the leases each replica holds, as last seen."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self._status = status

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        shared = GaugeMetricFamily(
            "gateway_guard_cluster_shared",
            "1 while the cap is shared through Redis, 0 in fallback",
            labels=["upstream"],
        )
        held = GaugeMetricFamily(
            "gateway_guard_cluster_held", "Requests this replica holds under the shared cap", labels=["upstream"]
        )
        idle = GaugeMetricFamily(
            "gateway_guard_cluster_idle_leases",
            "Leases this replica keeps for its next requests (no request on them, counted in the shared cap)",
            labels=["upstream"],
        )
        leases = GaugeMetricFamily(
            "gateway_guard_cluster_replica_leases",
            "Leases per live replica, cluster-wide, as last seen",
            labels=["upstream", "replica"],
        )
        for name, status in self._status().items():
            shared.add_metric([name], 1 if status.shared else 0)
            held.add_metric([name], status.held)
            idle.add_metric([name], status.idle)
            for replica, count in status.replicas.items():
                leases.add_metric([name, replica], count)
        yield from (shared, held, idle, leases)
