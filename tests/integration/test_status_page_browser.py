"""The status page in a real browser: Debian's headless Chromium (selenium + chromium-driver) reads /guard/ from a
``gateway-guard`` process in front of the sim, both on 127.0.0.1.

Load goes through the guard (streamed chat completions from three profiles, bounded in count and time); the
page's numbers must match ``/guard/capacity`` within 2 s; a stopped sim must show as down; and every request the
page made went to 127.0.0.1. ``GUARD_STATUS_SCREENSHOT=docs/status-page.png`` keeps the screenshot taken under
load (the README's image).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.integration.conftest import CHAT_PATH, guard_process
from tests.support.browser import chromium_paths, headless_chromium, off_host, requested_urls, wait_for
from tests.support.llamacpp import sim_server
from tests.support.status_page import DOM_VALUES_JS, GUARD_CONFIG, Shown, mismatches, page_values, shown_at

pytestmark = pytest.mark.skipif(chromium_paths() is None, reason="needs chromium + chromium-driver (./run-tests)")

UP = ["c", "upstreams", "default"]
TOKENS = 120  # per request: ~6-11 s at the sim's 20 tokens/s, slowed by its neighbours


def chat(client: httpx.Client, guard: str, key: str, tokens: int) -> int:
    """One streamed chat completion read to its end; returns the status."""
    body = {"model": "sim", "stream": True, "max_tokens": tokens, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {key}"}
    with client.stream("POST", f"{guard}{CHAT_PATH}", json=body, headers=headers) as response:
        for _ in response.iter_bytes():
            pass
        return response.status_code


@contextlib.contextmanager
def load(guard: str) -> Iterator[tuple[ThreadPoolExecutor, httpx.Client]]:
    with ThreadPoolExecutor(max_workers=12) as pool, httpx.Client(timeout=60.0) as client:
        yield pool, client


def background(driver: Any) -> str:
    return str(driver.execute_script("return getComputedStyle(document.body).backgroundColor"))


def text_of(driver: Any, css: str) -> str:
    """Read in one script call (the page redraws its markup on each update: no element is held across it)."""
    return str(driver.execute_script("const e = document.querySelector(arguments[0]); return e && e.textContent", css))


def accessible_name(driver: Any, css: str) -> str:
    """The browser's computed accessible name (what a screen reader says), retried if the page redrew meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(20):
        with contextlib.suppress(StaleElementReferenceException):
            return str(driver.find_element("css selector", css).accessible_name)
    raise AssertionError(f"{css}: redrawn under every read")


def dom(driver: Any) -> list[Shown]:
    return [(list(p), t) for p, t in driver.execute_script(DOM_VALUES_JS)]


def test_status_page_in_chromium_follows_load_and_outage(tmp_path: Path) -> None:
    config = tmp_path / "guard.toml"
    config.write_text(GUARD_CONFIG)
    stack = contextlib.ExitStack()
    with stack:
        sim_stack = contextlib.ExitStack()  # stopped on its own, mid-test, for the outage
        stack.callback(sim_stack.close)
        sim = sim_stack.enter_context(sim_server(slots=8, tokens_per_second=20, max_output_tokens=400))
        guard = stack.enter_context(guard_process(sim, max_inflight=4, extra=["--config", str(config)]))
        driver = stack.enter_context(headless_chromium())
        api = stack.enter_context(httpx.Client(timeout=10.0))

        def capacity() -> dict[str, Any]:
            payload: dict[str, Any] = api.get(f"{guard}/guard/capacity").json()
            return payload

        def history() -> dict[str, Any]:
            payload: dict[str, Any] = api.get(f"{guard}/guard/history").json()
            return payload

        def capacity_mismatches() -> list[str]:
            shown = [s for s in dom(driver) if s[0][0] == "c"]
            return mismatches(shown, capacity(), {}) if shown else ["no capacity numbers on the page"]

        with load(guard) as (pool, client):
            # a short warm-up, so the tokens table and the chart have something in them
            warm = [pool.submit(chat, client, guard, k, 20) for k in ("sk-page-alpha", "sk-page-beta", "sk-page-chat")]
            assert [f.result(timeout=60) for f in warm] == [200, 200, 200]

            driver.get(f"{guard}/guard/")
            wait_for(lambda: text_of(driver, "#mode"), lambda t: t.startswith("live"), timeout=10,
                     what="the page's script running")  # fmt: skip
            assert capacity_mismatches() == []
            assert shown_at(dom(driver), [*UP, "in_flight"]) == "0"

            # steady load: alpha 2 in flight + 1 queued, beta 1 in flight + 2 queued, chat 1 in flight
            running: list[Future[int]] = [pool.submit(chat, client, guard, "sk-page-alpha", TOKENS) for _ in range(3)]
            wait_for(capacity, lambda c: c["upstreams"]["default"]["profiles"]["alpha"]["queued"] == 1, timeout=20,
                     what="alpha queued")  # fmt: skip
            running += [pool.submit(chat, client, guard, "sk-page-beta", TOKENS) for _ in range(3)]
            running.append(pool.submit(chat, client, guard, "sk-page-chat", TOKENS))
            steady, _ = wait_for(
                capacity,
                lambda c: (c["upstreams"]["default"]["in_flight"], c["upstreams"]["default"]["queued"]) == (4, 3),
                timeout=20,
                what="4 in flight and 3 queued at the guard",
            )
            assert chat(client, guard, "sk-page-alpha", 10) == 429  # alpha's own queue is full: a refusal

            _, took = wait_for(capacity_mismatches, lambda bad: bad == [], timeout=2.0,
                               what="the page's numbers matching /guard/capacity")  # fmt: skip
            print(f"page matched /guard/capacity under load {took:.2f} s after the load was steady")
            shown = dom(driver)
            assert (shown_at(shown, [*UP, "in_flight"]), shown_at(shown, [*UP, "queued"])) == ("4", "3"), shown
            batch = steady["upstreams"]["default"]["lanes"]["batch"]
            assert batch["queued"] == 3
            said = f"batch {batch['in_flight']} of {batch['limit']} in flight, {batch['queued']} queued"
            assert accessible_name(driver, "ul.views li svg.bar[aria-label^='batch ']") == said

            wait_for(lambda: shown_at(dom(driver), ["h", "refusals", "0", "status"]), lambda s: s == "429",
                     timeout=6, what="the 429 in the refusals table")  # fmt: skip
            shot = os.environ.get("GUARD_STATUS_SCREENSHOT") or str(tmp_path / "status-page.png")
            driver.execute_script("window.scrollTo(0, 0)")
            assert driver.save_screenshot(shot) and Path(shot).stat().st_size > 10_000

            assert [f.result(timeout=90) for f in running] == [200] * 7
            wait_for(capacity_mismatches, lambda bad: bad == [], timeout=2.0, what="the page back to idle")
            assert shown_at(dom(driver), [*UP, "in_flight"]) == "0"
            # the script draws the numbers the server renders (page.js and page.py in step)
            served = {json.dumps(p) for p, _ in page_values(api.get(f"{guard}/guard/").text) if p[0] == "c"}
            assert served == {json.dumps(p) for p, _ in dom(driver) if p[0] == "c"}
            hist = history()
            assert hist["tokens_per_minute"]["alpha"] > 0 and hist["upstreams"]["default"]["state"] == "up"
            wait_for(lambda: mismatches([s for s in dom(driver) if s[0][:2] == ["h", "tokens_per_minute"]], {},
                                        history()), lambda bad: bad == [], timeout=6,
                     what="tokens per minute matching /guard/history")  # fmt: skip

            # dark and light, and a phone's width without sideways scrolling
            light = background(driver)
            driver.execute_cdp_cmd(
                "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
            )
            assert background(driver) != light
            driver.set_window_size(390, 844)
            assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")

            # without /guard/events (blocked in the browser) the page polls /guard/capacity
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/guard/events*"]})
            driver.refresh()
            wait_for(lambda: text_of(driver, "#mode"), lambda t: t == "live \u00b7 polling", timeout=10,
                     what="the page polling")  # fmt: skip
            last = pool.submit(chat, client, guard, "sk-page-chat", TOKENS)
            wait_for(capacity, lambda c: c["upstreams"]["default"]["in_flight"] == 1, timeout=20, what="one in flight")
            _, took = wait_for(capacity_mismatches, lambda bad: bad == [], timeout=2.0,
                               what="the polling page's numbers matching /guard/capacity")  # fmt: skip
            assert shown_at(dom(driver), [*UP, "in_flight"]) == "1"

            # the upstream goes away mid-stream: the sim process this test started is stopped (by its own PID)
            sim_stack.close()
            with contextlib.suppress(httpx.HTTPError):
                last.result(timeout=30)
            wait_for(lambda: text_of(driver, "section.upstream .state"), lambda s: s == "down", timeout=10,
                     what="the upstream shown down")  # fmt: skip
            # /guard/history samples the probers once a second: it follows within a sample
            wait_for(history, lambda h: h["upstreams"]["default"]["state"] == "down", timeout=5,
                     what="/guard/history showing the upstream down")  # fmt: skip
            wait_for(capacity_mismatches, lambda bad: bad == [], timeout=2.0, what="the page after the outage")

        seen = requested_urls(driver)
        assert sum(1 for _, document in seen if document.startswith(guard)) > 10  # the log did see the page
        assert off_host(seen, guard) == []
        entries = driver.execute_script(
            "return performance.getEntriesByType('resource').concat(performance.getEntriesByType('navigation'))"
            ".map(e => e.name)"
        )
        assert entries and all(urlsplit(u).hostname == "127.0.0.1" for u in entries), entries
