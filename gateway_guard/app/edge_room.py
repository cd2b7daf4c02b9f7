"""Which connection the edge closes when it needs room (``server.max_connections``), and how often it logs.

A connection is worth what it has shown: one that has completed a request and waits for the next (a kept-alive
client) is worth more than one that never sent a byte or has been stuck in its headers, and more than one
whose last request the edge refused for asking too often (``server.read_rate``). So past ``max_connections``
the edge closes, in this order:

1. the oldest *silent* connection (connected ``SILENT_GRACE`` ago or more, not one byte sent: a real client sends
   its request at once);
2. the oldest connection stuck in its request headers for ``HEAD_GRACE`` or more (slowloris);
3. the oldest idle connection whose last request was refused by the read rate;
4. the oldest kept-alive connection idle for ``IDLE_GRACE`` or more;

and only when there is none of these does the newcomer get a 503: a client that is using its connection right
now (idle for less than ``IDLE_GRACE`` between two requests) is worth more than a stranger. Past
``max_idle_connections`` idle ones, 3 goes first, then 4 (so a burst of idle connections may pass the limit
for up to ``IDLE_GRACE``; ``max_connections`` still bounds them all). A flood of silent, half-open or refused
connections thus recycles its own slots and leaves the kept-alive clients alone, even when a burst of answers
or of new connections comes at once.
"""

from __future__ import annotations

from typing import Protocol

from gateway_guard.app.read_limit import TokenBucket

SILENT_GRACE = 0.1  # seconds a new connection may stay silent before it can be closed to make room
HEAD_GRACE = 1.0  # seconds a request's headers may take before the connection can be closed to make room
IDLE_GRACE = 1.0  # seconds a kept-alive connection may be idle before it can be closed to make room


class Droppable(Protocol):
    def drop(self, reason: str) -> None: ...


class LogBudget:
    """At most ``burst`` refusal lines at once and ``rate`` a second after that, so an attack cannot fill the
    disk through the log; the next line that is written says how many were left out."""

    __slots__ = ("bucket", "left_out")

    def __init__(self, rate: float = 10.0, burst: float = 50.0) -> None:
        self.bucket = TokenBucket(rate, burst)
        self.left_out = 0

    def take(self, now: float) -> bool:
        if not self.bucket.take(now):
            return True
        self.left_out += 1
        return False


class Room:
    """One server's connections that hold no request in progress, oldest first (dicts keep insertion order):
    ``fresh`` (connected, silent), ``heads`` (a request's headers arriving), ``refused`` (idle after a read the
    edge refused), ``waiting`` (idle after a request that was served); the last two together at most
    ``max_idle_connections``."""

    __slots__ = ("bodies_due", "closing", "fresh", "heads", "log_budget", "refused", "waiting")

    def __init__(self) -> None:
        self.fresh: dict[Droppable, float] = {}  # -> when it connected (loop time)
        self.heads: dict[Droppable, float] = {}  # -> when its request's first byte came
        self.refused: dict[Droppable, None] = {}
        self.waiting: dict[Droppable, float] = {}  # -> since when
        self.closing = 0  # connections the guard has closed that have not yet been reported lost
        self.bodies_due = 0  # bytes of declared request bodies accepted but not yet arrived (app/edge.py)
        self.log_budget = LogBudget()

    def discard(self, conn: Droppable) -> None:
        self.fresh.pop(conn, None)
        self.heads.pop(conn, None)
        self.refused.pop(conn, None)
        self.waiting.pop(conn, None)

    def busy(self, conn: Droppable) -> None:
        """Its bytes came: it is no longer silent nor idle."""
        self.fresh.pop(conn, None)
        self.refused.pop(conn, None)
        self.waiting.pop(conn, None)

    def add_idle(self, conn: Droppable, limit: int, now: float, *, refused: bool = False) -> None:
        if refused:
            self.refused[conn] = None
        else:
            self.waiting[conn] = now
        while len(self.waiting) + len(self.refused) > limit and self._close_idle(now, "server.max_idle_connections"):
            pass

    def make_room(self, now: float) -> bool:
        """Close the least valuable connection (see the module's doc); False if every one is busy or new."""
        for pool, grace, why in (
            (self.fresh, SILENT_GRACE, "silent"),
            (self.heads, HEAD_GRACE, "still sending its request headers"),
        ):
            if pool:
                oldest, since = next(iter(pool.items()))
                if now - since >= grace:
                    del pool[oldest]
                    oldest.drop(f"over server.max_connections: the oldest {why} connection is closed")
                    return True
        return self._close_idle(now, "server.max_connections")

    def _close_idle(self, now: float, limit: str) -> bool:
        if self.refused:
            oldest = next(iter(self.refused))
            del self.refused[oldest]
            oldest.drop(f"over {limit}: the oldest idle connection refused for its read rate is closed")
            return True
        if self.waiting:
            oldest, since = next(iter(self.waiting.items()))
            if now - since >= IDLE_GRACE:
                del self.waiting[oldest]
                oldest.drop(f"over {limit}: the oldest idle keep-alive connection is closed")
                return True
        return False
