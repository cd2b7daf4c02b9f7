"""What an upstream says about its own load, parsed from its metrics: the prober's reading (no I/O here).

* llama.cpp ``/metrics`` (``--metrics``): ``llamacpp:requests_deferred`` (requests waiting for a slot) and
  ``llamacpp:requests_processing``.
* vLLM ``/metrics``: ``vllm:num_requests_waiting``, ``vllm:num_requests_running`` and the KV cache in use,
  ``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` before v1), 0..1.
* Ollama ``/api/ps``: no queue is exposed; a loaded model whose ``size_vram`` is below its ``size`` runs partly
  on the CPU, which is reported as memory pressure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Saturation:
    """What an upstream says about its own load, from one probe (``None``: the server does not say)."""

    source: str
    waiting: int | None = None  # requests it holds without running (llama.cpp deferred, vLLM waiting)
    running: int | None = None
    kv_cache_usage: float | None = None  # 0..1
    memory_pressure: bool = False  # e.g. an Ollama model partly out of VRAM


LLAMA_WAITING, LLAMA_RUNNING = "llamacpp:requests_deferred", "llamacpp:requests_processing"
VLLM_WAITING, VLLM_RUNNING = "vllm:num_requests_waiting", "vllm:num_requests_running"
VLLM_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
KINDS = ("llamacpp", "vllm", "ollama")


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



def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: float | None) -> int | None:
    return None if value is None else round(value)
