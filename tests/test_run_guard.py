"""``./run-guard ARGS`` keeps the built-in simulated upstream unless the arguments name an upstream or a config."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not (ROOT / ".venv/bin/gateway-guard").exists(), reason="./run-tests installs the venv first")
def test_run_guard_with_only_a_port_still_guards_the_simulator() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARD__")}
    proc = subprocess.Popen(
        [str(ROOT / "run-guard"), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "exited"
            try:
                capacity = httpx.get(f"http://127.0.0.1:{port}/guard/capacity", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the guard never answered"
                time.sleep(0.2)
        assert capacity.status_code == 200 and "default" in capacity.json()["upstreams"]
        body = {"model": "sim", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        if proc.stdout is not None:
            proc.stdout.close()
