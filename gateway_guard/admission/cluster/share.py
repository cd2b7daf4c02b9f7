"""The limit a replica's local gate enforces: the real cap while the cap is shared, at most ``allowance`` while
it is not (``link.py``: what the replica held when it lost the shared gate; 0 if it never had it). ``tokens``
is the same for the token budget: the token needs of the leases it held then (the pump grants no lease past it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from gateway_guard.admission.limit import Limit, LimitChange
from gateway_guard.admission.policy import Result
from gateway_guard.upstream.saturation import Saturation


class ShareLimit:
    """A ``Limit`` around the real one: the same cap, or at most ``allowance`` while one is set."""

    def __init__(self, inner: Limit) -> None:
        self.allowance: int | None = None
        self.tokens: int | None = None
        self._listeners: list[Callable[[int], None]] = []
        self.follow(inner)

    def follow(self, inner: Limit) -> None:
        """Wrap ``inner`` from now on (a reload replaced the limit); the old one no longer speaks for us."""
        self.inner = inner

        def changed(_new: int) -> None:
            if self.inner is inner:
                self._notify()

        inner.subscribe(changed)
        self._notify()

    @property
    def reason(self) -> str:
        if self.allowance is not None:
            return f"shared gate unavailable: keeps {self.allowance} at most; {self.inner.reason}"
        return self.inner.reason

    @reason.setter
    def reason(self, value: str) -> None:
        self.inner.reason = value

    @property
    def history(self) -> deque[LimitChange]:
        return self.inner.history

    @history.setter
    def history(self, value: deque[LimitChange]) -> None:
        self.inner.history = value

    @property
    def limit(self) -> int:
        cap = self.inner.limit
        return cap if self.allowance is None else min(cap, self.allowance)

    def restrict(self, allowance: int | None, tokens: int | None = None) -> None:
        self.tokens = None if allowance is None else tokens
        if allowance != self.allowance:
            self.allowance = allowance
            self._notify()

    def on_sample(
        self, *, rtt: float, in_flight: int, result: Result, output_tokens: int | None = None, blocked: bool = False
    ) -> None:
        self.inner.on_sample(rtt=rtt, in_flight=in_flight, result=result, output_tokens=output_tokens, blocked=blocked)

    def on_saturation(self, sat: Saturation, *, in_flight: int) -> None:
        self.inner.on_saturation(sat, in_flight=in_flight)

    def set(self, limit: int, reason: str = "set by operator") -> None:
        self.inner.set(limit, reason)

    def subscribe(self, listener: Callable[[int], None]) -> None:
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in tuple(self._listeners):
            listener(self.limit)
