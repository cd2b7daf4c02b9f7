"""The proxy: pure ASGI (no BaseHTTPMiddleware), one permit per generation request, held for the whole stream.

Flow: classify (key / path / headers) -> read the body under a size limit -> check it is JSON -> pick the
upstream -> enter admission (unless the call uses no GPU) -> forward -> relay bytes as they arrive. A client
that disconnects at any point cancels the wait or closes the upstream connection at once; the ticket
(``admission/ticket.py``) releases the slot once the server has let go of it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from gateway_guard.admission.budget import estimate_prompt_tokens
from gateway_guard.app.asgi import (
    BodyBudget,
    ClientDisconnected,
    DisconnectWatch,
    Receive,
    Scope,
    Send,
    header_list,
    is_admin,
    read_body,
    send_error,
)
from gateway_guard.app.body import read_request
from gateway_guard.app.paths import encoded, is_admin_only, is_proxied, needs_permit, request_path
from gateway_guard.app.relay import SendTracker, UpstreamLoading, forward
from gateway_guard.app.state import GuardState
from gateway_guard.errors import (
    Forbidden,
    GuardError,
    NotFound,
    Outcome,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway_guard.telemetry import RequestRecord
from gateway_guard.upstream.client import Upstream
from gateway_guard.upstream.errors import UpstreamProtocolError
from gateway_guard.upstream.probe import DOWN, LOADING, UP, Prober

RETRY_PAUSE, RETRY_PAUSE_MAX = 0.05, 2.0
log = logging.getLogger("gateway_guard.proxy")


class UpstreamWentAway(UpstreamUnavailable):
    """The server closed the connection before answering and its health check says it is gone: a restart lost
    the request's work, so sending it again costs the GPU nothing twice."""

    code = "upstream_went_away"


def _lost(exc: UpstreamError) -> bool:
    """The connection closed or reset after the request was written -- before the answer's first byte
    (``UpstreamClosedEarly``) or in the middle of an answer the client has not seen yet (a non-streamed request
    asked as a stream and being assembled) -- rather than refused, timed out or answered wrongly."""
    return not isinstance(exc, UpstreamUnavailable | UpstreamTimeout | UpstreamProtocolError)


async def _went_away(prober: Prober) -> bool:
    state, detail = await prober.health()
    if state == UP:
        return False
    prober.report(state, detail)
    return True


class ProxyHandler:
    def __init__(self, state: GuardState) -> None:
        self.state = state
        self.bodies = BodyBudget(state.settings.server.body_budget_bytes)  # restart to change

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = RequestRecord(method=scope["method"], path=scope["path"])
        self.state.telemetry.request_started(record, scope["headers"])
        started = record.started
        sent = SendTracker(send)
        metered = self.bodies.metered(receive)  # bodies read count against server.body_budget_bytes until the end
        try:
            await self._handle(scope, metered, sent, record)
        except ClientDisconnected:
            record.outcome = Outcome.CLIENT_GONE
            record.status = record.status or 499
        except GuardError as error:
            record.outcome, record.error = error.outcome, error.message
            if not sent.started:
                record.status = error.status
                await send_error(send, error, {"x-guard-lane": record.lane} if record.lane else None)
            elif not sent.ended:  # cut after the answer began: end the body cleanly
                await sent.body(b"", more=False)
        finally:
            metered.release()
            record.duration = time.perf_counter() - started
            self.state.telemetry.request_finished(record)

    async def _handle(self, scope: Scope, receive: Receive, send: SendTracker, record: RequestRecord) -> None:
        state = self.state
        headers = header_list(scope)
        hmap = dict(headers)
        cls = state.classifier.classify(request_path(scope), hmap)  # a strict path, else 400 (app/paths.py)
        record.lane, record.profile, record.path = cls.lane, cls.profile, encoded(cls.path)  # forwarded as checked
        if not is_proxied(cls.path):
            raise NotFound(f"no route for {cls.path!r}: the guard forwards /v1/* and /api/* only")
        if is_admin_only(cls.path) and not is_admin(state.settings.server.admin_token, hmap):
            raise Forbidden(f"{cls.path} changes the upstream's models and needs the guard's admin token")
        body = await read_body(receive, state.settings.server.max_body_bytes, hmap.get("content-length"))
        record.model, payload = read_request(scope["method"], cls.path, body, hmap.get("content-type", ""))
        upstream = state.upstreams[state.classifier.upstream_for(cls.profile, record.model)]
        record.upstream = upstream.name
        with DisconnectWatch(receive):
            if not needs_permit(scope["method"], cls.path):
                await forward(state.telemetry, scope, upstream, headers, body, send, record, None)
                return
            record.queue_entered = time.perf_counter()
            prompt = estimate_prompt_tokens(body)
            await self._admitted(scope, upstream, headers, (body, payload), send, record, prompt)

    async def _admitted(
        self,
        scope: Scope,
        upstream: Upstream,
        headers: list[tuple[str, str]],
        request: tuple[bytes, dict[str, Any] | None],
        send: SendTracker,
        record: RequestRecord,
        prompt: int,
    ) -> None:
        """Enter admission, forward, relay. An upstream that is down or restarting before the client saw a byte
        does not cost the request: it goes back to its lane (same place, same deadline) until the server is
        back -- the gate is held meanwhile -- and is sent again only when the server never worked on it or is
        gone (a restart loses what it was doing)."""
        state = self.state
        body, payload = request  # the bytes and, for a JSON POST, the same parsed (app/body.py)
        prober = state.probers[upstream.name]
        lane, profile = record.lane or "", record.profile or ""
        since: float | None = None
        arrived = asyncio.get_running_loop().time()
        for attempt in itertools.count():
            try:
                async with state.admission.enter(upstream.name, lane, profile, prompt_tokens=prompt, since=since) as t:
                    record.queue_wait = t.queue_wait
                    record.outcome = Outcome.ADMITTED
                    try:
                        await forward(state.telemetry, scope, upstream, headers, body, send, record, t, payload)
                    except UpstreamError as exc:  # the connection was lost: a restart, or a broken server?
                        if not _lost(exc) or send.started or not await _went_away(prober):
                            raise
                        raise UpstreamWentAway(f"upstream {upstream.name!r} went away: {exc.message}") from exc
                return
            except UpstreamUnavailable as exc:
                if send.started:
                    raise
                prober.report(LOADING if isinstance(exc, UpstreamLoading) else DOWN, exc.message)
                since = arrived
                log.info("%s %s goes back to its %r line: %s", scope["method"], record.path, lane, exc.message)
                if attempt:  # the server keeps refusing while its health check says up: do not spin
                    await asyncio.sleep(min(RETRY_PAUSE_MAX, RETRY_PAUSE * 2**attempt))
