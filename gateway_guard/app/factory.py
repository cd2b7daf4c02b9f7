"""Builds the Starlette application: the guard's endpoints under /guard, /metrics, and the proxy for the rest."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.routing import Route

from gateway_guard.app import endpoints, events
from gateway_guard.app.page import StatusPage
from gateway_guard.app.proxy import ProxyHandler
from gateway_guard.app.reload import Reloader, reload_endpoint
from gateway_guard.app.state import GuardState
from gateway_guard.settings import Settings

log = logging.getLogger("gateway_guard")


def build_app(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    reload_from: Callable[[], Settings] | None = None,
) -> Starlette:
    """``reload_from`` reads the config again (file + environment + flags) for SIGHUP / ``POST /guard/reload``."""
    state = GuardState.build(settings, transport=transport)
    proxy = ProxyHandler(state)
    event_routes, reservations, hub = events.mount(state)
    status_page = StatusPage.for_state(state, access=settings.server.status_page)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for up in settings.upstreams.values():
            log.info("upstream %s -> %s, max_inflight=%d", up.name, up.url, up.max_inflight)
        state.start()
        status_page.start()
        hub.close_on_exit_signals()  # open /guard/events streams end at once on SIGTERM
        try:
            yield
        finally:
            hub.close()
            await status_page.aclose()
            await state.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    routes = [
        *status_page.routes(),
        Route("/guard/capacity", endpoints.capacity, methods=["GET"]),
        Route("/guard/health", endpoints.health, methods=["GET"]),
        Route("/guard/ready", endpoints.ready, methods=["GET"]),
        Route("/guard/upstreams/{name}/limit", endpoints.set_limit, methods=["POST"]),
        Route("/guard/reload", reload_endpoint, methods=["POST"]),
        Route("/metrics", endpoints.metrics, methods=["GET"]),
        *event_routes,
        Route("/{path:path}", proxy, methods=methods),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.guard = state
    app.state.status_page = status_page
    app.state.reloader = Reloader(state, reload_from)
    app.state.body_budget = proxy.bodies  # the edge refuses a declared body that cannot fit (app/edge.py)
    app.state.reservations = reservations  # the proxy consumes one per admitted request of its profile
    app.state.events = hub
    return app
