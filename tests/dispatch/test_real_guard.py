"""guard-dispatch reading the real guard's capacity (``gateway-guard`` as its own process).

The guard runs in front of a small upstream on 127.0.0.1 that holds chat completions until the test lets
them go, so batch slots really are taken while guard-dispatch reads ``/guard/capacity``.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_guard.dispatch.capacity import CapacityClient
from gateway_guard.dispatch.cli import ExitCode, Options, run
from tests.dispatch.conftest import HermesBoard, free_port, guard_process

pytest.importorskip("gateway_guard.app.factory", reason="the guard (gateway_guard.app) is not in this tree")


class HoldingUpstream:
    """An OpenAI-like upstream whose chat completions wait until ``release()`` (bounded: 30 s)."""

    def __init__(self) -> None:
        self.arrived = 0
        self.cond = threading.Condition()
        self.released = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with upstream.cond:
                    upstream.arrived += 1
                    upstream.cond.notify_all()
                upstream.released.wait(30)
                body = json.dumps({
                    "id": "x", "object": "chat.completion", "model": "m", "created": 0,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def wait_arrived(self, n: int, timeout: float = 15.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.arrived >= n, timeout), f"{self.arrived} of {n} arrived"

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def upstream() -> Iterator[HoldingUpstream]:
    up = HoldingUpstream()
    yield up
    up.close()


@pytest.fixture
def guard_url(upstream: HoldingUpstream, tmp_path: Path) -> Iterator[str]:
    """The real guard, ``gateway-guard --upstream URL --max-inflight 3 --port P``, in its own process."""
    args = ["--upstream", upstream.url, "--max-inflight", "3"]
    with guard_process(args, tmp_path / "guard.log", port=free_port()) as url:
        yield url


def send_batch_request(guard_url: str) -> threading.Thread:
    def post() -> None:
        with httpx.Client(timeout=60, trust_env=False) as client:
            client.post(f"{guard_url}/v1/chat/completions",
                        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


def test_reads_the_real_guards_capacity_as_batch_slots_fill(guard_url: str, upstream: HoldingUpstream) -> None:
    with CapacityClient(guard_url) as client:
        start = client.fetch()
        assert start.upstreams["default"].slots.limit == 3
        batch_limit = start.lanes["batch"].limit
        assert batch_limit is not None and start.batch_free() == batch_limit
        thread = send_batch_request(guard_url)
        upstream.wait_arrived(1)
        held = client.fetch()
        assert held.batch_free() == batch_limit - 1
        assert held.upstreams["default"].slots.in_flight == 1
        upstream.released.set()
        thread.join(30)
        assert client.fetch().batch_free() == batch_limit


@pytest.mark.hermes
def test_a_tick_starts_only_as_many_cards_as_the_real_guard_has_batch_room(
    guard_url: str, upstream: HoldingUpstream, board: HermesBoard
) -> None:
    board.create(["worker1", "worker2", "worker1", "worker2"], priorities=[4, 3, 2, 1])
    with CapacityClient(guard_url) as client:
        batch_free = client.fetch().batch_free()
    thread = send_batch_request(guard_url)  # one batch slot taken by someone else's request
    upstream.wait_arrived(1)
    out = io.StringIO()

    code = run(Options(hermes=str(board.hermes), guard_url=guard_url, target=4, log_json=True),
               env=board.env, out=out, err=out)

    upstream.released.set()
    thread.join(30)
    assert code is ExitCode.OK, out.getvalue()
    line = json.loads(out.getvalue().splitlines()[-1])
    assert (line["free"], line["asked"], line["spawned"], line["stopped"]) == (
        batch_free - 1, batch_free - 1, batch_free - 1, "guard_free"
    )
    assert len(board.running()) == batch_free - 1
