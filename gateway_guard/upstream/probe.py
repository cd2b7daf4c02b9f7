"""One probe loop per upstream: is it up, and what does it say about its own load (``saturation.py``)?

Every ``interval`` seconds the prober asks the upstream whether it is ready (its health endpoints) and, unless
``kind = "off"``, reads its load (``probe = "auto"`` tries ``/metrics`` then ``/api/ps`` and keeps the first
that answers). The last ``Reading`` is kept with its time: ``/metrics``, ``/guard/ready`` and the capacity view
read it, so no client request ever causes a call upstream (no amplification). Each reading is handed to
``on_reading`` (the state feeds it to the upstream's limit: an adaptive one learns from it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway_guard.errors import GuardError
from gateway_guard.upstream.client import Upstream
from gateway_guard.upstream.saturation import (
    KINDS,
    Saturation,
    saturation_from_metrics,
    saturation_from_ollama_ps,
)

log = logging.getLogger("gateway_guard.probe")

TIMEOUT = 2.0  # a busy server answers its metrics late (llama.cpp: after the decode step under way), not never


@dataclass(frozen=True, slots=True)
class Reading:
    at: float  # time.monotonic() when it was taken
    ready: bool
    detail: str
    saturation: Saturation | None

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
    ) -> None:
        self.upstream = upstream
        self.interval = interval
        self._on_reading = on_reading
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

    async def read(self) -> Reading:
        """One full reading now (readiness, then load), kept as ``last`` and handed on."""
        ready, detail = await self.upstream.ready()
        sat = await self.probe_once()
        reading = Reading(time.monotonic(), ready, detail, sat)
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
        while True:
            try:
                await self.read()
            except Exception:  # a probe reports, never dies
                log.exception("upstream %s: probe failed", self.upstream.name)
            await asyncio.sleep(self.interval)

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
