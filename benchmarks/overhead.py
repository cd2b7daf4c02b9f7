"""What the guard adds to a request, against a zero-work upstream, and the same for LiteLLM proxy as a peer.

One run measures, on 127.0.0.1:

* **direct**: the load generator -> ``python -m gateway_guard.sim --mode zero`` (replies at once, no slot limit);
* **guard**: the load generator -> ``gateway-guard`` -> the same sim;
* **litellm** (when installed): the load generator -> ``litellm`` proxy -> the same sim, with
  ``max_parallel_requests`` equal to the guard's cap.

for non-streamed and streamed chat completions. Each round runs, per target, a latency phase (one client,
requests back to back: p50 / p99) and a throughput phase (``--concurrency`` clients in a closed loop: req/s).
Rounds alternate the targets, and the figures printed are medians over the rounds. "Added" latency is the
target's percentile minus direct's percentile of the same round.

The proxy under test is pinned to ``--proxy-cpu`` (default 0) with taskset; the sim and this load generator
share ``--client-cpu`` (default 1), so "req/s" is what one core of proxy passes while the other core feeds it.
The load generator is a lean asyncio HTTP/1.1 client (``_common.RawClient``), not httpx, so it is not the
bottleneck it would otherwise be.

LiteLLM lives in its own venv (its pins are not ours)::

    python3 -m venv .venv-litellm && .venv-litellm/bin/pip install 'litellm[proxy]'

and is found as ``--litellm PATH``, ``$LITELLM_BIN``, ``.venv-litellm/bin/litellm`` or ``litellm`` on PATH;
without it the peer is skipped with a message.

Usage: ``.venv/bin/python benchmarks/overhead.py [--rounds 3] [--concurrency 32] [--seconds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    HOST,
    REPO_ROOT,
    HttpError,
    Proc,
    RawClient,
    closed_loop,
    free_port,
    guard_argv,
    median,
    percentile,
    pin_self,
    pinned,
    process,
    raw_post,
    sim_argv,
    table,
)

MODEL = "sim"
LITELLM_KEY = "sk-overhead-bench"


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Figures:
    """One target, one mode, one round."""

    p50_ms: float
    p99_ms: float
    rps: float
    errors: int


def chat_body(stream: bool) -> bytes:
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


async def latency_phase(target: Target, request: bytes, count: int, seconds: float) -> tuple[list[float], int]:
    """One client, back to back: up to ``count`` requests or ``seconds``, after 50 warm-up requests."""
    client = RawClient(HOST, target.port)
    samples: list[float] = []
    errors = 0
    try:
        for _ in range(50):
            with contextlib.suppress(HttpError):
                await client.call(request)
        deadline = time.perf_counter() + seconds
        for _ in range(count):
            t0 = time.perf_counter()
            if t0 > deadline:
                break
            try:
                status, _ = await client.call(request)
            except HttpError:
                errors += 1
                continue
            if status != 200:
                errors += 1
                continue
            samples.append(time.perf_counter() - t0)
    finally:
        await client.close()
    return samples, errors


async def throughput_phase(target: Target, request: bytes, concurrency: int, seconds: float) -> tuple[float, int]:
    """``concurrency`` clients in a closed loop for ``seconds`` (after a 1 s warm-up); returns (req/s, errors)."""
    return await closed_loop([(target.port, request)], concurrency, seconds)


async def measure(target: Target, stream: bool, args: argparse.Namespace) -> Figures:
    request = raw_post(HOST, target.port, "/v1/chat/completions", chat_body(stream), target.headers)
    samples, lat_errors = await latency_phase(target, request, args.requests, args.latency_seconds)
    rps, thr_errors = await throughput_phase(target, request, args.concurrency, args.seconds)
    return Figures(
        p50_ms=percentile(samples, 50) * 1000,
        p99_ms=percentile(samples, 99) * 1000,
        rps=rps,
        errors=lat_errors + thr_errors,
    )


# -- LiteLLM ---------------------------------------------------------------------------------------------------


def find_litellm(given: str | None) -> str | None:
    for candidate in (given, os.environ.get("LITELLM_BIN"), str(REPO_ROOT / ".venv-litellm/bin/litellm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("litellm")


def litellm_config(upstream: str, cap: int) -> str:
    """LiteLLM's YAML config; JSON is valid YAML, so no YAML writer is needed."""
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": f"{upstream}/v1",
                    "api_key": "dummy",
                    "max_parallel_requests": cap,
                },
            }
        ],
        "general_settings": {"master_key": LITELLM_KEY},
        "litellm_settings": {"telemetry": False},
    }
    return json.dumps(config, indent=2)


@contextlib.contextmanager
def litellm_proxy(exe: str, upstream: str, cap: int, cpu: str | None) -> Iterator[Proc]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "litellm.yaml"
        config.write_text(litellm_config(upstream, cap))
        argv = pinned([exe, "--config", str(config), "--port", str(port), "--host", HOST, "--telemetry", "False"], cpu)
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
        with process("litellm", argv, f"http://{HOST}:{port}", health="/health/liveliness", timeout=90, env=env) as p:
            yield p


# -- the run ---------------------------------------------------------------------------------------------------


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def run_rounds(targets: list[Target], args: argparse.Namespace) -> dict[tuple[str, bool], list[Figures]]:
    results: dict[tuple[str, bool], list[Figures]] = {}
    for stream in (False, True):
        for r in range(args.rounds):
            for target in targets:
                figures = await measure(target, stream, args)
                results.setdefault((target.name, stream), []).append(figures)
                mode = "stream" if stream else "json"
                print(
                    f"  round {r + 1} {mode:6} {target.name:8} p50 {figures.p50_ms:7.2f} ms  p99 {figures.p99_ms:7.2f}"
                    f" ms  {figures.rps:7.0f} req/s  errors {figures.errors}",
                    flush=True,
                )
    return results


def report(results: dict[tuple[str, bool], list[Figures]], names: list[str], args: argparse.Namespace) -> str:
    rows = []
    for stream in (False, True):
        direct = results[("direct", stream)]
        for name in names:
            runs = results[(name, stream)]
            p50 = median([f.p50_ms for f in runs])
            p99 = median([f.p99_ms for f in runs])
            rps = median([f.rps for f in runs])
            errors = sum(f.errors for f in runs)
            if name == "direct":
                added50 = added99 = "-"
            else:
                added50 = f"{median([f.p50_ms - d.p50_ms for f, d in zip(runs, direct, strict=True)]):.2f}"
                added99 = f"{median([f.p99_ms - d.p99_ms for f, d in zip(runs, direct, strict=True)]):.2f}"
            mode = "streamed" if stream else "non-streamed"
            rows.append([mode, name, f"{p50:.2f}", f"{p99:.2f}", added50, added99, f"{rps:.0f}", errors])
    headers = ["request", "path", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "req/s", "errors"]
    return table(headers, rows)


def verdict(results: dict[tuple[str, bool], list[Figures]], names: list[str]) -> list[str]:
    lines = []
    for stream in (False, True):
        mode = "streamed" if stream else "non-streamed"
        direct = results[("direct", stream)]
        guard = results[("guard", stream)]
        added50 = median([g.p50_ms - d.p50_ms for g, d in zip(guard, direct, strict=True)])
        added99 = median([g.p99_ms - d.p99_ms for g, d in zip(guard, direct, strict=True)])
        rps = median([g.rps for g in guard])
        lines.append(
            f"{mode}: guard added p50 {added50:.2f} ms (target <= 0.5: {'met' if added50 <= 0.5 else 'MISSED'}), "
            f"p99 {added99:.2f} ms (target <= 2: {'met' if added99 <= 2 else 'MISSED'}), "
            f"{rps:.0f} req/s (target >= 2000: {'met' if rps >= 2000 else 'MISSED'})"
        )
        for base in [n for n in names if n.startswith("guard@")]:
            then = results[(base, stream)]
            base50 = median([b.p50_ms - d.p50_ms for b, d in zip(then, direct, strict=True)])
            base_rps = median([b.rps for b in then])
            lines.append(
                f"{mode}: {base} added p50 {base50:.2f} ms, {base_rps:.0f} req/s -> this tree {added50:.2f} ms, "
                f"{rps:.0f} req/s ({'no regression' if added50 <= base50 * 1.1 + 0.05 else 'REGRESSION'})"
            )
        if "litellm" in names:
            lite = results[("litellm", stream)]
            lite50 = median([t.p50_ms - d.p50_ms for t, d in zip(lite, direct, strict=True)])
            ratio = lite50 / added50 if added50 > 0 else float("inf")
            lines.append(
                f"{mode}: LiteLLM added p50 {lite50:.2f} ms = {ratio:.1f}x the guard's "
                f"(target >= 5x: {'met' if ratio >= 5 else 'MISSED'})"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode; figures are medians (default 3)")
    parser.add_argument("--concurrency", type=int, default=32, help="clients in the throughput phase (default 32)")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput phase length (default 5)")
    parser.add_argument("--requests", type=int, default=2000, help="latency phase requests (default 2000)")
    parser.add_argument("--latency-seconds", type=float, default=6.0, help="latency phase time cap (default 6)")
    parser.add_argument("--cap", type=int, default=64, help="guard --max-inflight = LiteLLM max_parallel_requests")
    parser.add_argument("--proxy-cpu", default="0", help="CPU list for the proxy under test ('' = no pinning)")
    parser.add_argument("--client-cpu", default="1", help="CPU list for the sim and this load generator")
    parser.add_argument("--guard-log-level", default=None, help="the guard's --log-level (default: its own, info)")
    parser.add_argument("--litellm", default=None, help="path of the litellm executable")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM peer")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure the guard of git revision REV (exported with git archive) in the same run: 'guard@REV'",
    )
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    if min(args.rounds, args.concurrency, args.requests) < 1 or args.seconds <= 0:
        parser.error("--rounds, --concurrency, --requests must be >= 1 and --seconds > 0")

    load_start = os.getloadavg()[0]
    pinning = bool(shutil.which("taskset")) and pin_self(args.client_cpu)
    print(
        f"cores: {os.cpu_count()}; pinning: "
        + (
            f"proxy on CPU {args.proxy_cpu}, sim + load generator on CPU {args.client_cpu}"
            if pinning
            else "not available (taskset or CPUs missing) - figures are for unpinned processes"
        )
    )
    proxy_cpu = args.proxy_cpu if pinning else None
    client_cpu = args.client_cpu if pinning else None

    litellm = None if args.no_litellm else find_litellm(args.litellm)
    if litellm is None and not args.no_litellm:
        print(
            "LiteLLM: not found (--litellm, $LITELLM_BIN, .venv-litellm/bin/litellm, PATH) - peer skipped;"
            " install: python3 -m venv .venv-litellm && .venv-litellm/bin/pip install 'litellm[proxy]'"
        )

    sim_port, guard_port = free_port(), free_port()
    guard_extra = ["--log-level", args.guard_log_level] if args.guard_log_level else []
    with contextlib.ExitStack() as stack:
        sim = stack.enter_context(
            process("sim", pinned(sim_argv(sim_port, "--mode", "zero"), client_cpu), f"http://{HOST}:{sim_port}")
        )
        guard_cmd = pinned(guard_argv(guard_port, sim.url, args.cap, *guard_extra), proxy_cpu)
        stack.enter_context(process("guard", guard_cmd, f"http://{HOST}:{guard_port}", health="/guard/health"))
        targets = [Target("direct", sim_port), Target("guard", guard_port)]
        if args.baseline:
            base_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="guard-baseline-")))
            export = subprocess.run(["git", "archive", args.baseline], cwd=REPO_ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(base_dir)], input=export.stdout, check=True)
            base_port = free_port()
            # -P: not the repo root (the cwd) first on sys.path, so the exported tree's package is the one imported
            base_cmd = [sys.executable, "-P", "-c", "from gateway_guard.cli import main; main()"]
            base_cmd += ["--upstream", sim.url, "--max-inflight", str(args.cap), "--port", str(base_port)]
            url = f"http://{HOST}:{base_port}"
            env = {"PYTHONPATH": str(base_dir)}
            cmd = pinned([*base_cmd, *guard_extra], proxy_cpu)
            stack.enter_context(process("baseline", cmd, url, health="/guard/health", env=env))
            targets.append(Target(f"guard@{args.baseline}", base_port))
        if litellm is not None:
            t0 = time.monotonic()
            lite = stack.enter_context(litellm_proxy(litellm, sim.url, args.cap, proxy_cpu))
            print(f"LiteLLM: {litellm} started in {time.monotonic() - t0:.1f} s")
            targets.append(Target("litellm", port_of(lite.url), {"Authorization": f"Bearer {LITELLM_KEY}"}))
        names = [t.name for t in targets]
        print(
            f"measuring {', '.join(names)}: {args.rounds} rounds, latency {args.requests} requests"
            f" (<= {args.latency_seconds} s), throughput {args.concurrency} clients x {args.seconds} s"
        )
        results = asyncio.run(run_rounds(targets, args))

    text = report(results, names, args)
    text += f"\n\n1-minute load average: {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end."
    print()
    print(text)
    print()
    for line in verdict(results, names):
        print(line)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
