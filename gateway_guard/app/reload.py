"""Live reload: on SIGHUP or ``POST /guard/reload`` (admin token) the guard re-reads its config file.

Limits, lanes, profiles, keys, rate limits, token budgets and the adaptive bounds change in place, without
dropping a request: each gate is reconfigured (queued requests keep their place and deadline, a removed lane
drains), rate buckets keep their level, a limit of the same kind keeps its state (an adaptive one its history).

The new file is read and checked whole before anything changes; an invalid one is refused with the error that
names the key, and the old config stays. What only a restart can change (the upstreams, their URLs, keys and
timeouts) is refused by name too; a new ``server.host``/``port`` is noted and ignored until the next start.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway_guard.app.asgi import is_admin
from gateway_guard.app.state import GuardState
from gateway_guard.errors import ClientError, ConfigError, Forbidden, GuardError
from gateway_guard.settings import Settings

log = logging.getLogger("gateway_guard.reload")

RESTART_ONLY = ("url", "api_key", "connect_timeout", "read_timeout")


class ConfigRefused(ClientError):
    status = 422
    code = "config_refused"


class Reloader:
    def __init__(self, state: GuardState, load: Callable[[], Settings] | None) -> None:
        self.state = state
        self._load = load
        self._lock = asyncio.Lock()

    async def reload(self) -> list[str]:
        """Read, check and apply the config; returns what changed. Raises ``ConfigError`` and changes nothing."""
        if self._load is None:
            raise ConfigError("--config", "this guard was built without a config to reload")
        async with self._lock:
            new = self._load()
            notes = check_reloadable(self.state.settings, new)
            notes += self.state.apply(new.compile())
            self.state.settings = new
        log.info("config reloaded: %s", "; ".join(notes) or "no change")
        return notes

    async def reload_logged(self) -> None:
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("config reload refused, the old config stays: %s", exc)

    def install_sighup(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload_logged()))

    def remove_sighup(self) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


def check_reloadable(old: Settings, new: Settings) -> list[str]:
    if set(new.upstreams) != set(old.upstreams):
        added = sorted(set(new.upstreams) - set(old.upstreams))
        removed = sorted(set(old.upstreams) - set(new.upstreams))
        raise ConfigError("upstreams", f"adding {added} or removing {removed} upstreams needs a restart")
    for name, up in new.upstreams.items():
        for key in RESTART_ONLY:
            if getattr(up, key) != getattr(old.upstreams[name], key):
                raise ConfigError(f"upstreams.{name}.{key}", "changes only with a restart")
    notes = []
    edge = [  # docs/edge.md: read at start
        *("max_header_bytes", "max_headers", "header_timeout", "body_timeout", "keep_alive_timeout"),
        *("max_connections", "max_idle_connections", "body_budget_bytes"),
    ]
    for key in ("host", "port", *edge):
        if getattr(new.server, key) != getattr(old.server, key):
            notes.append(f"server.{key} changes at the next start")
    return notes


async def reload_endpoint(request: Request) -> Response:
    """``POST /guard/reload`` with the admin token: re-read the config file now."""
    state: GuardState = request.app.state.guard
    reloader: Reloader = request.app.state.reloader
    try:
        if not is_admin(state.settings.server.admin_token, {k.lower(): v for k, v in request.headers.items()}):
            raise Forbidden("reloading the config needs the admin token (server.admin_token / GUARD_ADMIN_TOKEN)")
        try:
            notes = await reloader.reload()
        except ConfigError as exc:
            raise ConfigRefused(f"config refused, the old one stays: {exc}") from None
    except GuardError as error:
        return Response(error.body(), status_code=error.status, media_type="application/json")
    body: dict[str, Any] = {"reloaded": True, "changes": notes}
    return JSONResponse(body)
