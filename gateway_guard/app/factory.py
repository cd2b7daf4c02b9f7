"""Builds the Starlette application: the guard's endpoints under /guard, /metrics, and the proxy for the rest."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.routing import Route

from gateway_guard.app import endpoints
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

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for up in settings.upstreams.values():
            log.info("upstream %s -> %s, max_inflight=%d", up.name, up.url, up.max_inflight)
        state.start()
        try:
            yield
        finally:
            await state.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    routes = [
        Route("/guard/capacity", endpoints.capacity, methods=["GET"]),
        Route("/guard/health", endpoints.health, methods=["GET"]),
        Route("/guard/ready", endpoints.ready, methods=["GET"]),
        Route("/guard/upstreams/{name}/limit", endpoints.set_limit, methods=["POST"]),
        Route("/guard/reload", reload_endpoint, methods=["POST"]),
        Route("/metrics", endpoints.metrics, methods=["GET"]),
        Route("/{path:path}", proxy, methods=methods),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.guard = state
    app.state.reloader = Reloader(state, reload_from)
    return app
