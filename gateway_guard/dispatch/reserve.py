"""Book the guard's batch slots for the workers guard-dispatch is about to start (``/guard/reservations``).

A worker takes 6-16 s from its spawn to its first LLM call; a reservation holds its slot meanwhile, so a
second dispatcher sharing the guard sees the slot as taken. The guard grants at most its free, unreserved
slots (409 when none), the worker's first admitted request consumes the reservation, and an unused one
expires after its TTL. A guard that does not know reservations (404) or refuses the token (401/403) turns
booking off for the rest of the run: guard-dispatch then dispatches on ``free`` alone, as ``tick`` does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

RESERVATIONS_PATH = "/guard/reservations"
log = logging.getLogger("gateway_guard.dispatch")


class BookingFailed(Exception):
    """The guard could not be asked (down, timeout, 5xx): dispatch nothing this time (fail closed)."""


@dataclass(frozen=True, slots=True)
class Booking:
    id: str
    profile: str
    n: int


class Reserver:
    def __init__(
        self, guard_url: str, *, token: str, ttl_s: float, upstream: str | None = None, timeout_s: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = guard_url.rstrip("/") + RESERVATIONS_PATH
        self.ttl_s = ttl_s
        self.upstream = upstream
        self.enabled = True
        self.disabled_reason = ""
        self._client = httpx.AsyncClient(
            timeout=timeout_s, transport=transport, trust_env=False, headers={"X-Guard-Admin-Token": token},
        )

    async def book(self, profile: str, n: int = 1) -> Booking | None:
        """Up to ``n`` slots for ``profile``; None when the guard has no room (409) or booking is off."""
        if not self.enabled:
            return None
        body: dict[str, object] = {"profile": profile, "n": n, "ttl_seconds": self.ttl_s}
        if self.upstream is not None:
            body["upstream"] = self.upstream
        try:
            response = await self._client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            raise BookingFailed(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 201:
            data = response.json()
            return Booking(id=str(data["id"]), profile=str(data["profile"]), n=int(data["n"]))
        if response.status_code == 409:
            return None
        if 400 <= response.status_code < 500 or response.status_code == 501:
            self.enabled = False
            self.disabled_reason = f"HTTP {response.status_code} from {self.url}"
            log.warning("reservations off for this run: %s: %s", self.disabled_reason, response.text[:200])
            return None
        raise BookingFailed(f"{self.url}: HTTP {response.status_code}: {response.text[:200]!r}")

    async def cancel(self, booking: Booking) -> None:
        try:
            await self._client.delete(f"{self.url}/{booking.id}")
        except httpx.HTTPError as exc:  # it expires on its own
            log.warning("could not cancel reservation %s: %s", booking.id, exc)

    async def aclose(self) -> None:
        await self._client.aclose()
