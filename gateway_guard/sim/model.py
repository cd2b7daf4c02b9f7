"""A pure-asyncio model of one GPU inference server: slots, a FIFO queue, prefill, and token rates.

What it imitates (FACTS.md, llama.cpp measured on these machines): ``slots`` requests decode at once; more wait
in an unbounded queue (``deferred``), never rejected. A request alone decodes at ``tokens_per_second``; with
``n`` decoding together each one slows by ``1 + batch_slowdown * (n - 1)``, so aggregate throughput grows
sub-linearly up to the slot count and then stays flat: past it, only latency grows.

No HTTP here; ``sleep`` is injectable so tests can drive time themselves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, get_args

Mode = Literal["generate", "scripted", "zero"]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """How the simulated server behaves; validated once, errors name the key.

    mode: ``generate`` (GPU-like delays), ``scripted`` (delays, and answers Hermes kanban workers with a
    ``kanban_complete`` tool call), ``zero`` (no delays, no slot limit: for measuring proxy overhead).
    context_length: the window reported to clients (Hermes refuses one under 64K) and enforced on prompts.
    steps, tool_seconds (scripted): a card takes ``steps`` tool-calling turns, the last ``kanban_complete``,
    the ones before it ``kanban_show``, ``terminal`` (``sleep tool_seconds``) and ``kanban_comment`` in turn.
    ollama: serve the Ollama emulation (``/api/*``). Clients such as Hermes probe ``GET /api/tags`` to tell
    Ollama from llama.cpp; with ``ollama=False`` those routes answer 404 as llama.cpp does.
    """

    model_id: str = "sim"
    mode: Mode = "generate"
    slots: int = 4
    tokens_per_second: float = 50.0
    ttft: float = 0.05
    batch_slowdown: float = 0.25
    max_output_tokens: int = 64
    embedding_dim: int = 16
    context_length: int = 131072
    ollama: bool = True
    steps: int = 1
    tool_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in get_args(Mode):
            raise ValueError(f"mode: {self.mode!r} is not one of {', '.join(get_args(Mode))}")
        if not self.model_id:
            raise ValueError("model_id: must not be empty")
        for key in ("slots", "max_output_tokens", "embedding_dim", "context_length", "steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)!r}")
        if not self.tokens_per_second > 0:
            raise ValueError(f"tokens_per_second: must be > 0, got {self.tokens_per_second!r}")
        for key in ("ttft", "batch_slowdown", "tool_seconds"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class GpuStats:
    """A snapshot; names follow llama.cpp's /metrics where it has one."""

    slots: int
    requests_processing: int
    requests_deferred: int
    max_concurrent_seen: int
    requests_total: int
    requests_abandoned_total: int
    prompt_tokens_total: int
    tokens_predicted_total: int

    @property
    def in_flight(self) -> int:
        return self.requests_processing + self.requests_deferred


class Gpu:
    """Slots and counters shared by every request of one simulated server.

    ``max_concurrent_seen`` is the most requests ever held at once (processing + deferred): what a proxy in
    front let through. A request that ends before its last token (client gone, task cancelled) counts in
    ``requests_abandoned_total`` and frees its slot at once.
    """

    def __init__(self, config: SimConfig, *, sleep: Sleep = asyncio.sleep) -> None:
        self.config = config
        self._sleep = sleep
        self._zero = config.mode == "zero"
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._processing = 0
        self._max_seen = 0
        self._requests = 0
        self._abandoned = 0
        self._prompt_tokens = 0
        self._predicted = 0
        self._changed = asyncio.Event()

    def stats(self) -> GpuStats:
        return GpuStats(
            slots=self.config.slots,
            requests_processing=self._processing,
            requests_deferred=len(self._waiters),
            max_concurrent_seen=self._max_seen,
            requests_total=self._requests,
            requests_abandoned_total=self._abandoned,
            prompt_tokens_total=self._prompt_tokens,
            tokens_predicted_total=self._predicted,
        )

    async def wait_until(self, predicate: Callable[[GpuStats], bool]) -> GpuStats:
        """Return the first snapshot (now or after a later change) for which ``predicate`` holds."""
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            await self._changed.wait()

    def token_interval(self, processing: int) -> float:
        """Seconds per token for one request while ``processing`` requests decode together."""
        return (1.0 + self.config.batch_slowdown * max(processing - 1, 0)) / self.config.tokens_per_second

    async def generate(self, prompt_tokens: int, output_tokens: int) -> AsyncGenerator[int, None]:
        """Wait for a slot, prefill (``ttft``), then yield token indices 0..output_tokens-1 at the batch rate.

        Use as ``async with contextlib.aclosing(gpu.generate(...)) as tokens`` so an early exit frees the slot
        at once.
        """
        await self._enter()
        done = False
        try:
            if self.config.ttft and not self._zero:
                await self._sleep(self.config.ttft)
            self._prompt_tokens += prompt_tokens
            for i in range(output_tokens):
                if i and not self._zero:
                    await self._sleep(self.token_interval(self._processing))
                self._predicted += 1
                yield i
            done = True
        finally:
            self._leave(abandoned=not done)

    async def embed(self, prompt_tokens: int) -> None:
        """An embedding request: holds a slot but costs no simulated time."""
        await self._enter()
        self._prompt_tokens += prompt_tokens
        self._leave(abandoned=False)

    async def _enter(self) -> None:
        self._requests += 1
        if self._zero or (self._processing < self.config.slots and not self._waiters):
            self._processing += 1
            self._notify()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._notify()
        try:
            await waiter  # a leaving request hands its slot over: _processing already counts us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._leave(abandoned=True)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                self._abandoned += 1
                self._notify()
            raise

    def _leave(self, *, abandoned: bool) -> None:
        if abandoned:
            self._abandoned += 1
        while self._waiters and not self._zero:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._notify()
                return
        self._processing -= 1
        self._notify()

    def _notify(self) -> None:
        self._max_seen = max(self._max_seen, self._processing + len(self._waiters))
        self._changed.set()
        self._changed = asyncio.Event()
