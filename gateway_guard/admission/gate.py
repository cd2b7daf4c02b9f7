"""The in-flight gate of one upstream: a cap, priority lanes, per-profile caps, bounded queues, deadlines.

Scheduling, when a slot frees (or a request arrives):

* A lane is *eligible* while its own in-flight count is below ``limit - headroom``: ``headroom`` slots are
  kept for higher-priority lanes (batch never takes the last K slots, so an interactive request does not wait
  behind long generations).
* Inside a lane, profiles take turns (round-robin, one grant per turn) and a profile at its ``max_inflight``
  is skipped, so one profile with 40 queued requests cannot starve another with 2.
* Between eligible lanes the head with the lowest *rank* wins: ``priority - waited / aging_seconds``. A
  fresh interactive request (priority 0) beats a fresh batch one (priority 1), but a batch request that has
  waited ``aging_seconds`` ranks with new interactive ones and then ahead of them: batch is never starved.

With a ``TokenBudget`` (the upstream's ``max_context_tokens``) a grant also needs the chosen request's tokens
to fit; if they do not, nothing behind it is granted either (no overtaking, so a large request is not starved),
and a request larger than the whole budget is granted alone. The tokens come back with the permit.

A ``Permit`` is held for exactly as long as the upstream response and released once, on every path; the gate
never grants past the limit. Pure asyncio, no HTTP; time is ``loop.time()`` so tests can drive a fake clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping

from gateway_guard.admission.budget import TokenBudget, build_budget
from gateway_guard.admission.lanes import LaneQueue as _LaneQueue
from gateway_guard.admission.lanes import Waiter as _Waiter
from gateway_guard.admission.limit import Limit
from gateway_guard.admission.permit import Permit as Permit
from gateway_guard.admission.policy import LanePolicy as LanePolicy
from gateway_guard.admission.policy import ProfilePolicy as ProfilePolicy
from gateway_guard.admission.policy import Result, UpstreamPolicy
from gateway_guard.admission.view import AdmissionGate as AdmissionGate
from gateway_guard.admission.view import GateSnapshot as GateSnapshot
from gateway_guard.admission.view import SlotView as SlotView
from gateway_guard.errors import DeadlineExceeded, ProfileQueueFull, QueueFull, UnknownLane
from gateway_guard.upstream.saturation import Saturation

MAX_RETRY_AFTER = 600.0  # what Hermes honours at most


class Gate:
    """In-memory admission gate for one upstream."""

    def __init__(
        self,
        name: str,
        limit: Limit,
        lanes: Iterable[LanePolicy],
        profiles: Mapping[str, ProfilePolicy] | None = None,
        *,
        aging_seconds: float = 10.0,
        default_profile_policy: ProfilePolicy | None = None,
        budget: TokenBudget | None = None,
    ) -> None:
        self.name = name
        self._limit = limit
        self._lanes = {p.name: _LaneQueue(p) for p in lanes}
        if not self._lanes:
            raise ValueError("a gate needs at least one lane")
        self._profiles = dict(profiles or {})
        self._default_profile = default_profile_policy or ProfilePolicy()
        self._aging = aging_seconds
        self._in_flight = 0
        self._profile_in_flight: dict[str, int] = {}
        self._profile_queued: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # bound on first use; release() may run outside it
        self._mean_hold = 1.0  # EWMA of permit hold time, seconds: the base of Retry-After estimates
        self.budget = budget
        self._retired: set[str] = set()  # lanes a reload removed: they drain, new requests are refused
        self._listeners: list[Callable[[], None]] = []
        self._held: str | None = None  # the upstream is down: nothing is granted, everyone waits in line
        self._held_since = 0.0
        self._follow(limit)

    # -- public -------------------------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        return self._limit.limit

    @property
    def limit_source(self) -> Limit:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def lane_names(self) -> Iterable[str]:
        return [name for name in self._lanes if name not in self._retired]

    def watch(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` after anything that changes ``snapshot()`` (a grant, a release, a request queued or
        gone, a new limit or policy); returns the function that stops it. Nothing is spent while nobody watches."""
        self._listeners.append(listener)

        def unwatch() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unwatch

    def hold(self, reason: str) -> None:
        """Grant nothing until ``resume`` (the upstream is down or loading); queued requests keep their place
        and their deadline, new ones queue behind them."""
        if self._held is None:
            self._held_since = self._loop.time() if self._loop is not None else 0.0
        self._held = reason
        self._changed()

    def resume(self) -> None:
        if self._held is None:
            return
        self._held = None
        self._grant()
        self._changed()

    @property
    def held(self) -> str | None:
        return self._held

    def on_saturation(self, sat: Saturation) -> None:
        """A reading of the upstream's own load, for the limit (an adaptive one learns from it)."""
        self._limit.on_saturation(sat, in_flight=self._in_flight)

    def lane_policy(self, lane: str) -> LanePolicy:
        return self._lanes[lane].policy

    def queue_timeout(self, lane: str) -> float:
        return self._lane(lane).policy.queue_timeout

    async def acquire(
        self,
        lane: str,
        profile: str,
        *,
        max_wait: float | None = None,
        prompt_tokens: int = 0,
        since: float | None = None,
    ) -> Permit:
        """Wait for a permit; raise ``QueueFull``/``ProfileQueueFull`` at once or ``DeadlineExceeded`` later.

        ``prompt_tokens`` (an estimate) sizes the request for a token budget and stands in for the prompt's
        usage when the upstream does not report it. ``since`` (loop time): a request coming back to the line
        (its upstream went down before it reached it) keeps its first arrival -- its place at the head of its
        profile's line, its aging and, with ``max_wait`` counted from it, its deadline.
        """
        queue = self._lane(lane)
        loop = self._loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Permit] = loop.create_future()
        waiter = _Waiter(lane, profile, loop.time() if since is None else since, future)
        waiter.prompt_estimate = prompt_tokens
        if self.budget is not None:
            waiter.tokens = self.budget.need(profile, prompt_tokens)
        queue.push(waiter, front=since is not None)
        self._profile_queued[profile] = self._profile_queued.get(profile, 0) + 1
        self._grant()
        if future.done():
            return future.result()
        self._check_bounds(waiter, queue)
        self._changed()
        wait = queue.policy.queue_timeout if max_wait is None else max_wait
        waiter.timer = loop.call_at(waiter.enqueued_at + wait, self._expire, waiter)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()  # granted just as we were cancelled: give it back
            else:
                self._forget(waiter)
            raise

    def retry_after(self, lane: str) -> float:
        """Seconds until a new request of ``lane`` could expect a slot, from queue depth and hold time."""
        queue = self._lanes.get(lane)
        if queue is None:  # a lane a reload removed, drained just now
            return self._mean_hold
        own = queue.policy
        ahead = sum(q.count for q in self._lanes.values() if q.policy.priority <= own.priority)
        estimate = (ahead + 1) * self._mean_hold / max(1, self._lane_cap(own))
        if self._held is not None and self._loop is not None:  # down this long: likely as long again
            estimate += self._loop.time() - self._held_since
        return min(MAX_RETRY_AFTER, estimate)

    def snapshot(self) -> GateSnapshot:
        limit = self._limit.limit
        total_queued = sum(q.count for q in self._lanes.values())
        open_slots = max(0, limit - self._in_flight)
        lanes = {}
        for name, q in self._lanes.items():
            cap = self._lane_cap(q.policy)
            free = 0 if self._held else max(0, min(cap - q.in_flight, open_slots) - q.count)
            lanes[name] = SlotView(cap, q.in_flight, q.count, free)
        profiles = {}
        for name in sorted(set(self._profiles) | set(self._profile_in_flight) | set(self._profile_queued)):
            pcap = self._profile_policy(name).max_inflight
            in_flight = self._profile_in_flight.get(name, 0)
            queued = self._profile_queued.get(name, 0)
            pfree = None if pcap is None else max(0, pcap - in_flight - queued)
            profiles[name] = SlotView(pcap, in_flight, queued, pfree)
        budget = self.budget
        return GateSnapshot(
            self.name,
            limit,
            self._in_flight,
            total_queued,
            0 if self._held else max(0, open_slots - total_queued),
            lanes,
            profiles,
            tokens_in_flight=None if budget is None else budget.in_use,
            max_context_tokens=None if budget is None else budget.capacity,
            held=self._held,
        )

    def reconfigure(
        self, policy: UpstreamPolicy, *, profiles: Mapping[str, ProfilePolicy], aging_seconds: float, limit: Limit
    ) -> None:
        """A new policy (config reload). Nothing in flight or queued is dropped: queued requests keep their
        place and their deadline; a removed lane takes no new request and goes once drained; a new budget
        keeps what the old one learnt and holds; ``limit`` replaces the old one unless it is the same object."""
        new = dict(policy.lanes)
        if not new:
            raise ValueError("a gate needs at least one lane")
        for name, lane in new.items():
            if name in self._lanes:
                self._lanes[name].policy = lane
            else:
                self._lanes[name] = _LaneQueue(lane)
        self._retired = {name for name in self._lanes if name not in new}
        self._prune()
        self._profiles = dict(profiles)
        self._aging = aging_seconds
        budget = build_budget(policy.budget)
        if budget is not None and self.budget is not None:
            self.budget.capacity, self.budget.default_output = budget.capacity, budget.default_output
        else:
            self.budget = budget  # permits holding tokens of a budget now gone give back nothing
        if limit is not self._limit:
            self._limit = limit
            self._follow(limit)
        if self._loop is not None:
            self._grant()  # a higher cap or a larger budget may let waiters in now
        self._changed()

    # -- internals ----------------------------------------------------------------------------------------

    def _lane(self, lane: str) -> _LaneQueue:
        queue = self._lanes.get(lane)
        if queue is None or lane in self._retired:
            raise UnknownLane(f"unknown lane {lane!r}; lanes are: {', '.join(self.lane_names())}", lane=lane)
        return queue

    def _prune(self) -> None:
        for name in [n for n in self._retired if not self._lanes[n].count and not self._lanes[n].in_flight]:
            del self._lanes[name]
            self._retired.discard(name)

    def _changed(self) -> None:
        for listener in tuple(self._listeners):
            listener()

    def _follow(self, limit: Limit) -> None:
        def changed(_new: int) -> None:
            if self._limit is limit:  # a replaced limit no longer speaks for us
                if self._loop is not None:
                    self._grant()
                self._changed()

        limit.subscribe(changed)

    def _now(self) -> float:
        assert self._loop is not None, "the gate is bound to a loop by its first acquire"
        return self._loop.time()

    def _profile_policy(self, profile: str) -> ProfilePolicy:
        return self._profiles.get(profile, self._default_profile)

    def _lane_cap(self, policy: LanePolicy) -> int:
        return max(1, self._limit.limit - policy.headroom)

    def _check_bounds(self, waiter: _Waiter, queue: _LaneQueue) -> None:
        policy = queue.policy
        max_queued = self._profile_policy(waiter.profile).max_queued
        if max_queued is not None and self._profile_queued[waiter.profile] > max_queued:
            self._forget(waiter)
            raise ProfileQueueFull(
                f"profile {waiter.profile!r} already has {max_queued} requests queued on upstream "
                f"{self.name!r} (lane {policy.name!r}); its own limit says no",
                lane=policy.name,
                retry_after=self.retry_after(policy.name),
                status=policy.refusal_status,
            )
        if queue.count > policy.queue_size:
            self._forget(waiter)
            raise QueueFull(
                f"upstream {self.name!r} is saturated and the {policy.name!r} queue is full "
                f"({policy.queue_size} waiting)",
                lane=policy.name,
                retry_after=self.retry_after(policy.name),
                status=policy.refusal_status,
            )

    def _forget(self, waiter: _Waiter) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
        queue = self._lanes.get(waiter.lane)  # None: a lane a reload removed has drained meanwhile
        fifo = None if queue is None else queue.by_profile.get(waiter.profile)
        if queue is not None and fifo is not None and waiter in fifo:
            queue.remove(waiter)
            self._dec(self._profile_queued, waiter.profile)
            self._changed()
        if self._retired:
            self._prune()

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        waited = self._now() - waiter.enqueued_at
        self._forget(waiter)
        why = "without a free slot" if self._held is None else f"while the upstream was not ready ({self._held})"
        queue = self._lanes.get(waiter.lane)
        waiter.future.set_exception(
            DeadlineExceeded(
                f"waited {waited:.1f}s in the {waiter.lane!r} queue of upstream {self.name!r} "
                f"{why} (queue deadline passed)",
                lane=waiter.lane,
                retry_after=self.retry_after(waiter.lane),
                status=None if queue is None else queue.policy.refusal_status,
            )
        )

    def _grant(self) -> None:
        before = self._in_flight
        try:
            self._grant_while_room()
        finally:
            if self._in_flight != before:
                self._changed()

    def _grant_while_room(self) -> None:
        limit = self._limit.limit
        if self._in_flight >= limit or self._loop is None or self._held is not None:
            return  # full; or no loop yet (nobody has ever asked, nobody waits); or the upstream is down
        now = self._now()
        budget = self.budget
        while self._in_flight < limit:
            profile_ok = {p: self._profile_has_room(p) for p in self._profile_queued}
            best: tuple[float, int, _Waiter, _LaneQueue] | None = None
            for queue in self._lanes.values():
                if not queue.count or queue.in_flight >= self._lane_cap(queue.policy):
                    continue
                found = queue.next_eligible(profile_ok)
                if found is None:
                    continue
                waiter, oldest = found
                rank = queue.policy.priority - (now - oldest) / self._aging
                if best is None or (rank, queue.policy.priority) < (best[0], best[1]):
                    best = (rank, queue.policy.priority, waiter, queue)
            if best is None:
                return
            _, _, waiter, queue = best
            if budget is not None and not waiter.future.done() and not budget.fits(waiter.tokens):
                return  # the head in line waits for tokens; nobody overtakes it
            queue.pop(waiter)
            self._dec(self._profile_queued, waiter.profile)
            if waiter.timer is not None:
                waiter.timer.cancel()
            if waiter.future.done():
                continue  # its task was cancelled this turn and has not run its cleanup yet: skip it
            self._in_flight += 1
            queue.in_flight += 1
            self._profile_in_flight[waiter.profile] = self._profile_in_flight.get(waiter.profile, 0) + 1
            tokens = waiter.tokens if budget is not None else 0
            if budget is not None:
                budget.take(tokens)
            waiter.future.set_result(
                Permit(
                    self._on_release,
                    waiter.lane,
                    waiter.profile,
                    now,
                    now - waiter.enqueued_at,
                    tokens=tokens,
                    prompt_estimate=waiter.prompt_estimate,
                    budget=budget,
                )
            )

    def _profile_has_room(self, profile: str) -> bool:
        cap = self._profile_policy(profile).max_inflight
        return cap is None or self._profile_in_flight.get(profile, 0) < cap

    def _on_release(self, permit: Permit, result: Result) -> None:
        held = self._now() - permit.acquired_at
        if result is Result.SUCCESS:  # only a served request says how long the server holds a slot
            self._mean_hold += 0.2 * (held - self._mean_hold)
        in_flight = self._in_flight
        blocked = any(q.count and q.in_flight >= self._lane_cap(q.policy) for q in self._lanes.values())
        self._in_flight -= 1
        self._lanes[permit.lane].in_flight -= 1
        self._dec(self._profile_in_flight, permit.profile)
        if permit.budget is not None:
            permit.budget.give(permit.tokens)
        if self.budget is not None and result is Result.SUCCESS:
            self.budget.learn(
                permit.profile,
                prompt_estimate=permit.prompt_estimate,
                prompt_tokens=permit.prompt_tokens,
                output_tokens=permit.output_tokens,
            )
        self._limit.on_sample(
            rtt=held, in_flight=in_flight, result=result, output_tokens=permit.output_tokens, blocked=blocked
        )
        self._grant()
        if self._retired:
            self._prune()
        self._changed()

    @staticmethod
    def _dec(counts: dict[str, int], key: str) -> None:
        left = counts[key] - 1
        if left:
            counts[key] = left
        else:
            del counts[key]
