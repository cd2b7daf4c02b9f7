"""One admitted request, from its turn at the gate to its end: ``async with admission.enter(...) as ticket``.

``Admission.enter`` applies the rate limits, then waits for a slot at the upstream's gate, both inside the lane's
one queue deadline. The ``Ticket`` it yields is finished exactly once, with how the request ended (``Result``)
and what it used (``Usage``): that charges the token rates, teaches the budget, the limit and the hold-time
estimate, and releases the slot. Leaving the ``async with`` without ``finish`` finishes it from the exception:

* the request never reached the server (``UpstreamUnavailable``: connect refused, pooled connection gone before
  the write): ``IGNORED``, released at once;
* it was cut off after reaching the server (the client left, the upstream timed out or failed mid-way):
  ``IGNORED`` (client) or ``DROPPED`` (upstream), released a grace later, so the cap holds as the server sees
  it while the server notices the closed connection. llama.cpp notices when it next writes a token, so the grace
  is ``ABORT_GRACE_SECONDS`` or three of the request's own gaps between chunks, whichever is longer (a loaded
  server decodes slower), at most ``MAX_GRACE_SECONDS``. Cut off before its first chunk, the server is still
  reading the prompt and writes nothing until it is read: the grace is then what is left of the time this
  upstream is expected to take to a first chunk for a prompt this long (``first_chunk.py``), at most
  ``MAX_FIRST_CHUNK_GRACE_SECONDS``. The timer always fires: no permit leaks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

from gateway_guard.admission.first_chunk import FirstChunkEstimate
from gateway_guard.admission.gate import AdmissionGate, Permit
from gateway_guard.admission.policy import Result
from gateway_guard.admission.rate import RateLimiter
from gateway_guard.admission.reservations import Reservations
from gateway_guard.errors import UpstreamError, UpstreamUnavailable

# How long a cut-off request keeps its slot after the guard closed the upstream connection (llama.cpp frees a
# streamed request's slot ~20 ms after its client goes away).
ABORT_GRACE_SECONDS = 0.1
MAX_GRACE_SECONDS = 2.0
MAX_FIRST_CHUNK_GRACE_SECONDS = 60.0  # a prompt the server reads for longer than this frees its slot earlier
GAPS = 3.0  # chunk gaps the server may take to notice a closed connection


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens as the upstream reported them (or the guard counted); ``None``: not known."""

    prompt_tokens: int | None = None
    output_tokens: int | None = None


class Ticket:
    __slots__ = (
        "_admitted",
        "_finished",
        "_first_chunk",
        "_gap",
        "_last_chunk",
        "_loop",
        "_permit",
        "_prompt_tokens",
        "_rates",
        "usage",
    )

    def __init__(
        self, permit: Permit, rates: RateLimiter, first_chunk: FirstChunkEstimate | None = None, prompt_tokens: int = 0
    ) -> None:
        self._permit = permit
        self._rates = rates
        self._finished = False
        self.usage = Usage()  # what the response showed so far; the proxy updates it as it relays
        self._loop = asyncio.get_running_loop()
        self._admitted = self._loop.time()
        self._first_chunk = first_chunk or FirstChunkEstimate()
        self._prompt_tokens = prompt_tokens
        self._last_chunk: float | None = None
        self._gap = 0.0  # EWMA of the time between the answer's chunks (~ the server's time per token)

    def chunk_arrived(self) -> None:
        """A chunk of the answer arrived: teaches the upstream's time to a first chunk, and the gaps between chunks,
        for the grace of a cut-off request."""
        now = self._loop.time()
        last, self._last_chunk = self._last_chunk, now
        if last is None:
            self._first_chunk.observe(self._prompt_tokens, now - self._admitted)
        else:
            self._gap += 0.3 * (now - last - self._gap)

    @property
    def grace(self) -> float:
        """How long the server may still hold this request's slot after the guard closed its connection."""
        if self._last_chunk is None:  # still reading the prompt: it notices once it is read
            left = self._first_chunk.expected(self._prompt_tokens) - (self._loop.time() - self._admitted)
            return min(MAX_FIRST_CHUNK_GRACE_SECONDS, max(ABORT_GRACE_SECONDS, left + ABORT_GRACE_SECONDS))
        return min(MAX_GRACE_SECONDS, max(ABORT_GRACE_SECONDS, GAPS * self._gap))

    @property
    def lane(self) -> str:
        return self._permit.lane

    @property
    def profile(self) -> str:
        return self._permit.profile

    @property
    def queue_wait(self) -> float:
        return self._permit.queue_wait

    @property
    def finished(self) -> bool:
        return self._finished

    def finish(self, result: Result, usage: Usage | None = None, *, reached_server: bool = True) -> None:
        """End the request (idempotent: the first call counts). ``reached_server`` and not ``SUCCESS``: the slot
        is held a moment longer, until the server has let go of it."""
        if self._finished:
            return
        self._finished = True
        usage = usage or self.usage
        permit = self._permit
        permit.report_usage(prompt_tokens=usage.prompt_tokens, output_tokens=usage.output_tokens)
        self._rates.charge(permit.lane, permit.profile, permit.tokens_used)
        if result is Result.SUCCESS or not reached_server:
            permit.release(result)
        else:
            asyncio.get_running_loop().call_later(self.grace, permit.release, result)

    def finish_from(self, exc: BaseException | None) -> None:
        if exc is None:
            self.finish(Result.SUCCESS)
        elif isinstance(exc, UpstreamUnavailable):
            self.finish(Result.IGNORED, reached_server=False)
        elif isinstance(exc, UpstreamError):
            self.finish(Result.DROPPED)
        else:  # the client left, the task was cancelled
            self.finish(Result.IGNORED)


class Admission:
    """The guard's doors: one gate per upstream and the rate limits shared by all of them."""

    def __init__(
        self, gates: Mapping[str, AdmissionGate], rates: RateLimiter, reservations: Reservations | None = None
    ) -> None:
        self.gates = gates
        self.rates = rates
        self.reservations = reservations
        self.first_chunk: dict[str, FirstChunkEstimate] = {}  # per upstream, learnt from its requests

    @asynccontextmanager
    async def enter(
        self, upstream: str, lane: str, profile: str, *, prompt_tokens: int = 0, since: float | None = None
    ) -> AsyncIterator[Ticket]:
        """``since`` (loop time): a request coming back to the line keeps its first arrival (place, aging,
        deadline) and is not counted against the request rates a second time."""
        gate = self.gates[upstream]
        if since is not None:
            permit = await gate.acquire(lane, profile, prompt_tokens=prompt_tokens, since=since)
        else:
            permit = await self._admit(gate, lane, profile, prompt_tokens)
        if self.reservations is not None:  # a dispatcher booked this slot for this profile's worker
            self.reservations.consume(upstream, profile)
        first_chunk = self.first_chunk.get(upstream)
        if first_chunk is None:
            first_chunk = self.first_chunk[upstream] = FirstChunkEstimate()
        ticket = Ticket(permit, self.rates, first_chunk, prompt_tokens)
        try:
            yield ticket
        except BaseException as exc:
            ticket.finish_from(exc)
            raise
        ticket.finish_from(None)

    async def _admit(self, gate: AdmissionGate, lane: str, profile: str, prompt_tokens: int) -> Permit:
        """Rate limits first, then a slot: both inside the lane's one queue deadline."""
        rates = self.rates
        if not rates.active:
            return await gate.acquire(lane, profile, prompt_tokens=prompt_tokens)
        timeout = gate.queue_timeout(lane)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await rates.admit(lane, profile, max_wait=timeout)
        waited = loop.time() - started
        permit = await gate.acquire(lane, profile, max_wait=max(0.0, timeout - waited), prompt_tokens=prompt_tokens)
        permit.queue_wait += waited
        return permit
