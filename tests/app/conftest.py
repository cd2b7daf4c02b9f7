"""Build a guard in front of an in-process upstream: httpx.ASGITransport both ways, no sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from gateway_guard.app.factory import build_app
from gateway_guard.app.state import GuardState
from gateway_guard.settings import Settings, parse_settings


def settings_for(url: str = "http://upstream.test", **sections: Any) -> Settings:
    raw: dict[str, Any] = {"upstreams": {"default": {"url": url, "max_inflight": 2}}}
    for section, body in sections.items():
        if isinstance(body, dict) and isinstance(raw.get(section), dict):
            for k, v in body.items():
                raw[section].setdefault(k, {}).update(v) if isinstance(v, dict) else raw[section].update({k: v})
        else:
            raw[section] = body
    return parse_settings(raw)


@asynccontextmanager
async def guard_client(
    settings: Settings, upstream_app: Any = None
) -> AsyncIterator[tuple[httpx.AsyncClient, GuardState]]:
    transport = httpx.ASGITransport(app=upstream_app) if upstream_app is not None else None
    app = build_app(settings, transport=transport)
    state: GuardState = app.state.guard
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guard.test") as client:
            yield client, state
    finally:
        await state.aclose()


class EchoUpstream:
    """A real (in-process) upstream that records each request and answers with what it saw as JSON."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen = {
            "method": scope["method"],
            "path": scope["path"],
            "query": scope["query_string"].decode(),
            "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
            "body": body.decode("utf-8", "replace"),
        }
        self.requests.append({**seen, "raw_body": body})
        payload = json.dumps(seen).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"connection", b"keep-alive, x-secret-hop"),
                    (b"x-secret-hop", b"1"),
                    (b"set-cookie", b"session=alice-secret; Path=/"),
                    (b"x-upstream", b"echo"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    def header(self, index: int, name: str) -> str | None:
        for k, v in self.requests[index]["headers"]:
            if k == name:
                return str(v)
        return None
