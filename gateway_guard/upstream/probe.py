"""One probe loop per upstream: is it up, and what does it say about its own load (``saturation.py``)?

Every ``interval`` seconds the prober asks the upstream's ``GET /health`` and, unless ``kind = "off"``, reads
its load (``probe = "auto"`` tries ``/metrics`` then ``/api/ps`` and keeps the first that answers). The last
``Reading`` is kept with its time: ``/metrics``, ``/guard/ready`` and the capacity view read it, so no client
request ever causes a call upstream (no amplification). Each reading is handed to ``on_reading`` (the state
feeds it to the upstream's limit: an adaptive one learns from it).

**The upstream's state** (``up`` / ``down`` / ``loading``, since when): ``down`` when it cannot be reached,
``loading`` when its health check (or a request) answers 503 (llama.cpp's "Loading model"), else ``up``. The
proxy reports what its requests see (``report``): a refused connection, a not-ready answer, a server gone
before it answered. While the upstream is not up it is probed again with backoff (``BACKOFF`` doubling up to
the interval), and ``on_state`` hears each change: the state holds the upstream's gate (requests wait in
their lanes) until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway_guard.errors import GuardError, UpstreamUnavailable
from gateway_guard.upstream.client import Upstream
from gateway_guard.upstream.errors import UpstreamClosedEarly
from gateway_guard.upstream.saturation import (
    KINDS,
    Saturation,
    saturation_from_metrics,
    saturation_from_ollama_ps,
)

log = logging.getLogger("gateway_guard.probe")

TIMEOUT = 2.0  # a busy server answers its metrics late (llama.cpp: after the decode step under way), not never
BACKOFF = 0.25  # first re-probe of an upstream that went away; doubles up to the interval
UP, DOWN, LOADING, UNKNOWN = "up", "down", "loading", "unknown"
LOST_HEALTH_PAUSES = (0.1, 0.2)  # GET /health lost with no answer: asked again after these pauses


@dataclass(frozen=True, slots=True)
class Reading:
    at: float  # time.monotonic() when it was taken
    ready: bool
    detail: str
    saturation: Saturation | None
    state: str = UP

    def age(self) -> float:
        return time.monotonic() - self.at


class Prober:
    """Reads one upstream every ``interval`` seconds; ``last`` is the newest ``Reading``."""

    def __init__(
        self,
        upstream: Upstream,
        on_reading: Callable[[Reading], None] | None = None,
        *,
        kind: str = "auto",
        interval: float = 2.0,
        on_state: Callable[[str, str], None] | None = None,
    ) -> None:
        self.upstream = upstream
        self.interval = interval
        self._on_reading = on_reading
        self._on_state = on_state
        self.state = UNKNOWN
        self.state_detail = "not probed yet"
        self.state_since = time.monotonic()
        self._backoff = BACKOFF
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned = False
        self._first = asyncio.Event()
        self.last: Reading | None = None
        self.kind: str | None = None
        self.configure(kind=kind, interval=interval)

    def configure(self, *, kind: str, interval: float) -> None:
        """A new probe spec (config reload): the kind is found again when it changes."""
        wanted = None if kind == "auto" else kind
        if kind != getattr(self, "_asked", None):
            self.kind = wanted
            self._asked = kind
        self.interval = interval

    @property
    def reads_load(self) -> bool:
        """False with ``probe = "off"``: readiness only."""
        return self._asked != "off"

    async def probe_once(self) -> Saturation | None:
        if self._asked == "off":
            return None
        for kind in (self.kind,) if self.kind else KINDS:
            sat = await self._read(kind, TIMEOUT)
            if sat is not None:
                if self.kind is None:
                    log.info("upstream %s: load read from %s", self.upstream.name, sat.source)
                self.kind = kind
                return sat
        if self.kind is None and not self._warned:
            self._warned = True
            log.warning("upstream %s: no load metrics answered (probe auto): latency only", self.upstream.name)
        return None

    def report(self, state: str, detail: str, *, probe_soon: bool = True) -> None:
        """What a request saw (``DOWN``, ``LOADING``) or the health check said; probes again soon when not up."""
        if state != self.state:
            log.log(
                logging.INFO if state == UP else logging.WARNING,
                "upstream %s is %s: %s (was %s for %.1fs)",
                self.upstream.name,
                state,
                detail,
                self.state,
                time.monotonic() - self.state_since,
            )
            self.state, self.state_since = state, time.monotonic()
            if state != UP:
                self._backoff = BACKOFF
                if probe_soon:
                    self.poke()
                if not self.running:  # the state holds the gate on this: someone must see the server back
                    self.start()
        self.state_detail = detail
        if self._on_state is not None:
            self._on_state(state, detail)

    def poke(self) -> None:
        """Probe now rather than at the next interval (something looked wrong)."""
        if self._wake is not None:
            self._wake.set()

    async def health(self) -> tuple[str, str]:
        """``GET /health``: a refused connection is down, a 503 is loading, any other answer is up -- and so is
        a server that took the connection but is slow to answer or breaks the answer (there, not restarting).
        A connection closed or reset with no answer is asked again (a GET may be), after 0.1 s and 0.2 s: a
        process being killed closes its sockets one by one and its port may take a new connection for a moment
        after the others died; a later try meets the refused port."""
        for pause in (*LOST_HEALTH_PAUSES, None):
            try:
                status, text = await self.upstream.get_text("/health", timeout=TIMEOUT)
                break
            except UpstreamUnavailable as exc:
                return DOWN, str(exc)
            except UpstreamClosedEarly as exc:
                if pause is None:
                    return UP, f"GET /health: {exc}"
                await asyncio.sleep(pause)
            except GuardError as exc:
                return UP, f"GET /health: {exc}"
        if status == 503:
            return LOADING, f"GET /health -> 503 {text[:80].strip()}"
        return UP, f"GET /health -> {status}"

    async def read(self) -> Reading:
        """One full reading now (health, then load), kept as ``last`` and handed on."""
        state, detail = await self.health()
        self.report(state, detail, probe_soon=False)
        sat = await self.probe_once() if state == UP else None
        reading = Reading(time.monotonic(), state == UP, detail, sat, state)
        self.last = reading
        self._first.set()
        if self._on_reading is not None:
            self._on_reading(reading)
        return reading

    async def latest(self, *, wait: float = TIMEOUT) -> Reading | None:
        """The last reading; before the first one, wait for it (at most ``wait`` seconds), never probe anew.
        A prober nobody started (an app run without its lifespan) starts its loop here."""
        if not self.running:
            self.start()
        if self.last is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._first.wait()
        return self.last

    async def _read(self, kind: str, timeout: float) -> Saturation | None:
        path = "/api/ps" if kind == "ollama" else "/metrics"
        try:
            status, text = await self.upstream.get_text(path, timeout=timeout)
        except GuardError as exc:
            log.debug("upstream %s: probe %s failed: %s", self.upstream.name, path, exc)
            return None
        if status != 200:
            log.debug("upstream %s: probe %s -> %d", self.upstream.name, path, status)
            return None
        if kind == "ollama":
            try:
                return saturation_from_ollama_ps(json.loads(text))
            except ValueError:
                return None
        sat = saturation_from_metrics(text)
        expected = "llama.cpp" if kind == "llamacpp" else "vLLM"
        return sat if sat is not None and sat.source.startswith(expected) else None

    async def run(self) -> None:
        wake = self._wake = asyncio.Event()
        while True:
            wake.clear()
            try:
                await self.read()
            except Exception:  # a probe reports, never dies
                log.exception("upstream %s: probe failed", self.upstream.name)
            if self.state in (UP, UNKNOWN):
                delay = self.interval
            else:
                delay, self._backoff = self._backoff, min(max(self.interval, BACKOFF), self._backoff * 2)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wake.wait()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name=f"probe {self.upstream.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
