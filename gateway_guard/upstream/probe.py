"""The upstream's own word on its load, read every few seconds for the adaptive limit.

* llama.cpp ``/metrics`` (``--metrics``): ``llamacpp:requests_deferred`` (requests waiting for a slot) and
  ``llamacpp:requests_processing``.
* vLLM ``/metrics``: ``vllm:num_requests_waiting``, ``vllm:num_requests_running`` and the KV cache in use,
  ``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` before v1), 0..1.
* Ollama ``/api/ps``: no queue is exposed; a loaded model whose ``size_vram`` is below its ``size`` runs partly
  on the CPU, which is reported as memory pressure.

``probe = "auto"`` tries ``/metrics`` then ``/api/ps`` and keeps the first that answers. A probe that fails
(upstream down, timeout, not Prometheus text) reports nothing: the limit then hears of errors from requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from gateway_guard.admission.limit import Saturation
from gateway_guard.errors import GuardError
from gateway_guard.upstream.client import Upstream

log = logging.getLogger("gateway_guard.probe")

LLAMA_WAITING, LLAMA_RUNNING = "llamacpp:requests_deferred", "llamacpp:requests_processing"
VLLM_WAITING, VLLM_RUNNING = "vllm:num_requests_waiting", "vllm:num_requests_running"
VLLM_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
KINDS = ("llamacpp", "vllm", "ollama")
TIMEOUT = 2.0  # a busy server answers its metrics late (llama.cpp: after the decode step under way), not never


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample name -> value summed over its label sets (``name{labels} value [timestamp]`` lines)."""
    values: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, _, rest = line.partition("{")
            rest = rest.rpartition("}")[2]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        values[name.strip()] = values.get(name.strip(), 0.0) + value
    return values


def saturation_from_metrics(text: str) -> Saturation | None:
    values = parse_prometheus(text)
    if LLAMA_WAITING in values or LLAMA_RUNNING in values:
        return Saturation(
            source="llama.cpp /metrics",
            waiting=_int(values.get(LLAMA_WAITING)),
            running=_int(values.get(LLAMA_RUNNING)),
        )
    if VLLM_WAITING in values or VLLM_RUNNING in values:
        kv = next((values[k] for k in VLLM_KV if k in values), None)
        return Saturation(
            source="vLLM /metrics",
            waiting=_int(values.get(VLLM_WAITING)),
            running=_int(values.get(VLLM_RUNNING)),
            kv_cache_usage=kv,
        )
    return None


def saturation_from_ollama_ps(payload: Any) -> Saturation | None:
    models = payload.get("models") if isinstance(payload, dict) else None
    if not isinstance(models, list):
        return None
    return Saturation(source="Ollama /api/ps", running=len(models), memory_pressure=any(map(_spilled, models)))


def _spilled(model: object) -> bool:
    """A loaded model partly outside GPU memory (``size_vram`` < ``size``)."""
    if not isinstance(model, dict):
        return False
    size, vram = _num(model.get("size")), _num(model.get("size_vram"))
    return size is not None and vram is not None and vram < size


class Prober:
    """Reads one upstream's load every ``interval`` seconds and hands each reading to ``on_saturation``."""

    def __init__(
        self,
        upstream: Upstream,
        on_saturation: Callable[[Saturation], None],
        *,
        kind: str = "auto",
        interval: float = 2.0,
    ) -> None:
        self.upstream = upstream
        self.kind = None if kind == "auto" else kind
        self.interval = interval
        self._on_saturation = on_saturation
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    async def probe_once(self) -> Saturation | None:
        timeout = TIMEOUT
        for kind in (self.kind,) if self.kind else KINDS:
            sat = await self._read(kind, timeout)
            if sat is not None:
                if self.kind is None:
                    log.info("upstream %s: load read from %s", self.upstream.name, sat.source)
                self.kind = kind
                return sat
        if self.kind is None and not self._warned:
            self._warned = True
            log.warning("upstream %s: no load metrics answered (probe auto): latency only", self.upstream.name)
        return None

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
            sat = await self.probe_once()
            if sat is not None:
                self._on_saturation(sat)
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


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: float | None) -> int | None:
    return None if value is None else round(value)
