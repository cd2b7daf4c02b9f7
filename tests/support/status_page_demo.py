"""Take the README's screenshot of the status page: the sim, a ``gateway-guard`` process in front of it, a few
minutes of changing load from three profiles, and the page in headless Chromium (the browser test's own helper).

    .venv/bin/python tests/support/status_page_demo.py --seconds 150 --out docs/status-page.png

Everything runs on 127.0.0.1 and stops at the end (the processes it started, by their PIDs). The load is
bounded: at most ``--clients`` requests at once, none started after ``--seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.integration.conftest import CHAT_PATH, guard_process
from tests.support.browser import headless_chromium
from tests.support.llamacpp import sim_server
from tests.support.status_page import GUARD_CONFIG

KEYS = {"alpha": "sk-page-alpha", "beta": "sk-page-beta", "chat": "sk-page-chat"}


def one_request(client: httpx.Client, guard: str, profile: str, tokens: int) -> int:
    body = {"model": "sim", "stream": True, "max_tokens": tokens, "messages": [{"role": "user", "content": "hi"}]}
    with client.stream(
        "POST", f"{guard}{CHAT_PATH}", json=body, headers={"authorization": f"Bearer {KEYS[profile]}"}
    ) as response:
        for _ in response.iter_bytes():
            pass
        return response.status_code


def run(seconds: float, out: Path, clients: int) -> int:
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        (tmp / "guard.toml").write_text(GUARD_CONFIG)
        sim = stack.enter_context(sim_server(slots=8, tokens_per_second=20, max_output_tokens=400))
        guard = stack.enter_context(guard_process(sim, max_inflight=4, extra=["--config", str(tmp / "guard.toml")]))
        driver = stack.enter_context(headless_chromium(width=1100, height=1400))
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=clients))
        client = stack.enter_context(httpx.Client(timeout=120.0))
        driver.get(f"{guard}/guard/")
        start = time.monotonic()
        running: list = []  # type: ignore[type-arg]
        tick = sent = 0
        while (elapsed := time.monotonic() - start) < seconds:
            running = [f for f in running if not f.done()]
            # a wave of batch work rising and falling over ~60 s, and a person chatting now and then
            want = round((clients - 2) * (0.5 - 0.5 * math.cos(2 * math.pi * elapsed / 60)))
            while len(running) < min(want, clients - 1):
                sent += 1
                profile = "alpha" if sent % 3 == 0 else "beta"
                running.append(pool.submit(one_request, client, guard, profile, 60 + 40 * (sent % 3)))
            if tick == int(seconds) - 15:  # alpha past its own queue (2 in flight, 1 queued): a 429 or two
                running += [pool.submit(one_request, client, guard, "alpha", 40) for _ in range(4)]
            if tick % 7 == 0 and len(running) < clients:
                running.append(pool.submit(one_request, client, guard, "chat", 30))
            tick += 1
            time.sleep(1.0)  # the load's own pace (a demo, not a test)
        driver.execute_script("window.scrollTo(0, 0)")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1100, int(height) + 40)
        time.sleep(1.5)  # one more update of the page at its new size
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        statuses = sorted(f.result(timeout=120) for f in running)
        print(f"screenshot: {out} ({out.stat().st_size} bytes); last requests: {statuses}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=150.0, help="how long the load runs before the shot")
    parser.add_argument("--out", type=Path, default=Path("docs/status-page.png"))
    parser.add_argument("--clients", type=int, default=10, help="most requests at once")
    args = parser.parse_args(argv)
    return run(args.seconds, args.out, args.clients)


if __name__ == "__main__":
    sys.exit(main())
