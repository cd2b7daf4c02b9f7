"""A cap on the context tokens in flight on one upstream (its KV cache), beside the cap on requests.

A request's *need* is its prompt estimate plus an output estimate for its profile:

* **Prompt**: the request body's size in bytes / 4 (``estimate_prompt_tokens``: messages, prompt and tools
  are nearly all of a chat body, and JSON's quotes and keys are few beside them), times a per-profile
  correction learnt from the prompt tokens the upstream then reports (EWMA of actual / estimated, kept within
  0.05..4). No parsing on the hot path; a profile's requests look alike, so the correction converges fast.
* **Output**: an EWMA of the completion tokens of the profile's past requests (``default_output`` until the
  first one ends). Never ``max_tokens``: Hermes sends 65536 on every call (FACTS.md).

The gate checks ``fits(need)`` when it would grant a slot, and gives the tokens back with the permit. A request
larger than the whole budget is admitted when nothing else holds tokens (alone), so nothing waits forever.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway_guard.admission.policy import BudgetSpec

ALPHA = 0.2
RATIO_BOUNDS = (0.05, 4.0)


def estimate_prompt_tokens(body: bytes) -> int:
    return (len(body) + 3) // 4


@dataclass(slots=True)
class _Learnt:
    output: float
    prompt_ratio: float = 1.0


class TokenBudget:
    __slots__ = ("_learnt", "capacity", "default_output", "in_use", "shared")

    def __init__(self, capacity: int, *, default_output: int = 512) -> None:
        if capacity < 1:
            raise ValueError(f"token budget must be >= 1, got {capacity}")
        self.capacity = capacity
        self.default_output = default_output
        self.in_use = 0
        self.shared = False  # the budget is checked elsewhere (the shared gate, in Redis): here it only sizes
        self._learnt: dict[str, _Learnt] = {}

    def need(self, profile: str, prompt_estimate: int) -> int:
        """At least 1: every request holds some context, so "nothing holds tokens" means "nothing in flight"."""
        learnt = self._learnt.get(profile)
        if learnt is None:
            return max(1, prompt_estimate + self.default_output)
        return max(1, round(prompt_estimate * learnt.prompt_ratio + learnt.output))

    def output_estimate(self, profile: str) -> float:
        learnt = self._learnt.get(profile)
        return self.default_output if learnt is None else learnt.output

    def fits(self, tokens: int) -> bool:
        return self.shared or self.in_use == 0 or self.in_use + tokens <= self.capacity

    def take(self, tokens: int) -> None:
        self.in_use += tokens

    def give(self, tokens: int) -> None:
        self.in_use -= tokens

    def learn(
        self, profile: str, *, prompt_estimate: int, prompt_tokens: int | None, output_tokens: int | None
    ) -> None:
        """What a finished request really used (either count may be unknown)."""
        learnt = self._learnt.get(profile)
        if learnt is None:
            first = self.default_output if output_tokens is None else output_tokens
            learnt = self._learnt[profile] = _Learnt(output=float(first))
        elif output_tokens is not None:
            learnt.output += ALPHA * (output_tokens - learnt.output)
        if prompt_tokens and prompt_estimate > 0:
            ratio = min(RATIO_BOUNDS[1], max(RATIO_BOUNDS[0], prompt_tokens / prompt_estimate))
            learnt.prompt_ratio += ALPHA * (ratio - learnt.prompt_ratio)


def build_budget(spec: BudgetSpec | None) -> TokenBudget | None:
    if spec is None:
        return None
    return TokenBudget(spec.max_context_tokens, default_output=spec.default_output_tokens)
