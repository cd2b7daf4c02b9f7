"""The Locust scenarios run headless for a few seconds against the guard in front of the simulated upstream.

Everything runs as its own process on free 127.0.0.1 ports: ``gateway-guard --simulate`` (guard + sim) and
``locust --headless``. The test reads Locust's CSV: both classes (interactive, batch) got answers, none
failed, the TTFT statistic is there, and the report files were written.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
BIN = Path(sys.executable).parent

pytest.importorskip("locust")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def guard_with_sim(log: Path) -> Iterator[str]:
    """``gateway-guard --simulate`` on free ports; yields the guard's URL once its upstream is ready."""
    port, sim_port = free_port(), free_port()
    argv = [str(BIN / "gateway-guard"), "--simulate", "--sim-port", str(sim_port), "--port", str(port)]
    argv += ["--sim-slots", "4", "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:
            deadline = time.monotonic() + 15
            with httpx.Client(timeout=1.0, trust_env=False) as client:
                while True:
                    assert proc.poll() is None, f"guard exited: {log.read_text()[-2000:]}"
                    with contextlib.suppress(httpx.TransportError):
                        if client.get(url + "/guard/ready").status_code == 200:
                            break
                    assert time.monotonic() < deadline, f"guard not ready: {log.read_text()[-2000:]}"
                    time.sleep(0.1)  # polling another process: there is no event to wait on
            yield url
        finally:
            stop(proc)


def settled_capacity(url: str, timeout: float = 3.0) -> dict[str, object]:
    """``/guard/capacity`` once nothing is in flight (Locust's last connections close as it exits), or at timeout."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while True:
            capacity: dict[str, object] = client.get(url + "/guard/capacity").json()
            lanes = capacity["lanes"]
            assert isinstance(lanes, dict)
            if all(lane["in_flight"] == 0 for lane in lanes.values()) or time.monotonic() > deadline:
                return capacity
            time.sleep(0.05)


def stats_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def test_locust_scenarios_headless_against_guard(tmp_path: Path) -> None:
    prefix = tmp_path / "smoke"
    with guard_with_sim(tmp_path / "guard.log") as url:
        argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url]
        argv += ["-u", "6", "-r", "6", "-t", "5s", "--stop-timeout", "2", "--only-summary"]
        argv += ["--interactive-count", "2", "--batch-count", "3", "--storm-count", "1"]
        argv += ["--interactive-think", "0.5", "--interactive-max-tokens", "8", "--batch-max-tokens", "8"]
        argv += ["--csv", str(prefix), "--html", str(tmp_path / "smoke.html"), "--llm-model", "sim"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "LOADTEST_"))}
        # cwd = tmp_path: no locust.conf or pyproject [tool.locust] of ours is read by accident.
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=40)
        capacity = settled_capacity(url)
    output = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, output

    for suffix in ("stats", "failures", "exceptions", "stats_history"):
        assert (tmp_path / f"smoke_{suffix}.csv").is_file(), f"smoke_{suffix}.csv missing:\n{output}"
    assert (tmp_path / "smoke.html").stat().st_size > 0

    rows = stats_rows(tmp_path / "smoke_stats.csv")
    for name in ("interactive", "batch"):
        row = rows.get(("POST", name))
        assert row is not None, f"no POST {name} row in {sorted(rows)}"
        assert int(row["Request Count"]) > 0, row
        assert int(row["Failure Count"]) == 0, (row, (tmp_path / "smoke_failures.csv").read_text())
        ttft = rows.get(("TTFT", name))
        assert ttft is not None and int(ttft["Request Count"]) > 0, f"no TTFT {name} statistic: {sorted(rows)}"
        assert float(ttft["Median Response Time"]) <= float(row["Median Response Time"])
    assert int(rows[("POST", "abandoned")]["Request Count"]) > 0
    # Locust has stopped its users: every permit is back.
    lanes = capacity["lanes"]
    assert isinstance(lanes, dict)
    assert all(lane["in_flight"] == 0 for lane in lanes.values()), capacity
