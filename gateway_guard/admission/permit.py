"""One admitted request: held for exactly as long as the upstream response, released once on every path."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from gateway_guard.errors import UpstreamTimeout

if TYPE_CHECKING:
    from gateway_guard.admission.budget import TokenBudget
    from gateway_guard.admission.gate import Gate


class Permit:
    """One admitted request. ``release()`` is idempotent; ``async with permit:`` releases on every path."""

    __slots__ = (
        "_gate",
        "_released",
        "acquired_at",
        "budget",
        "lane",
        "output_tokens",
        "profile",
        "prompt_estimate",
        "prompt_tokens",
        "queue_wait",
        "tokens",
        "ttft",
    )

    def __init__(
        self,
        gate: Gate,
        lane: str,
        profile: str,
        acquired_at: float,
        queue_wait: float,
        *,
        tokens: int = 0,
        prompt_estimate: int = 0,
        budget: TokenBudget | None = None,
    ) -> None:
        self._gate = gate
        self._released = False
        self.lane = lane
        self.profile = profile
        self.acquired_at = acquired_at
        self.queue_wait = queue_wait
        self.tokens = tokens  # held from ``budget`` (the gate's at the grant; a reload may since have replaced it)
        self.budget = budget
        self.prompt_estimate = prompt_estimate
        self.ttft: float | None = None
        self.prompt_tokens: int | None = None
        self.output_tokens: int | None = None

    def report_usage(self, *, ttft: float | None, prompt_tokens: int | None, output_tokens: int | None) -> None:
        """What the response showed (before release): feeds the token budget's estimates and the limit."""
        self.ttft, self.prompt_tokens, self.output_tokens = ttft, prompt_tokens, output_tokens

    @property
    def tokens_used(self) -> int:
        """Prompt + output tokens as reported, the prompt estimate standing in for an unreported prompt."""
        prompt = self.prompt_tokens if self.prompt_tokens is not None else self.prompt_estimate
        return prompt + (self.output_tokens or 0)

    @property
    def released(self) -> bool:
        return self._released

    def release(self, *, dropped: bool = False) -> None:
        if self._released:
            return
        self._released = True
        self._gate._on_release(self, dropped=dropped)

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # a drop is the upstream timing out (overload), not a client that left or a server that is down
        self.release(dropped=exc_type is not None and issubclass(exc_type, UpstreamTimeout))
