"""How long an upstream takes to its first chunk, learnt per prompt token, for a request cut off before it.

A server reads the whole prompt before it writes anything, and llama.cpp notices a closed connection only when it
next writes: a client that hangs up during a 2,700-token prompt leaves the slot busy until the prompt is read
(5.8 s after the hang-up on the 2-core test machine, measured with the real server). So a request cut off before
its first chunk keeps its permit for the rest of the time its prompt is expected to take, not a fixed moment.

The estimate is seconds per (estimated) prompt token, from the requests' own time to first chunk. It holds the
peak and lets it decay slowly (``DECAY`` per observation): a cached prompt prefix makes a request's first chunk
come early, and an estimate that followed it down would free an abandoned uncached request's slot while the
server still reads it. ``MARGIN`` covers a server busier now than when it was learnt. Holding a permit too long
costs a moment of throughput (and only for requests cut off before their first chunk); too short breaks the cap.
"""

from __future__ import annotations

MIN_TOKENS = 64  # below this a prompt's first chunk is mostly the server's fixed latency, not its reading
DECAY = 0.97  # per observation: the peak halves over ~23 requests that came faster
MARGIN = 1.5  # expected = MARGIN x the learnt time
UNLEARNT_SECONDS = 2.0  # before any observation: what a cut-off request keeps, at most, before its first chunk


class FirstChunkEstimate:
    """Per upstream: the expected time from admission to the first chunk of a prompt of ``n`` tokens."""

    __slots__ = ("per_token",)

    def __init__(self) -> None:
        self.per_token: float | None = None

    def observe(self, prompt_tokens: int, seconds: float) -> None:
        if seconds < 0:
            return
        sample = seconds / max(prompt_tokens, MIN_TOKENS)
        current = self.per_token
        self.per_token = sample if current is None else max(sample, current * DECAY)

    def expected(self, prompt_tokens: int) -> float:
        """Seconds from admission to the first chunk (``UNLEARNT_SECONDS`` before anything was seen)."""
        if self.per_token is None:
            return UNLEARNT_SECONDS
        return MARGIN * self.per_token * max(prompt_tokens, MIN_TOKENS)
