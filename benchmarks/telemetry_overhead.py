"""What tracing costs per request: the guard with tracing off vs on (exporting to a local OTLP receiver).

One run starts, on 127.0.0.1:

* the zero-work sim (``python -m gateway_guard.sim --mode zero``);
* an OTLP/HTTP sink (this script with ``--sink-port``): answers every ``POST /v1/traces`` with 200 and counts
  the spans it decoded, so the run can show that the "on" guard really exported;
* two guards in front of the sim, identical but for the environment: **off** (no ``OTEL_*``) and **on**
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` = the sink: every request sampled, five spans each, the SDK's default
  batch processor).

Each round measures direct, off and on, in turn, with one client sending requests back to back (the same
latency phase as ``overhead.py``), non-streamed and streamed; figures are medians over the rounds. The guards
are pinned to ``--proxy-cpu``, the sim, the sink and this load generator to ``--client-cpu``. The guards'
CPU time per request (all threads, the exporter's included) is read from /proc around each phase.

Then, in this process (``--micro``), the three telemetry calls of one request, off vs on, interleaved: the
time spent before the response, after it, and the process CPU including the exporter thread. On a shared
machine, where end-to-end latency is noisy, this is the steadier figure.

Usage: ``.venv/bin/python benchmarks/telemetry_overhead.py [--rounds 5] [--requests 3000]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    HOST,
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
from overhead import Target, chat_body, latency_phase

TARGET_ADDED_P50_MS = 0.2
MODES = {"both": (False, True), "json": (False,), "stream": (True,)}


# -- the sink ------------------------------------------------------------------------------------------------


def run_sink(port: int) -> int:
    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    except ImportError:  # counts posts only
        ExportTraceServiceRequest = None
    counts = {"posts": 0, "spans": 0, "bytes": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(counts).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers.get("content-length", "0")))
            spans = 0
            if ExportTraceServiceRequest is not None:
                request = ExportTraceServiceRequest()
                request.ParseFromString(data)
                spans = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            with lock:
                counts["posts"] += 1
                counts["spans"] += spans
                counts["bytes"] += len(data)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((HOST, port), Handler)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


def sink_counts(port: int) -> dict[str, int]:
    import httpx

    with httpx.Client(trust_env=False, timeout=5) as client:
        counts: dict[str, int] = client.get(f"http://{HOST}:{port}/counts").json()
        return counts


# -- the measurement -----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads: the exporter's too), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_rounds(
    targets: list[Target], pids: dict[str, int], args: argparse.Namespace
) -> tuple[dict[tuple[str, bool], list[list[float]]], dict[tuple[str, bool], list[float]]]:
    results: dict[tuple[str, bool], list[list[float]]] = {}
    cpu: dict[tuple[str, bool], list[float]] = {}
    for stream in MODES[args.mode]:
        for r in range(args.rounds):
            for target in targets:
                request = raw_post(HOST, target.port, "/v1/chat/completions", chat_body(stream), target.headers)
                pid = pids.get(target.name)
                before = cpu_seconds(pid) if pid else math.nan
                samples, errors = await latency_phase(target, request, args.requests, args.latency_seconds)
                if pid:
                    await asyncio.sleep(1.0)  # let the exporter's thread finish what this phase queued... mostly
                    per_request = (cpu_seconds(pid) - before) / (len(samples) + errors + 50) * 1e6
                    cpu.setdefault((target.name, stream), []).append(per_request)
                if errors:
                    print(f"  {target.name}: {errors} errors", flush=True)
                results.setdefault((target.name, stream), []).append(samples)
                mode = "stream" if stream else "json"
                print(
                    f"  round {r + 1} {mode:6} {target.name:12} p50 {percentile(samples, 50) * 1000:6.3f} ms"
                    f"  p99 {percentile(samples, 99) * 1000:6.3f} ms  n={len(samples)}"
                    + (f"  guard CPU {cpu[(target.name, stream)][-1]:6.0f} us/request" if pid else ""),
                    flush=True,
                )
    return results, cpu


def report(
    results: dict[tuple[str, bool], list[list[float]]], cpu: dict[tuple[str, bool], list[float]]
) -> tuple[str, list[str]]:
    rows, verdicts = [], []
    for stream in sorted({stream for _, stream in results}):
        mode = "streamed" if stream else "non-streamed"
        p50 = {name: [percentile(s, 50) * 1000 for s in results[(name, stream)]] for name in ("direct", "off", "on")}
        p99 = {name: [percentile(s, 99) * 1000 for s in results[(name, stream)]] for name in ("direct", "off", "on")}
        us = {name: median(cpu.get((name, stream), [])) for name in ("direct", "off", "on")}
        for name, label in (
            ("direct", "direct to the sim"),
            ("off", "guard, tracing off"),
            ("on", "guard, tracing on"),
        ):
            cpu_us = "-" if math.isnan(us[name]) else f"{us[name]:.0f}"
            rows.append([mode, label, f"{median(p50[name]):.3f}", f"{median(p99[name]):.3f}", cpu_us])
        added = median([on - off for on, off in zip(p50["on"], p50["off"], strict=True)])
        added99 = median([on - off for on, off in zip(p99["on"], p99["off"], strict=True)])
        verdicts.append(
            f"{mode}: tracing adds p50 {added:.3f} ms (target <= {TARGET_ADDED_P50_MS}: "
            f"{'met' if added <= TARGET_ADDED_P50_MS else 'MISSED'}), p99 {added99:.3f} ms, "
            f"guard CPU {us['on'] - us['off']:.0f} us/request (exporter thread included)"
        )
    return table(["request", "path", "p50 ms", "p99 ms", "guard CPU us/request"], rows), verdicts


def micro(sink_port: int, count: int) -> list[str]:
    """In this process, the three telemetry calls of a request, tracing off vs on (to the sink), interleaved.

    Wall time in the loop = what the request path pays; process CPU after a flush = that plus the exporter
    thread's encoding. Robust where a shared machine makes end-to-end latency noisy.
    """
    from gateway_guard.errors import Outcome
    from gateway_guard.settings import parse_settings
    from gateway_guard.telemetry import RequestRecord, Telemetry

    settings = parse_settings({"upstreams": {"default": {"url": "http://127.0.0.1:9"}}})
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("OTEL_")}
    off = Telemetry.from_settings(settings, {}, {})
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://{HOST}:{sink_port}"
    on = Telemetry.from_settings(settings, {}, {})
    del os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]
    os.environ.update(saved)
    assert off.tracing is None and on.tracing is not None
    headers = [(b"host", b"guard"), (b"content-type", b"application/json"), (b"authorization", b"Bearer k")]
    upstream = [("content-type", "application/json"), ("accept", "*/*")]
    logging_level = logging.getLogger("gateway_guard.access").level
    logging.getLogger("gateway_guard.access").setLevel(logging.WARNING)  # the access line is not tracing

    def one(telemetry: Telemetry) -> tuple[float, float]:
        record = RequestRecord(method="POST", path="/v1/chat/completions")
        t0 = time.perf_counter()
        telemetry.request_started(record, headers)
        record.lane, record.profile, record.upstream, record.model = "batch", "worker", "default", "sim"
        record.queue_entered = time.perf_counter()
        record.queue_wait, record.outcome = 0.0, Outcome.ADMITTED
        t1 = record.upstream_started = time.perf_counter()
        telemetry.upstream_headers(record, upstream)
        t2 = time.perf_counter()
        record.status, record.streamed, record.ttfb = 200, True, 0.00005
        record.prompt_tokens, record.completion_tokens = 12, 8
        record.duration = time.perf_counter() - record.started + 0.0001
        t3 = time.perf_counter()
        telemetry.request_finished(record)
        return (t1 - t0) + (time.perf_counter() - t2), time.perf_counter() - t3

    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    cpu = {"off": 0.0, "on": 0.0}
    for _ in range(count // 100):
        for name, telemetry in (("off", off), ("on", on)):
            c0 = time.process_time()
            results[name] += [one(telemetry) for _ in range(100)]
            if name == "on":
                assert on.tracing is not None
                on.tracing.force_flush()  # the exporter's encoding and POST, counted in this process's CPU
            cpu[name] += time.process_time() - c0
    asyncio.run(on.aclose())
    logging.getLogger("gateway_guard.access").setLevel(logging_level)
    lines = []
    for name in ("off", "on"):
        before = median([b for b, _ in results[name]]) * 1e6
        after = median([a for _, a in results[name]]) * 1e6
        lines.append(
            f"in-process, tracing {name:3}: before the response {before:6.1f} us, after it {after:6.1f} us (medians);"
            f" process CPU {cpu[name] / len(results[name]) * 1e6:6.1f} us/request (exporter included)"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per mode; figures are medians (default 5)")
    parser.add_argument("--requests", type=int, default=3000, help="requests per latency phase (default 3000)")
    parser.add_argument("--latency-seconds", type=float, default=8.0, help="latency phase time cap (default 8)")
    parser.add_argument("--proxy-cpu", default="0", help="CPU list for the guards ('' = no pinning)")
    parser.add_argument("--client-cpu", default="1", help="CPU list for the sim, the sink and this load generator")
    parser.add_argument("--guard-log-level", default=None, help="the guards' --log-level (default: their own, info)")
    parser.add_argument(
        "--sample", type=float, default=None, help="trace this fraction of requests (parentbased_traceidratio)"
    )
    parser.add_argument("--mode", choices=list(MODES), default="both", help="non-streamed, streamed or both")
    parser.add_argument("--micro", type=int, default=20000, help="requests of the in-process part (0 = skip)")
    parser.add_argument("--sink-port", type=int, default=None, help=argparse.SUPPRESS)  # run as the OTLP sink
    args = parser.parse_args()
    if args.sink_port is not None:
        return run_sink(args.sink_port)
    if min(args.rounds, args.requests) < 1:
        parser.error("--rounds and --requests must be >= 1")

    pinning = bool(shutil.which("taskset")) and pin_self(args.client_cpu)
    proxy_cpu = args.proxy_cpu if pinning else None
    client_cpu = args.client_cpu if pinning else None
    print(
        f"pinning: {'guards on CPU ' + args.proxy_cpu + ', the rest on CPU ' + args.client_cpu if pinning else 'off'}"
    )

    sim_port, sink_port, off_port, on_port = free_port(), free_port(), free_port(), free_port()
    extra = ["--log-level", args.guard_log_level] if args.guard_log_level else []
    tracing_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{HOST}:{sink_port}", "OTEL_TRACES_EXPORTER": "otlp"}
    if args.sample is not None:
        tracing_env |= {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(args.sample)}
    no_tracing = {"OTEL_TRACES_EXPORTER": "none"}
    with contextlib.ExitStack() as stack:
        sim = stack.enter_context(
            process("sim", pinned(sim_argv(sim_port, "--mode", "zero"), client_cpu), f"http://{HOST}:{sim_port}")
        )
        sink_argv = [sys.executable, str(Path(__file__).resolve()), "--sink-port", str(sink_port)]
        stack.enter_context(process("sink", pinned(sink_argv, client_cpu), f"http://{HOST}:{sink_port}", health="/"))
        pids = {}
        for name, port, env in (("off", off_port, no_tracing), ("on", on_port, tracing_env)):
            argv = pinned(guard_argv(port, sim.url, 64, *extra), proxy_cpu)
            guard = stack.enter_context(
                process(f"guard-{name}", argv, f"http://{HOST}:{port}", health="/guard/health", env=env)
            )
            pids[name] = guard.popen.pid  # taskset execs the guard: same pid
        targets = [Target("direct", sim_port), Target("off", off_port), Target("on", on_port)]
        print(f"measuring direct, tracing off, tracing on: {args.rounds} rounds x {args.requests} requests, 1 client")
        results, cpu = asyncio.run(run_rounds(targets, pids, args))
        before_exit = sink_counts(sink_port)
        micro_lines = micro(sink_port, args.micro) if args.micro else []

    text, verdicts = report(results, cpu)
    print()
    print(text)
    print()
    for line in verdicts:
        print(line)
    print(f"the sink received {before_exit['spans']} spans in {before_exit['posts']} OTLP posts from the 'on' guard")
    for line in micro_lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
