"""Watch the guard's capacity as it changes: ``GET /guard/events`` (Server-Sent Events), else polling.

Each ``capacity`` event carries the whole current snapshot (the ``/guard/capacity`` JSON), so nothing is
replayed after a reconnect. Fails closed: while the stream is down, or silent for longer than
``silence_s`` (the guard sends a heartbeat comment every 15 s), ``current`` is None and nothing may be
dispatched. A guard without ``/guard/events`` (404/405) is polled at ``poll_s`` instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import httpx

from gateway_guard.dispatch.capacity import CAPACITY_PATH, Capacity, parse_capacity

EVENTS_PATH = "/guard/events"
log = logging.getLogger("gateway_guard.dispatch")


class GuardWatch:
    """Keeps ``current`` (the latest capacity, or None while the guard is unreachable) and calls
    ``on_change()`` after every update, including the loss of the guard."""

    def __init__(
        self, guard_url: str, *, on_change: Callable[[], None], timeout_s: float = 2.0, silence_s: float = 40.0,
        poll_s: float = 1.0, retry_s: tuple[float, float] = (0.2, 5.0),
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base = guard_url.rstrip("/")
        self.events_url = self.base + EVENTS_PATH
        self.current: Capacity | None = None
        self.error = "not connected yet"
        self.mode = "events"
        self.updates = 0
        self.connects = 0
        self.updated_at = 0.0
        self._on_change = on_change
        self._timeout = httpx.Timeout(timeout_s, read=silence_s)
        self._poll_s = poll_s
        self._retry = retry_s
        self._transport = transport

    def _set(self, capacity: Capacity | None, error: str = "") -> None:
        self.current, self.error = capacity, error
        self.updates += 1
        self.updated_at = time.monotonic()
        self._on_change()

    def _lost(self, error: str) -> None:
        if self.current is not None or error != self.error:
            log.warning("guard capacity unavailable: %s", error)
        self._set(None, error)

    async def run(self) -> None:
        """Until cancelled: stream events, reconnecting with backoff; polls a guard that has no stream."""
        delay = self._retry[0]
        async with httpx.AsyncClient(timeout=self._timeout, transport=self._transport, trust_env=False) as client:
            while True:
                try:
                    if self.mode == "events":
                        await self._stream(client)
                        error = "event stream ended"
                    else:
                        await self._poll(client)
                        error = "poll failed"
                except _SwitchToPolling:
                    continue
                except httpx.TimeoutException as exc:
                    error = f"{self.events_url}: timed out ({type(exc).__name__})"
                except httpx.HTTPError as exc:
                    error = f"{self.events_url}: {type(exc).__name__}: {exc}"
                except ValueError as exc:
                    error = f"{self.events_url}: bad capacity JSON: {exc}"
                self._lost(error)
                await asyncio.sleep(delay)
                delay = min(self._retry[1], delay * 2)
                if self.updated_at and time.monotonic() - self.updated_at < 1:
                    delay = self._retry[0]

    async def _stream(self, client: httpx.AsyncClient) -> None:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        async with client.stream("GET", self.events_url, headers=headers) as response:
            if response.status_code in (404, 405):
                log.warning("%s answered %d: polling %s every %gs instead", self.events_url,
                            response.status_code, CAPACITY_PATH, self._poll_s)
                self.mode = "poll"
                raise _SwitchToPolling
            if response.status_code != 200:
                raise httpx.HTTPStatusError(f"HTTP {response.status_code}", request=response.request,
                                            response=response)
            self.connects += 1
            event, data = "message", list[str]()
            async for line in response.aiter_lines():
                if line == "":
                    if data and event == "capacity":
                        self._set(parse_capacity(json.loads("\n".join(data))))
                    event, data = "message", []
                elif line.startswith(":"):
                    continue  # heartbeat comment: the read timeout was reset, nothing else to do
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))

    async def _poll(self, client: httpx.AsyncClient) -> None:
        while True:
            response = await client.get(self.base + CAPACITY_PATH, headers={"Accept": "application/json"})
            if response.status_code != 200:
                raise httpx.HTTPStatusError(f"HTTP {response.status_code}", request=response.request,
                                            response=response)
            self._set(parse_capacity(response.json()))
            await asyncio.sleep(self._poll_s)


class _SwitchToPolling(Exception):
    pass
