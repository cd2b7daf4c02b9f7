"""What a gate shows (``GateSnapshot``) and what app/ needs of any gate (``AdmissionGate``): the in-memory gate
(``gate.py``) and the Redis-backed one (``cluster/``) both implement it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gateway_guard.admission.limit import Limit
from gateway_guard.admission.permit import Permit
from gateway_guard.admission.policy import ProfilePolicy, UpstreamPolicy
from gateway_guard.upstream.saturation import Saturation


@dataclass(frozen=True, slots=True)
class SlotView:
    limit: int | None
    in_flight: int
    queued: int
    free: int | None

    def as_dict(self) -> dict[str, int | None]:
        return {"limit": self.limit, "in_flight": self.in_flight, "queued": self.queued, "free": self.free}


@dataclass(frozen=True, slots=True)
class GateSnapshot:
    name: str
    limit: int
    in_flight: int
    queued: int
    free: int
    lanes: dict[str, SlotView] = field(default_factory=dict)
    profiles: dict[str, SlotView] = field(default_factory=dict)
    tokens_in_flight: int | None = None  # with a token budget
    max_context_tokens: int | None = None
    held: str | None = None  # why nothing is granted now (the upstream is down), else None


class AdmissionGate(Protocol):
    """What app/ needs from a gate; a distributed (e.g. Redis-backed) gate implements the same."""

    name: str

    @property
    def limit_source(self) -> Limit: ...

    async def acquire(
        self,
        lane: str,
        profile: str,
        *,
        max_wait: float | None = None,
        prompt_tokens: int = 0,
        since: float | None = None,
    ) -> Permit: ...

    def queue_timeout(self, lane: str) -> float: ...

    def retry_after(self, lane: str) -> float: ...

    def snapshot(self) -> GateSnapshot: ...

    def lane_names(self) -> Iterable[str]: ...

    def reconfigure(
        self, policy: UpstreamPolicy, *, profiles: Mapping[str, ProfilePolicy], aging_seconds: float, limit: Limit
    ) -> None: ...

    def on_saturation(self, sat: Saturation) -> None: ...

    def watch(self, listener: Callable[[], None]) -> Callable[[], None]: ...

    def hold(self, reason: str) -> None: ...

    def resume(self) -> None: ...
