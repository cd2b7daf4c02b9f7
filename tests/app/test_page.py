"""The status page without JavaScript: the server-rendered HTML shows the same numbers as the JSON endpoints.

Driven in-process through httpx.ASGITransport, in front of an in-process upstream that holds requests until
told to answer (so the guard has requests in flight and queued while the page is read).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from gateway_guard.app.history import History
from gateway_guard.app.page import StatusPage
from gateway_guard.app.page_render import render_page
from tests.app.conftest import guard_client, settings_for
from tests.support.status_page import mismatches, page_values, shown_at

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
SECRETS = ("upstream.test", "sk-upstream-secret", "sk-guard-alpha", "sk-guard-chat")


class HoldUpstream:
    """Answers a chat completion with usage (5 + 7 tokens); a body that says "hold" waits for ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = 0

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if b"hold" in body:
            self.holding += 1
            await self.release.wait()
        reply = {
            "id": "x",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(reply).encode()})


def held_settings(**server: Any) -> Any:
    return settings_for(
        url="http://upstream.test",
        server=server,
        upstreams={"default": {"max_inflight": 2, "api_key": "sk-upstream-secret"}},
        profiles={"alpha": {"lane": "batch", "max_inflight": 1, "max_queued": 1}, "chat": {"lane": "interactive"}},
        keys={"alpha": "sk-guard-alpha", "chat": "sk-guard-chat"},
    )


def key(k: str) -> dict[str, str]:
    return {"authorization": f"Bearer {k}"}


async def eventually(check: Callable[[], Any], what: str) -> None:
    for _ in range(2000):  # in-process: a few loop turns suffice; bounded so a bug fails instead of hanging
        if await check():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(what)


async def test_the_html_shows_the_json_numbers_in_flight_queued_refusals_tokens() -> None:
    upstream = HoldUpstream()
    async with guard_client(held_settings(), upstream) as (client, state):
        page: StatusPage = client._transport.app.state.status_page  # type: ignore[attr-defined]
        done = await client.post("/v1/chat/completions", json=CHAT, headers=key("sk-guard-alpha"))
        assert done.status_code == 200
        hold = dict(CHAT, messages=[{"role": "user", "content": "hold"}])
        tasks = [
            asyncio.create_task(client.post("/v1/chat/completions", json=hold, headers=key(k)))
            for k in ("sk-guard-alpha", "sk-guard-alpha", "sk-guard-chat")
        ]

        async def two_held_one_queued() -> bool:
            cap = (await client.get("/guard/capacity")).json()["upstreams"]["default"]
            return upstream.holding == 2 and cap["queued"] == 1

        await eventually(two_held_one_queued, "two requests at the upstream and one queued")
        refused = await client.post("/v1/chat/completions", json=hold, headers=key("sk-guard-alpha"))
        assert refused.status_code == 429
        cap = (await client.get("/guard/capacity")).json()
        page.history.sample(cap, time.time())

        response = await client.get("/guard/")
        html = response.text
        hist = (await client.get("/guard/history")).json()
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in response.headers["content-security-policy"]
        shown = page_values(html)
        assert len(shown) > 20 and mismatches(shown, cap, hist) == []
        assert shown_at(shown, ["c", "upstreams", "default", "in_flight"]) == "2"
        assert shown_at(shown, ["c", "upstreams", "default", "queued"]) == "1"
        assert shown_at(shown, ["c", "upstreams", "default", "profiles", "alpha", "queued"]) == "1"
        assert shown_at(shown, ["h", "refusals", "0", "status"]) == "429"
        assert shown_at(shown, ["h", "refusals", "0", "profile"]) == "alpha"
        assert shown_at(shown, ["h", "tokens_per_minute", "alpha"]) == "12"
        assert 'aria-label="batch 1 of 1 in flight, 1 queued"' in html
        assert 'aria-label="profile alpha 1 of 1 in flight, 1 queued"' in html
        assert hist["upstreams"]["default"]["points"][-1][1:] == [2, 1, 2]
        for text in (html, json.dumps(hist)):
            for secret in SECRETS:
                assert secret not in text
        assert "://" not in html  # nothing absolute: no CDN, no upstream URL

        upstream.release.set()
        assert [r.status_code for r in await asyncio.gather(*tasks)] == [200, 200, 200]
        after = (await client.get("/guard/status")).text
        assert shown_at(page_values(after), ["c", "upstreams", "default", "in_flight"]) == "0"
        assert shown_at(page_values(after), ["h", "tokens_per_minute", "alpha"]) == "36"


async def test_static_files_and_the_bare_path() -> None:
    async with guard_client(held_settings(), HoldUpstream()) as (client, _):
        r = await client.get("/guard")
        assert r.status_code == 308 and r.headers["location"] == "/guard/"
        js = await client.get("/guard/static/page.js")
        css = await client.get("/guard/static/page.css")
        assert js.headers["content-type"].startswith("text/javascript") and "EventSource" in js.text
        assert css.headers["content-type"].startswith("text/css") and "prefers-color-scheme: dark" in css.text
        assert "://" not in js.text and "://" not in css.text and "@import" not in css.text
        escape = await client.get("/guard/static/..%2Fpage.py")  # not a static route: the proxy says no
        assert 400 <= escape.status_code < 500 and "render_page" not in escape.text
        assert (await client.get("/guard/static/nope.js")).status_code == 404


async def test_access_token_mode_and_off() -> None:
    async with guard_client(held_settings(admin_token="adm-token-1"), HoldUpstream()) as (client, _):
        page: StatusPage = client._transport.app.state.status_page  # type: ignore[attr-defined]
        page.access = "token"
        for path in ("/guard/", "/guard/history"):
            r = await client.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic ")
            assert (await client.get(path, headers=key("sk-guard-alpha"))).status_code == 401
            assert (await client.get(path, headers=key("adm-token-1"))).status_code == 200
            basic = base64.b64encode(b"anyone:adm-token-1").decode()
            assert (await client.get(path, headers={"authorization": f"Basic {basic}"})).status_code == 200
            wrong = base64.b64encode(b"anyone:adm-token-2").decode()
            assert (await client.get(path, headers={"authorization": f"Basic {wrong}"})).status_code == 401
            assert (await client.get(path, headers={"authorization": "Basic !!"})).status_code == 401
        page.access = "off"
        assert (await client.get("/guard/")).status_code == 404
        assert (await client.get("/guard/history")).status_code == 404
        assert (await client.get("/guard/capacity")).status_code == 200  # unchanged: the same rule as before


def test_state_held_and_reservations_from_the_capacity_view() -> None:
    """The capacity view's ``state`` (with ``state_since_s``, ``state_detail``), ``held`` and ``reserved`` are
    shown; without a ``state`` the history's; "unknown" (with no JSON path) before either has one."""
    up = {
        "limit": 4, "limit_reason": "adaptive: deferred 0", "in_flight": 1, "queued": 0, "free": 3,
        "lanes": {"batch": {"limit": 3, "in_flight": 1, "queued": 0, "free": 2}},
        "profiles": {"alpha": {"limit": None, "in_flight": 1, "queued": 0, "free": None}},
        "reserved": {"batch": 1},
        "limit_history": [{"ago_s": 12.5, "limit": 3, "reason": "start"}, {"ago_s": 2.0, "limit": 4, "reason": "up"}],
    }  # fmt: skip
    now = 1_800_000_000.0
    hist = {"now": now, "window_s": 3600, "upstreams": {"b": {"state": "down", "since": now - 60, "detail": "gone"}}}
    loading = {"state": "loading", "state_since_s": 30.0, "state_detail": "GET /health -> 503", "held": 2}
    cap = {"free": 2, "lanes": {}, "upstreams": {"a": up | loading, "b": dict(up), "c": dict(up)}}
    html = render_page(cap, hist)
    shown = page_values(html)
    assert mismatches(shown, cap, hist) == []
    assert shown_at(shown, ["c", "upstreams", "a", "state"]) == "loading"
    assert shown_at(shown, ["c", "upstreams", "a", "state_detail"]) == "GET /health -> 503"
    assert shown_at(shown, ["c", "upstreams", "a", "held"]) == "2"
    assert time.strftime("%H:%M:%S", time.gmtime(now - 30)) + " UTC</time>" in html  # since: 30 s before now
    assert shown_at(shown, ["h", "upstreams", "b", "state"]) == "down"
    assert shown_at(shown, ["h", "upstreams", "b", "detail"]) == "gone"
    assert '<span class="state unknown">unknown</span>' in html  # "c": no state anywhere yet
    assert shown_at(shown, ["c", "upstreams", "a", "reserved", "batch"]) == "1"
    assert shown_at(shown, ["c", "upstreams", "a", "limit_history", "0", "limit"]) == "3"
    assert time.strftime("%H:%M:%S", time.gmtime(now - 12)) + " UTC</time>: limit" in html  # 12.5 s ago
    assert shown_at(shown, ["c", "upstreams", "b", "profiles", "alpha", "in_flight"]) == "1"
    assert shown_at(shown, ["c", "upstreams", "b", "profiles", "alpha", "limit"]) is None  # no cap: not shown
    assert 'aria-label="profile alpha 1 in flight (no cap of its own)"' in html
    cap = {"free": 2, "lanes": {}, "upstreams": {"a": dict(up, reserved={"batch": 0})}}
    assert 'class="reserved"' not in render_page(cap, hist)  # nothing booked: nothing shown


def test_an_unknown_access_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="public"):
        StatusPage(History(), dict, dict, lambda: None, access="public")
