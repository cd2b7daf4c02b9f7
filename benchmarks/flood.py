"""The headline benchmark: a flood of batch requests and one interactive user, on a real llama.cpp server.

One command, one run, on 127.0.0.1:

1. starts llama.cpp's own server (xllamacpp, the random-weight "med" model of ``tests/support/llamacpp.py``,
   ``--slots`` 4) and sends every request with ``ignore_eos`` so each reply is exactly max_tokens long;
2. **idle**: interactive requests alone, to know the idle time to first token (TTFT);
3. **knee**: batch clients in a closed loop directly on the server, concurrency 1..8: the best tokens/s;
4. the same flood three ways (40 batch clients in a closed loop + 1 interactive request per second, open loop):
   (a) **direct** to the server; (b) **client cap**: batch clients share a static semaphore of ``--slots``
   (what the seed's capped-dispatch scripts achieve; the interactive user is not under it); (c) **guard**:
   through ``gateway-guard --max-inflight SLOTS`` (batch lane by default, headroom 1; interactive requests send
   ``X-Guard-Lane: interactive``); plus any ``--guard-variant CAP:HEADROOM`` (default ``5:1``), labelled.

For each way it prints interactive TTFT p50/p95 and their ratio to idle, batch tokens/s and its ratio to the
knee, failed and timed-out requests, and the most requests the server held at once (``/metrics``:
``llamacpp:requests_processing + llamacpp:requests_deferred``, sampled every 0.2 s). It writes
``docs/flood.png`` and ``docs/flood.md``.

The load generator is this one asyncio process with httpx. It opens a new connection per request: llama.cpp's
HTTP server sometimes drops a kept-alive connection when the next request follows a stream at once ("server
disconnected without sending a response"), and a client-side artefact must not count against any way.

Usage: ``.venv/bin/python benchmarks/flood.py [--seconds 60] [--batch-clients 40] [--max-tokens 48]``
(about 8 minutes with the defaults on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: the llama.cpp server and model

from _common import (
    HOST,
    REPO_ROOT,
    Proc,
    free_port,
    guard_argv,
    percentile,
    process,
    table,
)

MODEL = "med"
INTERACTIVE_TIMEOUT = 120.0
BATCH_TIMEOUT = 300.0
WORDS = ("card", "task", "build", "test", "deploy", "review", "fix", "merge", "ticket", "report", "plan", "step")


# -- requests ----------------------------------------------------------------------------------------------------


def batch_body(max_tokens: int, rng: random.Random) -> bytes:
    """A short batch request with a fresh prompt (no shared prefix for llama.cpp to reuse from its cache).

    Short on purpose: the random model's vocabulary is bytes, so a prompt costs one token per byte, and a long
    one would make this a prefill benchmark on a CPU (a real Hermes prompt is prefill-heavy on a GPU too).
    """
    card = rng.randrange(1_000_000)
    prompt = f"Card {card}: {rng.choice(WORDS)} it, then report."
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
    ).encode()


def interactive_body(max_tokens: int, rng: random.Random) -> bytes:
    prompt = f"Q{rng.randrange(1_000_000)}: capital of France?"
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
    ).encode()


@dataclass
class Result:
    """One streamed request; times are seconds since the start of its way."""

    lane: str
    sent: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    outcome: str = "cut"  # ok | failed | timeout | cut (still running when the way ended)
    detail: str = ""


async def stream_chat(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str], result: Result, t0: float
) -> None:
    """POST ``body`` to ``url`` and read the stream, filling ``result``; cancellation leaves it "cut"."""
    loop = asyncio.get_running_loop()
    timeout = INTERACTIVE_TIMEOUT if result.lane == "interactive" else BATCH_TIMEOUT
    try:
        async with client.stream("POST", url, content=body, headers=headers, timeout=timeout) as response:
            if response.status_code != 200:
                text = (await response.aread())[:200].decode(errors="replace")
                result.outcome, result.detail = "failed", f"HTTP {response.status_code}: {text}"
                result.end = loop.time() - t0
                return
            last = ""
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                if result.first is None:
                    result.first = loop.time() - t0  # llama.cpp sends the role with the first token
                if line == "data: [DONE]":
                    done = True
                    break
                last = line
            result.end = loop.time() - t0
            if not done:
                result.outcome, result.detail = "failed", "stream ended without [DONE]"
                return
            usage = json.loads(last[5:]).get("usage") if last else None
            result.tokens = int(usage["completion_tokens"]) if usage else 0
            result.outcome = "ok"
    except httpx.TimeoutException as exc:
        result.outcome, result.detail = "timeout", type(exc).__name__
        result.end = loop.time() - t0
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        result.outcome, result.detail = "failed", f"{type(exc).__name__}: {exc}"
        result.end = loop.time() - t0


# -- the server's own view -----------------------------------------------------------------------------------------


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def server_held(client: httpx.AsyncClient, server: str) -> tuple[int, int]:
    text = (await client.get(server + "/metrics", timeout=5.0)).text
    return int(metric(text, "llamacpp:requests_processing")), int(metric(text, "llamacpp:requests_deferred"))


async def poll_metrics(client: httpx.AsyncClient, server: str, t0: float, samples: list[tuple[float, int]]) -> None:
    loop = asyncio.get_running_loop()
    for _ in range(100_000):  # bounded; cancelled when the way ends
        with contextlib.suppress(httpx.HTTPError, ValueError):
            processing, deferred = await server_held(client, server)
            samples.append((loop.time() - t0, processing + deferred))
        await asyncio.sleep(0.2)


async def wait_idle(client: httpx.AsyncClient, server: str, timeout: float = 60.0) -> None:
    """Until the server holds no request (aborted streams free their slots within ~20 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            if await server_held(client, server) == (0, 0):
                return
        await asyncio.sleep(0.1)
    print(f"  warning: server still busy after {timeout} s", flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), 0 when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


# -- one way --------------------------------------------------------------------------------------------------


@dataclass
class Way:
    key: str
    label: str
    url: str  # base URL the clients talk to
    _: KW_ONLY
    client_cap: int | None = None
    interactive_header: bool = False
    guard_cap: int | None = None  # guard ways: its cap and batch headroom
    guard_headroom: int = 0
    guard_pid: int | None = None


@dataclass
class WayResult:
    way: Way
    results: list[Result] = field(default_factory=list)
    held: list[tuple[float, int]] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    cpu: dict[str, float] = field(default_factory=dict)  # cores used during the window, per process
    ended: float = 0.0  # when the load stopped, seconds since the start of the way

    def interactive(self) -> list[Result]:
        lo, hi = self.window
        return [r for r in self.results if r.lane == "interactive" and lo <= r.sent < hi]

    def ttfts(self) -> list[float]:
        """Interactive TTFTs; a request still without a first token when the way ended counts with the time it
        had waited (a lower bound), so a queue that outlasts the run cannot flatter the figures."""
        out = []
        for r in self.interactive():
            if r.first is not None and r.outcome in {"ok", "cut"}:
                out.append(r.first - r.sent)
            elif r.outcome == "cut":
                out.append(self.ended - r.sent)
        return out

    def censored(self) -> int:
        """Interactive requests of the window that had no first token when the way ended."""
        return sum(1 for r in self.interactive() if r.first is None and r.outcome == "cut")

    def batch_tokens_per_second(self) -> float:
        """Batch tokens generated inside the window; a request's tokens are spread over [first token, end]."""
        lo, hi = self.window
        total = 0.0
        for r in self.results:
            if r.lane != "batch" or r.outcome != "ok" or r.first is None or r.end is None:
                continue
            span = r.end - r.first
            if span <= 0:
                total += r.tokens if lo <= r.end < hi else 0
                continue
            inside = max(0.0, min(r.end, hi) - max(r.first, lo))
            total += r.tokens * inside / span
        return total / (hi - lo)

    def tokens_per_server_cpu_second(self) -> float:
        """Batch tokens per CPU-second llama.cpp got: its batching efficiency, whatever else used the cores."""
        cores = self.cpu.get("llama.cpp", 0.0)
        return self.batch_tokens_per_second() / cores if cores > 0 else math.nan

    def count(self, outcome: str) -> int:
        lo, hi = self.window
        return sum(1 for r in self.results if r.outcome == outcome and lo <= r.sent < hi)

    def max_held(self) -> int:
        return max((n for _, n in self.held), default=0)


async def run_way(
    way: Way,
    *,
    server: str,
    batch_clients: int,
    interactive_rate: float,
    warmup: float,
    seconds: float,
    tail: float,
    max_tokens: int,
    interactive_tokens: int,
    pids: dict[str, int],
    seed: int,
) -> WayResult:
    """``batch_clients`` in a closed loop + interactive requests at ``interactive_rate``/s, open loop.

    Statistics cover requests sent in [warmup, warmup + seconds); the load goes on ``tail`` seconds more so the
    requests of the window can finish under the same load, then everything still running is cancelled.
    """
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    out = WayResult(way, window=(warmup, warmup + seconds))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with (
        httpx.AsyncClient(limits=limits, trust_env=False) as client,
        httpx.AsyncClient(trust_env=False) as probe,
    ):
        chat = way.url + "/v1/chat/completions"
        json_headers = {"content-type": "application/json"}
        interactive_headers = dict(json_headers)
        if way.interactive_header:
            interactive_headers["x-guard-lane"] = "interactive"
        sem = asyncio.Semaphore(way.client_cap) if way.client_cap else None
        t0 = loop.time()
        end_at = warmup + seconds + tail

        async def batch_loop() -> None:
            for _ in range(1_000_000):  # bounded; the deadline ends it
                if loop.time() - t0 >= end_at:
                    return
                async with sem if sem is not None else contextlib.nullcontext():
                    result = Result("batch", loop.time() - t0)
                    out.results.append(result)
                    await stream_chat(client, chat, batch_body(max_tokens, rng), json_headers, result, t0)
                if result.outcome != "ok":
                    await asyncio.sleep(1.0)  # no tight loop of failures

        async def interactive_loop(tasks: list[asyncio.Task[None]]) -> None:
            period = 1.0 / interactive_rate
            for i in range(1_000_000):
                at = t0 + i * period
                if at - t0 >= end_at:
                    return
                await asyncio.sleep(max(0.0, at - loop.time()))
                result = Result("interactive", loop.time() - t0)
                out.results.append(result)
                body = interactive_body(interactive_tokens, rng)
                tasks.append(asyncio.create_task(stream_chat(client, chat, body, interactive_headers, result, t0)))

        interactive_tasks: list[asyncio.Task[None]] = []
        poller = asyncio.create_task(poll_metrics(probe, server, t0, out.held))
        workers = [asyncio.create_task(batch_loop()) for _ in range(batch_clients)]
        if interactive_rate > 0:
            workers.append(asyncio.create_task(interactive_loop(interactive_tasks)))
        await asyncio.sleep(warmup)
        cpu_start = {name: cpu_seconds(pid) for name, pid in pids.items()}
        t_start = loop.time()
        await asyncio.sleep(max(0.0, t0 + warmup + seconds - loop.time()))
        cpu_window = loop.time() - t_start
        out.cpu = {name: (cpu_seconds(pid) - cpu_start[name]) / cpu_window for name, pid in pids.items()}
        await asyncio.sleep(max(0.0, t0 + end_at - loop.time()))
        out.ended = loop.time() - t0
        for task in [*workers, *interactive_tasks, poller]:
            task.cancel()
        await asyncio.gather(*workers, *interactive_tasks, poller, return_exceptions=True)
        await wait_idle(probe, server)
    return out


async def run_idle(server: str, count: int, interactive_tokens: int, seed: int) -> list[float]:
    """``count`` interactive requests one after another on the idle server: their TTFTs."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    ttfts = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), trust_env=False) as client:
        for i in range(count + 2):
            t0 = loop.time()
            result = Result("interactive", 0.0)
            body = interactive_body(interactive_tokens, rng)
            await stream_chat(client, server + "/v1/chat/completions", body, {}, result, t0)
            if result.outcome != "ok" or result.first is None:
                raise RuntimeError(f"idle request failed: {result.detail}")
            if i >= 2:  # two warm-up requests
                ttfts.append(result.first)
            await asyncio.sleep(0.2)
    return ttfts


async def run_sweep(
    server: str, levels: list[int], warmup: float, seconds: float, max_tokens: int, pids: dict[str, int], seed: int
) -> tuple[dict[int, float], dict[int, float]]:
    """Batch tokens/s, and tokens per llama.cpp CPU-second, directly on the server at each concurrency."""
    out, per_cpu = {}, {}
    for c in levels:
        way = Way(f"c{c}", f"direct, {c} clients", server)
        r = await run_way(
            way,
            server=server,
            batch_clients=c,
            interactive_rate=0.0,
            warmup=warmup,
            seconds=seconds,
            tail=2.0,
            max_tokens=max_tokens,
            interactive_tokens=1,
            pids=pids,
            seed=seed + c,
        )
        r.results = [x for x in r.results if x.lane == "batch"]
        out[c] = r.batch_tokens_per_second()
        per_cpu[c] = r.tokens_per_server_cpu_second()
        print(
            f"  concurrency {c}: {out[c]:6.1f} batch tokens/s, {per_cpu[c]:6.1f} per llama.cpp CPU-s,"
            f" server held at most {r.max_held()}",
            flush=True,
        )
    return out, per_cpu


# -- servers ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def llamacpp(slots: int, threads: int, ctx: int) -> Iterator[Proc]:
    from tests.support.llamacpp import ensure_model

    model = ensure_model(MODEL)
    port = free_port()
    argv = [sys.executable, str(REPO_ROOT / "tests/support/llamacpp.py"), "serve", "--model", str(model)]
    argv += ["--port", str(port), "--slots", str(slots), "--ctx", str(ctx), "--threads", str(threads)]
    with process("llama.cpp", argv, f"http://{HOST}:{port}", timeout=60) as proc:
        yield proc


@contextlib.contextmanager
def guard(upstream: str, cap: int, headroom: int) -> Iterator[Proc]:
    port = free_port()
    env = {"GUARD__LANES__BATCH__HEADROOM": str(headroom)}
    argv = guard_argv(port, upstream, cap, "--log-level", "warning")
    with process("guard", argv, f"http://{HOST}:{port}", health="/guard/ready", env=env) as proc:
        yield proc


# -- report -----------------------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


@dataclass
class Report:
    idle: list[float]
    sweep: dict[int, float]
    sweep_cpu: dict[int, float]
    ways: list[WayResult]
    args: argparse.Namespace
    started: str
    elapsed: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start and at the end

    @property
    def knee(self) -> tuple[int, float]:
        c = max(self.sweep, key=lambda k: self.sweep[k])
        return c, self.sweep[c]

    @property
    def knee_cpu(self) -> tuple[int, float]:
        c = max(self.sweep_cpu, key=lambda k: self.sweep_cpu[k])
        return c, self.sweep_cpu[c]

    def rows(self) -> list[list[str]]:
        idle50, idle95 = percentile(self.idle, 50), percentile(self.idle, 95)
        _, knee = self.knee
        _, knee_cpu = self.knee_cpu
        rows = []
        for w in self.ways:
            t = w.ttfts()
            p50, p95 = percentile(t, 50), percentile(t, 95)
            tps = w.batch_tokens_per_second()
            at_least = ">= " if w.censored() else ""
            rows.append(
                [
                    w.way.label,
                    at_least + ms(p50),
                    at_least + ms(p95),
                    f"{p50 / idle50:.1f}x",
                    f"{p95 / idle95:.1f}x",
                    f"{w.censored()} of {len(w.interactive())}",
                    f"{tps:.0f}",
                    f"{tps / knee:.2f}",
                    f"{w.tokens_per_server_cpu_second():.0f}",
                    f"{w.tokens_per_server_cpu_second() / knee_cpu:.2f}",
                    str(w.count("failed")),
                    str(w.count("timeout")),
                    str(w.max_held()),
                    f"{w.cpu.get('guard', 0.0):.2f}" if w.way.guard_pid else "-",
                ]
            )
        return rows

    HEADERS = (
        "way",
        "interactive TTFT p50 ms",
        "p95 ms",
        "p50 / idle",
        "p95 / idle",
        "interactive never answered",
        "batch tok/s",
        "/ knee",
        "batch tok per llama.cpp CPU-s",
        "/ knee",
        "failed",
        "timed out",
        "server held (max)",
        "guard CPU (cores)",
    )

    def verdicts(self) -> list[str]:
        idle95 = percentile(self.idle, 95)
        _, knee = self.knee
        _, knee_cpu = self.knee_cpu
        lines = []
        for w in self.ways:
            cap = w.way.guard_cap
            if cap is None:
                continue
            p95 = percentile(w.ttfts(), 95)
            tps = w.batch_tokens_per_second()
            failed = w.count("failed") + w.count("timeout")
            checks = [
                f"TTFT p95 {p95 / idle95:.2f}x idle (target <= 1.3x: {'met' if p95 <= 1.3 * idle95 else 'MISSED'})",
                f"batch {tps / knee:.2f}x knee (target >= 0.95: {'met' if tps >= 0.95 * knee else 'MISSED'};"
                f" per llama.cpp CPU-s {w.tokens_per_server_cpu_second() / knee_cpu:.2f}x)",
                f"{failed} failed or timed out (target 0: {'met' if failed == 0 else 'MISSED'})",
                f"server held at most {w.max_held()} (cap {cap}: {'met' if w.max_held() <= cap else 'MISSED'})",
            ]
            lines.append(f"{w.way.label}: " + "; ".join(checks))
        return lines

    def markdown(self) -> str:
        a = self.args
        c, knee = self.knee
        idle50, idle95 = percentile(self.idle, 50), percentile(self.idle, 95)
        sweep = table(
            ["batch clients (direct)", *map(str, self.sweep)],
            [
                ["tokens/s", *map(_f0, self.sweep.values())],
                ["tokens per llama.cpp CPU-s", *map(_f0, self.sweep_cpu.values())],
            ],
        )
        failures = [
            f"- {w.way.label}: {r.outcome} {r.detail}"
            for w in self.ways
            for r in w.results
            if r.outcome in {"failed", "timeout"} and w.window[0] <= r.sent < w.window[1]
        ]
        cpu_rows = [
            [w.way.label, *(f"{w.cpu.get(n, 0.0):.2f}" for n in ("llama.cpp", "load generator", "guard"))]
            for w in self.ways
        ]
        return "\n".join(
            [
                "# Flood benchmark",
                "",
                f"`{self.command()}` - run {self.started}, {self.elapsed / 60:.1f} min, on {machine()};"
                f" 1-minute load average {self.load[0]:.1f} at the start, {self.load[1]:.1f} at the end"
                " (other work shared the machine).",
                "",
                f"llama.cpp (xllamacpp), random-weight `{MODEL}` model, {a.slots} slots, {a.threads} thread(s),"
                f" context {a.ctx}; every request streams with `ignore_eos`. Flood: {a.batch_clients} batch clients"
                f" in a closed loop ({a.max_tokens} tokens each) + {a.interactive_rate:g} interactive request/s"
                f" ({a.interactive_tokens} tokens), {a.seconds:g} s measured per way after {a.warmup:g} s of"
                f" warm-up.",
                "",
                f"Idle TTFT (interactive request alone, {len(self.idle)} requests, half before the ways, half after):"
                f" p50 {ms(idle50)} ms,"
                f" p95 {ms(idle95)} ms. Knee: {_f0(knee)} batch tokens/s at {c} clients;"
                f" {_f0(self.knee_cpu[1])} tokens per llama.cpp CPU-second at {self.knee_cpu[0]} clients.",
                "",
                "![flood](flood.png)",
                "",
                table(self.HEADERS, self.rows()),
                "",
                "Targets (issue 6):",
                "",
                *[f"- {line}" for line in self.verdicts()],
                "",
                "Concurrency sweep, directly on the server (the knee):",
                "",
                sweep,
                "",
                "CPU used during each way (cores; the machine has " + str(os.cpu_count()) + "):",
                "",
                table(["way", "llama.cpp", "load generator", "guard"], cpu_rows),
                "",
                "Failed or timed-out requests:" if failures else "No request failed or timed out.",
                *failures[:20],
                "",
            ]
        )

    def command(self) -> str:
        return "python benchmarks/flood.py " + " ".join(sys.argv[1:])


def _f0(x: float) -> str:
    return f"{x:.0f}"


def machine() -> str:
    return (
        f"{os.cpu_count()} cores, no GPU, {platform.system()} {platform.machine()}, Python {platform.python_version()}"
    )


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    ax_ttft, ax_held, ax_tps, ax_sweep = axes[0][0], axes[0][1], axes[1][0], axes[1][1]
    colors = ["tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown"]
    idle95 = percentile(report.idle, 95)
    for w, color in zip(report.ways, colors, strict=False):
        points = [(r.sent, r.first - r.sent) for r in w.results if r.lane == "interactive" and r.first is not None]
        points.sort()
        waiting = [(r.sent, w.ended - r.sent) for r in w.results if r.lane == "interactive" and r.first is None]
        if waiting:
            ax_ttft.plot(
                [p[0] for p in waiting],
                [p[1] * 1000 for p in waiting],
                "^",
                color=color,
                markersize=4,
                fillstyle="none",
            )
        ax_ttft.plot(
            [p[0] for p in points],
            [p[1] * 1000 for p in points],
            ".-",
            color=color,
            label=w.way.label,
            markersize=3,
            linewidth=0.8,
        )
        ax_held.step(
            [t for t, _ in w.held], [n for _, n in w.held], where="post", color=color, label=w.way.label, linewidth=1
        )
    ax_ttft.axhline(idle95 * 1000, color="black", linestyle="--", linewidth=1, label="idle p95")
    ax_ttft.axhline(idle95 * 1300, color="grey", linestyle=":", linewidth=1, label="1.3x idle p95 (target)")
    ax_ttft.axvspan(*report.ways[0].window, color="grey", alpha=0.06)
    ax_ttft.set_yscale("log")
    ax_ttft.set_xlabel("seconds into the way (shaded: measured window; open triangles: no first token at the end)")
    ax_ttft.set_ylabel("interactive time to first token, ms (log)")
    ax_ttft.set_title("Interactive TTFT under the flood")
    ax_ttft.legend(fontsize=7)
    ax_held.axhline(report.args.slots, color="black", linestyle="--", linewidth=1, label=f"slots ({report.args.slots})")
    ax_held.set_xlabel("seconds into the way")
    ax_held.set_ylabel("requests held by llama.cpp (processing + deferred)")
    ax_held.set_title("What the server holds (its /metrics)")
    ax_held.legend(fontsize=7)
    _, knee = report.knee
    labels = [w.way.label for w in report.ways]
    values = [w.batch_tokens_per_second() for w in report.ways]
    ax_tps.bar(range(len(values)), values, color=colors[: len(values)])
    ax_tps.axhline(knee, color="black", linestyle="--", linewidth=1, label="knee (best direct)")
    ax_tps.axhline(0.95 * knee, color="grey", linestyle=":", linewidth=1, label="0.95x knee (target)")
    ax_tps.set_xticks(range(len(values)), labels, rotation=12, fontsize=7)
    ax_tps.set_ylabel("batch tokens/s")
    ax_tps.set_title("Batch throughput under the flood")
    ax_tps.legend(fontsize=7, loc="lower right")
    ax_sweep.plot(list(report.sweep), list(report.sweep.values()), "o-", color="black")
    ax_sweep.set_xlabel("batch clients, directly on the server")
    ax_sweep.set_ylabel("tokens/s")
    ax_sweep.set_title("Concurrency sweep (the knee)")
    ax_sweep.set_ylim(bottom=0)
    fig.suptitle(
        f"Flood: {report.args.batch_clients} batch clients + {report.args.interactive_rate:g} interactive/s,"
        f" llama.cpp {MODEL} model, {report.args.slots} slots ({machine()})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------------------------


def parse_variant(text: str) -> tuple[int, int]:
    try:
        cap, headroom = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CAP:HEADROOM such as 5:1, got {text!r}") from None
    if cap < 1 or not 0 <= headroom < cap:
        raise argparse.ArgumentTypeError(f"need CAP >= 1 and 0 <= HEADROOM < CAP, got {text!r}")
    return cap, headroom


async def main_async(args: argparse.Namespace) -> Report:
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    t_start = time.monotonic()
    load_start = os.getloadavg()[0]
    print(f"{machine()}; load average {load_start:.2f}", flush=True)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(llamacpp(args.slots, args.threads, args.ctx))
        pids = {"llama.cpp": server.popen.pid, "load generator": os.getpid()}
        print(f"llama.cpp {MODEL}: {server.url}, {args.slots} slots, {args.threads} thread(s)", flush=True)
        print(f"idle: {args.idle_requests} interactive requests alone", flush=True)
        idle = await run_idle(server.url, args.idle_requests, args.interactive_tokens, args.seed)
        print(f"  TTFT p50 {ms(percentile(idle, 50))} ms, p95 {ms(percentile(idle, 95))} ms", flush=True)
        print(f"knee: concurrency {args.sweep[0]}..{args.sweep[-1]}, {args.sweep_seconds:g} s each", flush=True)
        sweep, sweep_cpu = await run_sweep(
            server.url, args.sweep, 3.0, args.sweep_seconds, args.max_tokens, pids, args.seed
        )
        ways = [
            Way("direct", "(a) direct", server.url),
            Way("client-cap", f"(b) client semaphore {args.slots}", server.url, client_cap=args.slots),
        ]
        configs = [(args.slots, 1), *args.guard_variant]
        results = []
        for i, (cap, headroom) in enumerate(configs):
            letter = "c" if i == 0 else chr(ord("d") + i - 1)
            label = f"({letter}) guard cap {cap}, batch headroom {headroom}"
            ways.append(
                Way(
                    f"guard-{cap}-{headroom}",
                    label,
                    "",
                    interactive_header=True,
                    guard_cap=cap,
                    guard_headroom=headroom,
                )
            )
        for way in ways:
            print(
                f"{way.label}: {args.batch_clients} batch clients + {args.interactive_rate:g} interactive/s,"
                f" {args.warmup:g} + {args.seconds:g} + {args.tail:g} s",
                flush=True,
            )
            with contextlib.ExitStack() as way_stack:
                way_pids = dict(pids)
                if way.guard_cap is not None:
                    g = way_stack.enter_context(guard(server.url, way.guard_cap, way.guard_headroom))
                    way.url, way.guard_pid = g.url, g.popen.pid
                    way_pids["guard"] = g.popen.pid
                result = await run_way(
                    way,
                    server=server.url,
                    batch_clients=args.batch_clients,
                    interactive_rate=args.interactive_rate,
                    warmup=args.warmup,
                    seconds=args.seconds,
                    tail=args.tail,
                    max_tokens=args.max_tokens,
                    interactive_tokens=args.interactive_tokens,
                    pids=way_pids,
                    seed=args.seed + 100,
                )
            t = result.ttfts()
            print(
                f"  TTFT p50 {ms(percentile(t, 50))} ms p95 {ms(percentile(t, 95))} ms,"
                f" batch {result.batch_tokens_per_second():.0f} tok/s, failed {result.count('failed')},"
                f" timed out {result.count('timeout')}, server held max {result.max_held()},"
                f" cpu {', '.join(f'{k} {v:.2f}' for k, v in result.cpu.items())}",
                flush=True,
            )
            results.append(result)
        print(f"idle again: {args.idle_requests} interactive requests alone", flush=True)
        idle_after = await run_idle(server.url, args.idle_requests, args.interactive_tokens, args.seed + 7)
        print(f"  TTFT p50 {ms(percentile(idle_after, 50))} ms, p95 {ms(percentile(idle_after, 95))} ms", flush=True)
        idle += idle_after
    report = Report(idle, sweep, sweep_cpu, results, args, started)
    report.elapsed = time.monotonic() - t_start
    report.load = (load_start, os.getloadavg()[0])
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=4, help="llama.cpp parallel slots (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1; see docs)")
    parser.add_argument("--ctx", type=int, default=4096, help="llama.cpp context shared by the slots")
    parser.add_argument("--batch-clients", type=int, default=40)
    parser.add_argument("--interactive-rate", type=float, default=1.0, help="interactive requests per second")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per batch reply (default 32)")
    parser.add_argument("--interactive-tokens", type=int, default=8, help="tokens per interactive reply (8)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of flood before measuring (10)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds per way (default 60)")
    parser.add_argument("--tail", type=float, default=20.0, help="seconds of flood after the window (20)")
    parser.add_argument("--idle-requests", type=int, default=10, help="idle requests before and after the ways")
    parser.add_argument(
        "--sweep",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(range(1, 9)),
        help="concurrency levels of the knee sweep (default 1,...,8)",
    )
    parser.add_argument("--sweep-seconds", type=float, default=8.0)
    parser.add_argument(
        "--guard-variant",
        type=parse_variant,
        action="append",
        default=None,
        help="extra guard way CAP:HEADROOM, repeatable (default: slots+1:1)",
    )
    parser.add_argument("--no-variant", action="store_true", help="only the guard with cap = slots, headroom 1")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "docs", help="where flood.png/.md go")
    args = parser.parse_args()
    if args.guard_variant is None:
        args.guard_variant = [] if args.no_variant else [(args.slots + 1, 1)]
    if min(args.slots, args.batch_clients, args.max_tokens) < 1 or args.seconds <= 0:
        parser.error("--slots, --batch-clients, --max-tokens must be >= 1 and --seconds > 0")

    report = asyncio.run(main_async(args))
    print()
    print(
        f"idle TTFT p50 {ms(percentile(report.idle, 50))} ms, p95 {ms(percentile(report.idle, 95))} ms;"
        f" knee {report.knee[1]:.0f} tok/s at {report.knee[0]} clients; sweep "
        + ", ".join(f"{c}:{v:.0f}" for c, v in report.sweep.items())
    )
    print(table(report.HEADERS, report.rows()))
    print()
    for line in report.verdicts():
        print(line)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "flood.md").write_text(report.markdown())
    plot(report, args.out_dir / "flood.png")
    print(f"\nwrote {args.out_dir / 'flood.md'} and {args.out_dir / 'flood.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
