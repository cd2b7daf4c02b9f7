"""Debian's headless Chromium driven by its chromium-driver through selenium, for the status page's test.

``headless_chromium()`` starts a fresh browser (its own ``--user-data-dir``, no background networking, no
component updates, no sync) with the DevTools network log on, and quits it (its own process) on exit.
``requested_urls(driver)`` reads that log: every URL the page asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-dev-shm-usage",
)


def chromium_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) from Debian's packages, or None when they are not installed."""
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def headless_chromium(*, width: int = 1100, height: int = 1500) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        raise RuntimeError("chromium and chromium-driver are not installed (./run-tests installs them as root)")
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium-manager is never needed: both paths are given
    with tempfile.TemporaryDirectory(prefix="guard-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = paths[0]
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(paths[1]))
        try:
            yield driver
        finally:
            driver.quit()


def requested_urls(driver: Any) -> list[tuple[str, str]]:
    """(url, url of the document that asked) for every request the browser sent since the last call, from the
    DevTools ``Network`` log (the browser's own pages, such as the new-tab page, included)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            params = message["params"]
            urls.append((params["request"]["url"], params.get("documentURL", "")))
    return urls


NETWORK_SCHEMES = ("http", "https", "ws", "wss", "ftp")


def off_host(requests: list[tuple[str, str]], page: str, host: str = "127.0.0.1") -> list[str]:
    """Requests that left ``host``: any network URL anywhere, and any URL at all that ``page`` asked for."""
    bad = []
    for url, document in requests:
        parts = urlsplit(url)
        network = parts.scheme in NETWORK_SCHEMES
        if (network or document.startswith(page)) and parts.hostname != host:
            bad.append(f"{url} (from {document})")
    return bad


def wait_for(probe: Callable[[], T], done: Callable[[T], bool], *, timeout: float, what: str) -> tuple[T, float]:
    """Call ``probe`` until ``done(result)``; returns (result, seconds it took). Polls a browser every 0.1 s:
    there is no event to wait on across processes."""
    start = time.monotonic()
    while True:
        result = probe()
        if done(result):
            return result, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s; last seen: {result!r}")
        time.sleep(0.1)
