"""How the cap is chosen, apart from the gate that enforces it (Netflix concurrency-limits' Limit/Limiter split).

A ``Limit`` knows the current cap and hears how each admitted request ended; the gate asks it for the number
and subscribes to changes. ``FixedLimit`` never moves unless an operator (or a config reload) sets it.

``AdaptiveLimit`` moves between a floor and a ceiling (AIMD), from two kinds of evidence:

1. **The upstream's own queue**, read by ``upstream/probe.py`` and handed to ``on_saturation``: llama.cpp's
   ``requests_deferred`` or vLLM's ``num_requests_waiting`` above 0 means the guard let in more than the server
   runs, so the limit drops at once to what it does run (``in_flight - waiting``). Requests the server does
   not show at all (``in_flight - waiting - running >= BACKLOG`` on two probes in a row) wait before it, e.g.
   for llama.cpp's HTTP threads, which idle keep-alive connections hold: the limit drops to ``running``. A
   gap of one is normal (a reply on its way back, a request on its way in). vLLM's KV cache at
   ``kv_high`` or more, or an Ollama model spilled out of VRAM, count as saturation too (times ``backoff``).
2. **Latency per output token** (the permit's hold time over the tokens it produced, from replies of at least
   ``MIN_TOKENS``; time to first token is inside it, so queueing at the server shows), used only while the
   upstream exposes no fresh queue metric: a short EWMA above ``tolerance`` times a slowly-drifting minimum is
   congestion (times ``backoff``, once per ``cooldown``). An upstream error or timeout (a *dropped* sample) too.

It rises by one when the limit held requests back at a release (the gate full, or a lane at its cap) and the
last probe was clean, at most once per ``increase_interval``. Leaving the value saturation last brought it
down to (the *edge*) waits longer each time saturation brings it back there (doubling, up to
``max_increase_interval``), so a settled limit seldom pokes the server's queue; when the server has grown, the
climb goes on at the normal pace.

Every change is kept in ``history`` (time, limit, reason) and ``reason`` says why the limit is what it is.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway_guard.admission.policy import AdaptiveLimitSpec, FixedLimitSpec, LimitSpec, Result
from gateway_guard.upstream.saturation import Saturation as Saturation

HISTORY = 256
MIN_TOKENS = 4  # latency samples need at least this many output tokens
BACKLOG = 2  # requests of ours the server does not show, on two probes in a row: queued before it (see below)


class Limit(Protocol):
    """The cap's algorithm, apart from the gate that enforces it; all a caller needs, no type-sniffing."""

    reason: str  # why the limit is what it is
    history: deque[LimitChange]  # (time, limit, reason), newest last

    @property
    def limit(self) -> int: ...

    def on_sample(
        self, *, rtt: float, in_flight: int, result: Result, output_tokens: int | None = None, blocked: bool = False
    ) -> None:
        """One admitted request ended after ``rtt`` seconds with ``in_flight`` requests in flight (itself
        included); ``output_tokens`` when the proxy saw them; ``blocked``: requests were waiting that a higher
        limit would have let in (a lane at its cap, limit minus headroom). Only ``SUCCESS`` can raise it."""

    def on_saturation(self, sat: Saturation, *, in_flight: int) -> None:
        """One probe of the upstream's own load (``upstream/probe.py``)."""

    def set(self, limit: int, reason: str = "set by operator") -> None:
        """An operator's value; ``LimitNotSettable`` where the limit moves by itself."""

    def subscribe(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(new_limit)`` whenever the limit changes."""


class LimitNotSettable(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class LimitChange:
    at: float
    limit: int
    reason: str


class _Changes:
    """Listeners, ``reason`` and ``history``: what every limit shares."""

    __slots__ = ("_clock", "_limit", "_listeners", "history", "reason")

    def __init__(self, limit: int, reason: str, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._limit = limit
        self._listeners: list[Callable[[int], None]] = []
        self.reason = reason
        self.history: deque[LimitChange] = deque([LimitChange(clock(), limit, reason)], maxlen=HISTORY)

    @property
    def limit(self) -> int:
        return self._limit

    def subscribe(self, listener: Callable[[int], None]) -> None:
        self._listeners.append(listener)

    def _change(self, limit: int, reason: str) -> None:
        self.reason = reason
        if limit == self._limit:
            return
        self._limit = limit
        self.history.append(LimitChange(self._clock(), limit, reason))
        for listener in list(self._listeners):
            listener(limit)


class FixedLimit(_Changes):
    __slots__ = ()

    def __init__(self, limit: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        _check(limit)
        super().__init__(limit, "fixed", clock)

    def set(self, limit: int, reason: str = "set by operator") -> None:
        _check(limit)
        self._change(limit, reason)

    def on_sample(
        self, *, rtt: float, in_flight: int, result: Result, output_tokens: int | None = None, blocked: bool = False
    ) -> None:
        return None

    def on_saturation(self, sat: Saturation, *, in_flight: int) -> None:
        return None


class AdaptiveLimit(_Changes):
    __slots__ = (
        "_backlog_seen",
        "_baseline",
        "_edge",
        "_edge_wait",
        "_last_decrease",
        "_last_probe",
        "_next_increase",
        "_short",
        "backoff",
        "ceiling",
        "cooldown",
        "floor",
        "increase_interval",
        "kv_high",
        "max_increase_interval",
        "probe_ttl",
        "tolerance",
    )

    def __init__(
        self,
        *,
        floor: int = 1,
        ceiling: int,
        initial: int | None = None,
        tolerance: float = 2.0,
        backoff: float = 0.9,
        kv_high: float = 0.95,
        cooldown: float = 1.0,
        increase_interval: float = 2.0,
        max_increase_interval: float = 120.0,
        probe_ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check(floor)
        if ceiling < floor:
            raise ValueError(f"ceiling ({ceiling}) must be >= floor ({floor})")
        if not 0 < backoff < 1:
            raise ValueError(f"backoff must be in (0, 1), got {backoff}")
        start = ceiling if initial is None else min(ceiling, max(floor, initial))
        super().__init__(start, f"adaptive: starts at {start} (floor {floor}, ceiling {ceiling})", clock)
        self.floor, self.ceiling = floor, ceiling
        self.tolerance, self.backoff, self.kv_high = tolerance, backoff, kv_high
        self.cooldown, self.increase_interval, self.max_increase_interval = (
            cooldown,
            increase_interval,
            max_increase_interval,
        )
        self.probe_ttl = probe_ttl
        self._short: float | None = None  # EWMA of latency per output token
        self._baseline: float | None = None  # its minimum, drifting up slowly so a new normal is learnt
        self._edge: int | None = None  # the limit at which saturation was last seen
        self._edge_wait = increase_interval
        self._next_increase = clock() + increase_interval
        self._last_decrease = float("-inf")
        self._last_probe: tuple[float, Saturation] | None = None
        self._backlog_seen = 0  # consecutive probes that showed requests of ours the server does not

    # -- evidence -------------------------------------------------------------------------------------------

    def on_sample(
        self, *, rtt: float, in_flight: int, result: Result, output_tokens: int | None = None, blocked: bool = False
    ) -> None:
        if result is Result.DROPPED:
            self._decrease(self._backed_off(), "an upstream error or timeout")
            return
        if result is Result.IGNORED:  # a client that left, a request that never reached the server
            return
        congested = self._observe_latency(rtt, output_tokens)
        if congested is not None and not self._queue_metric_fresh():  # the server's own queue says more
            self._decrease(self._backed_off(), congested)
        elif (in_flight >= self._limit or blocked) and self._probe_clean():
            self._increase()

    def on_saturation(self, sat: Saturation, *, in_flight: int) -> None:
        """One probe of the upstream's own metrics; ``in_flight`` is the gate's count at that moment."""
        self._last_probe = (self._clock(), sat)
        hidden = in_flight - (sat.waiting or 0) - sat.running if sat.running is not None else 0
        self._backlog_seen = self._backlog_seen + 1 if hidden >= BACKLOG else 0
        if sat.waiting:
            share = in_flight - sat.waiting  # what the server actually runs of ours
            if share < self._limit:
                what = "deferred" if "llama" in sat.source else "waiting"
                self._decrease(
                    max(self.floor, share),
                    f"{sat.source}: {sat.waiting} requests {what} with {in_flight} in flight "
                    f"(the server runs {max(0, share)} of ours)",
                    paced=False,
                )
        elif self._backlog_seen >= 2 and sat.running is not None and sat.running < self._limit >= in_flight:
            self._decrease(
                max(self.floor, sat.running),
                f"{sat.source}: {in_flight} in flight but the server shows {sat.running} running and "
                f"{sat.waiting or 0} waiting (the rest wait unseen, e.g. for its HTTP threads)",
                paced=False,
            )
        elif sat.kv_cache_usage is not None and sat.kv_cache_usage >= self.kv_high:
            self._decrease(self._backed_off(), f"{sat.source}: KV cache {sat.kv_cache_usage:.0%} full")
        elif sat.memory_pressure:
            self._decrease(self._backed_off(), f"{sat.source}: model not fully in GPU memory")

    def set(self, limit: int, reason: str = "set by operator") -> None:
        raise LimitNotSettable(
            f"this upstream's limit is adaptive ({self.floor}..{self.ceiling}); change its bounds in the config"
        )

    def reconfigure(self, *, floor: int, ceiling: int) -> None:
        """New bounds (config reload); the current limit is clamped into them."""
        _check(floor)
        if ceiling < floor:
            raise ValueError(f"ceiling ({ceiling}) must be >= floor ({floor})")
        self.floor, self.ceiling = floor, ceiling
        clamped = min(ceiling, max(floor, self._limit))
        if clamped != self._limit:
            self._change(clamped, f"reload: bounds now {floor}..{ceiling}")

    # -- rules ----------------------------------------------------------------------------------------------

    def _observe_latency(self, rtt: float, output_tokens: int | None) -> str | None:
        """Feed one sample; a reason when the short-term latency says congestion, else ``None``."""
        if output_tokens is None or output_tokens < MIN_TOKENS:
            return None  # a reply of a few tokens (or none counted) says nothing about decoding speed
        per_token = rtt / output_tokens
        short = per_token if self._short is None else self._short + 0.25 * (per_token - self._short)
        self._short = short
        base = self._baseline
        self._baseline = short if base is None else min(short, base * 1.005)
        if self._baseline > 0 and short > self.tolerance * self._baseline:
            return (
                f"latency per output token {short * 1000:.1f} ms is {short / self._baseline:.1f}x "
                f"its baseline {self._baseline * 1000:.1f} ms"
            )
        return None

    def _queue_metric_fresh(self) -> bool:
        probe = self._last_probe
        return probe is not None and probe[1].waiting is not None and self._clock() - probe[0] <= self.probe_ttl

    def _probe_clean(self) -> bool:
        probe = self._last_probe
        if probe is None or self._clock() - probe[0] > self.probe_ttl:
            return True
        sat = probe[1]
        kv_ok = sat.kv_cache_usage is None or sat.kv_cache_usage < self.kv_high
        return not sat.waiting and kv_ok and not sat.memory_pressure and not self._backlog_seen

    def _backed_off(self) -> int:
        return max(self.floor, min(self._limit - 1, int(self._limit * self.backoff)))

    def _decrease(self, target: int, why: str, *, paced: bool = True) -> None:
        now = self._clock()
        if target >= self._limit or (paced and now - self._last_decrease < self.cooldown):
            return
        old = self._limit
        if target == self._edge:  # back to the same edge: it holds, so try leaving it less often
            self._edge_wait = min(self.max_increase_interval, self._edge_wait * 2)
        else:
            self._edge, self._edge_wait = target, self.increase_interval
        self._last_decrease = now
        self._next_increase = now + self._edge_wait
        self._change(target, f"down from {old}: {why}")

    def _increase(self) -> None:
        now = self._clock()
        if self._limit >= self.ceiling or now < self._next_increase:
            return
        self._next_increase = now + self.increase_interval
        self._change(self._limit + 1, f"up from {self._limit}: requests held back and no sign of saturation")


def build_limit(spec: LimitSpec, current: Limit | None = None) -> Limit:
    """The limit ``spec`` asks for: ``current`` reconfigured when it is of the same kind (an adaptive one keeps
    what it learnt), else a new one. The one place that turns a spec into a limit, at start and on reload."""
    if isinstance(spec, AdaptiveLimitSpec):
        if isinstance(current, AdaptiveLimit):
            current.reconfigure(floor=spec.floor, ceiling=spec.ceiling)
            return current
        return AdaptiveLimit(floor=spec.floor, ceiling=spec.ceiling)
    assert isinstance(spec, FixedLimitSpec)
    if isinstance(current, FixedLimit):
        if current.limit != spec.value:
            current.set(spec.value, "set by config reload")
        return current
    return FixedLimit(spec.value)


def _check(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
