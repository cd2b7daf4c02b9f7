"""The status page: ``GET /guard/`` (and ``/guard/status``), ``GET /guard/history``, and the page's own JS/CSS.

The HTML is a server-rendered snapshot, readable without JavaScript; ``static/page.js`` draws the same markup
again from ``/guard/capacity`` (pushed by ``/guard/events`` when it answers, else polled once a second) and
``/guard/history``. Every number on the page is one of those JSON documents' values: each carries its path in
``data-k`` (``["c", ...]`` for capacity, ``["h", ...]`` for history), which is how the tests compare them.

Nothing secret is shown (no key, no upstream URL); the page only reads. ``access``: ``"open"`` (as
``/guard/capacity``), ``"token"`` (the admin token as ``Authorization: Bearer``, ``X-Guard-Admin-Token``, or a
browser's Basic auth password), ``"off"`` (404).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import time
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway_guard.app.asgi import is_admin
from gateway_guard.app.endpoints import guard_capacity
from gateway_guard.app.history import History, sample_forever
from gateway_guard.app.page_render import render_page
from gateway_guard.app.state import GuardState

ACCESS_MODES = ("open", "token", "off")
STATUS_PAGE_DEFAULT = "open"  # server.status_page: "open" | "token" | "off"
STATIC_FILES = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    # The page loads nothing from anywhere else, and says so to the browser.
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

class StatusPage:
    def __init__(
        self,
        history: History,
        read_capacity: Callable[[], Mapping[str, Any]],
        read_states: Callable[[], Mapping[str, tuple[str, str]]],
        admin_token: Callable[[], str | None],
        *,
        access: str = STATUS_PAGE_DEFAULT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if access not in ACCESS_MODES:
            raise ValueError(f"status page access must be one of {ACCESS_MODES} (got {access!r})")
        self.history = history
        self.access = access
        self._read_capacity = read_capacity
        self._read_states = read_states
        self._admin_token = admin_token
        self._clock = clock
        self._sampler: asyncio.Task[None] | None = None
        root = resources.files("gateway_guard.app") / "static"
        self._static = {name: (root / name).read_bytes() for name in STATIC_FILES}

    @classmethod
    def for_state(cls, state: GuardState, *, access: str = STATUS_PAGE_DEFAULT) -> StatusPage:
        """The page of a running guard: its capacity view, its probers' last readings, every finished request."""
        history = History()
        state.telemetry.on_finished.append(lambda record: history.observe(record, time.time()))

        def read_states() -> dict[str, tuple[str, str]]:  # what the probers last said (no call upstream)
            return {n: (p.state, p.state_detail) for n, p in state.probers.items()}

        return cls(
            history,
            lambda: guard_capacity(state),
            read_states,
            lambda: state.settings.server.admin_token,
            access=access,
        )

    def start(self) -> None:
        """Start sampling into the history (in the running loop; the guard's lifespan calls it)."""
        if self._sampler is None and self.access != "off":
            self._sampler = asyncio.create_task(
                sample_forever(self.history, self._read_capacity, self._read_states, self._clock)
            )

    async def aclose(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None

    def routes(self) -> list[Route]:
        return [
            Route("/guard", self.to_page, methods=["GET"]),
            Route("/guard/", self.page, methods=["GET"]),
            Route("/guard/status", self.page, methods=["GET"]),
            Route("/guard/history", self.history_json, methods=["GET"]),
            Route("/guard/static/{name}", self.static, methods=["GET"]),
        ]

    def _refused(self, request: Request) -> Response | None:
        if self.access == "off":
            return _error(404, "not_found", "the status page is off (server.status_page)")
        if self.access == "open":
            return None
        token = self._admin_token()
        headers = {k.lower(): v for k, v in request.headers.items()}
        if token and (is_admin(token, headers) or _basic_password_is(token, headers.get("authorization", ""))):
            return None
        response = _error(401, "unauthorized", "the status page needs the admin token (server.admin_token)")
        response.headers["www-authenticate"] = 'Basic realm="gateway_guard status", charset="UTF-8"'
        return response

    async def to_page(self, request: Request) -> Response:
        return RedirectResponse(request.scope.get("root_path", "") + "/guard/", status_code=308)

    async def page(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        now = self._clock()
        body = render_page(self._read_capacity(), self.history.as_dict(now))
        return Response(body, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    async def history_json(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        return JSONResponse(self.history.as_dict(self._clock()), headers={"cache-control": "no-store"})

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self._static or self.access == "off":
            return _error(404, "not_found", f"no static file {name!r}")
        return Response(self._static[name], media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)


def _error(status: int, code: str, message: str) -> Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return JSONResponse(body, status_code=status)


def _basic_password_is(token: str, authorization: str) -> bool:
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        _, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(password.encode(), token.encode())
