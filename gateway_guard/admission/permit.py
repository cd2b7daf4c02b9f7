"""One slot granted by a gate: held for exactly as long as the upstream response, released once on every path.

The proxy never holds a ``Permit`` itself: ``admission/ticket.py`` wraps it, charges what the request used and
releases it with how the request ended (``Result``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway_guard.admission.policy import Result

if TYPE_CHECKING:
    from gateway_guard.admission.budget import TokenBudget


class Permit:
    """One admitted request. ``release()`` is idempotent; the first call's ``result`` is the one that counts."""

    __slots__ = (
        "_on_release",
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
    )

    def __init__(
        self,
        on_release: Callable[[Permit, Result], None],
        lane: str,
        profile: str,
        acquired_at: float,
        queue_wait: float,
        *,
        tokens: int = 0,
        prompt_estimate: int = 0,
        budget: TokenBudget | None = None,
    ) -> None:
        self._on_release = on_release
        self._released = False
        self.lane = lane
        self.profile = profile
        self.acquired_at = acquired_at
        self.queue_wait = queue_wait
        self.tokens = tokens  # held from ``budget`` (the gate's at the grant; a reload may since have replaced it)
        self.budget = budget
        self.prompt_estimate = prompt_estimate
        self.prompt_tokens: int | None = None
        self.output_tokens: int | None = None

    def report_usage(self, *, prompt_tokens: int | None, output_tokens: int | None) -> None:
        """What the response showed (before release): feeds the token budget's estimates and the limit."""
        self.prompt_tokens, self.output_tokens = prompt_tokens, output_tokens

    @property
    def tokens_used(self) -> int:
        """Prompt + output tokens as reported, the prompt estimate standing in for an unreported prompt."""
        prompt = self.prompt_tokens if self.prompt_tokens is not None else self.prompt_estimate
        return prompt + (self.output_tokens or 0)

    @property
    def released(self) -> bool:
        return self._released

    def release(self, result: Result = Result.SUCCESS) -> None:
        if self._released:
            return
        self._released = True
        self._on_release(self, result)
