"""The adaptive cap against a fixed cap, on a real llama.cpp server, in one run.

1. starts llama.cpp's own server (xllamacpp, the random-weight ``--model`` of ``tests/support/llamacpp.py``,
   default "med", ``--slots`` 4); every request sends ``ignore_eos`` so each reply is exactly max_tokens long;
2. **fixed**: ``gateway-guard --max-inflight SLOTS`` (the right number, found by hand);
3. **adaptive**: the same guard with ``limit = "adaptive"``, ``ceiling`` 16 (starting wrong, at 16) and
   ``probe_interval`` 0.5 s (config given as ``GUARD__UPSTREAMS__DEFAULT__*`` environment overrides).

The ways run in ABBA order (``--rounds`` 2: fixed, adaptive, adaptive, fixed), so that a warming server or a
neighbour's load does not favour one. Each run is a fresh guard (the adaptive one starts at 16 every time) and
the same closed loop of ``--clients`` (16) non-streamed chat requests for ``--seconds``, on the
``--lane`` (default ``interactive``: no headroom, so the whole limit can be filled; ``batch`` keeps one slot
for interactive requests). Every 0.25 s it samples the guard's limit (``/guard/capacity``) and the server's
``llamacpp:requests_processing`` / ``requests_deferred``. It prints the adaptive limit's trajectory (each change
with its reason) and, per way: completion tokens/s (from ``usage``) and its ratio to the fixed cap, request
latency p50/p95, the share of samples with requests deferred by the server after the first 2 s, and the mean
limit, per run and over all runs of a way.

Usage: ``.venv/bin/python benchmarks/adaptive.py [--seconds 40] [--clients 16] [--model med] [--lane batch]``
(about 3 minutes with the defaults on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: the llama.cpp server and model

from _common import HOST, REPO_ROOT, Proc, free_port, guard_argv, percentile, process, table

SETTLE = 2.0  # seconds after which deferred requests count against a way


@dataclass
class Way:
    name: str
    tokens: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # t, limit, processing, deferred
    changes: list[tuple[float, int, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def deferred_share(self) -> float:
        late = [d for t, _, _, d in self.samples if t >= SETTLE]
        return sum(1 for d in late if d > 0) / len(late) if late else float("nan")

    def mean_limit(self) -> float:
        late = [lim for t, lim, _, _ in self.samples if t >= SETTLE]
        return sum(late) / len(late) if late else float("nan")


@contextlib.contextmanager
def llamacpp(model: str, slots: int, threads: int) -> Iterator[Proc]:
    from tests.support.llamacpp import ensure_model

    path = ensure_model(model)
    port = free_port()
    argv = [sys.executable, str(REPO_ROOT / "tests/support/llamacpp.py"), "serve", "--model", str(path)]
    argv += ["--port", str(port), "--slots", str(slots), "--ctx", str(slots * 1024), "--threads", str(threads)]
    with process("llama.cpp", argv, f"http://{HOST}:{port}", timeout=60) as proc:
        yield proc


@contextlib.contextmanager
def guard(upstream: str, cap: int, adaptive: bool) -> Iterator[Proc]:
    port = free_port()
    env = {}
    if adaptive:
        env = {
            "GUARD__UPSTREAMS__DEFAULT__LIMIT": '"adaptive"',
            "GUARD__UPSTREAMS__DEFAULT__CEILING": "16",
            "GUARD__UPSTREAMS__DEFAULT__PROBE_INTERVAL": "0.5",
        }
    argv = guard_argv(port, upstream, 16 if adaptive else cap, "--log-level", "warning")
    with process("guard", argv, f"http://{HOST}:{port}", health="/guard/ready", env=env) as proc:
        yield proc


def metric(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return round(float(line.split()[1]))
    return 0


async def sample(client: httpx.AsyncClient, guard_url: str, server: str, way: Way, t0: float) -> None:
    while True:
        now = time.monotonic() - t0
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            up = (await client.get(f"{guard_url}/guard/capacity")).json()["upstreams"]["default"]
            text = (await client.get(f"{server}/metrics")).text
            limit = int(up["limit"])
            way.samples.append(
                (now, limit, metric(text, "llamacpp:requests_processing"), metric(text, "llamacpp:requests_deferred"))
            )
            if not way.changes or way.changes[-1][1] != limit:
                way.changes.append((now, limit, str(up.get("limit_reason"))))
        await asyncio.sleep(0.25)  # sampling other processes' gauges: there is no event to wait on


async def client_loop(
    client: httpx.AsyncClient, url: str, body: dict[str, object], lane: str, way: Way, end: float
) -> None:
    while time.monotonic() < end:
        started = time.monotonic()
        try:
            r = await client.post(f"{url}/v1/chat/completions", json=body, headers={"x-guard-lane": lane})
        except httpx.HTTPError:
            way.errors += 1
            continue
        if r.status_code != 200:
            way.errors += 1
            await asyncio.sleep(0.1)
            continue
        if time.monotonic() <= end:  # a reply that ends after the window is not counted
            way.tokens += r.json()["usage"]["completion_tokens"]
            way.latencies.append(time.monotonic() - started)


async def run_way(name: str, server: str, args: argparse.Namespace, adaptive: bool) -> Way:
    way = Way(name)
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": "Card 17: build it, then report."}],
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
    }
    with guard(server, args.slots, adaptive) as g:
        limits = httpx.Limits(max_connections=args.clients + 4)
        async with httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) as client:
            t0 = time.monotonic()
            end = t0 + args.seconds
            sampler = asyncio.create_task(sample(client, g.url, server, way, t0))
            await asyncio.gather(*(client_loop(client, g.url, body, args.lane, way, end) for _ in range(args.clients)))
            way.seconds = args.seconds
            sampler.cancel()
    return way


def row(way: Way, base: float) -> list[str]:
    return [
        way.name,
        f"{way.tokens_per_second:.0f}",
        f"{way.tokens_per_second / base:.3f}" if base else "-",
        f"{percentile(way.latencies, 50):.2f}",
        f"{percentile(way.latencies, 95):.2f}",
        f"{way.deferred_share():.1%}",
        f"{way.mean_limit():.2f}",
        str(way.errors),
    ]


def merged(name: str, runs: list[Way]) -> Way:
    way = Way(name, seconds=sum(r.seconds for r in runs), errors=sum(r.errors for r in runs))
    way.tokens = sum(r.tokens for r in runs)
    way.latencies = [x for r in runs for x in r.latencies]
    way.samples = [x for r in runs for x in r.samples]
    return way


def report(runs: list[Way], args: argparse.Namespace) -> str:
    lines = []
    for way in runs:
        if way.name.startswith("adaptive"):
            lines += [f"trajectory of {way.name}:"]
            lines += [f"  t={t:6.2f}s  limit={lim:2d}  {reason}" for t, lim, reason in way.changes]
    fixed = merged(f"fixed cap {args.slots}, all runs", [w for w in runs if w.name.startswith("fixed")])
    adaptive = merged("adaptive, all runs", [w for w in runs if w.name.startswith("adaptive")])
    base = fixed.tokens_per_second
    rows = [row(w, base) for w in runs] + [row(fixed, base), row(adaptive, base)]
    headers = ["run", "tokens/s", "vs fixed", "latency p50 s", "p95 s", "samples deferred>0", "mean limit", "errors"]
    lines += ["", table(headers, rows)]
    setup = f"model {args.model}, {args.slots} slots, {args.clients} clients, lane {args.lane}"
    setup += f", {args.seconds:.0f} s per run, max_tokens {args.max_tokens}"
    lines += ["", f"{setup}; deferred share and mean limit from {SETTLE} s on; 'vs fixed' = over all fixed runs"]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> str:
    with llamacpp(args.model, args.slots, args.threads) as server:
        async with httpx.AsyncClient(timeout=120, trust_env=False) as client:  # warm the server up
            warm = {"model": args.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
            await asyncio.gather(*(client.post(f"{server.url}/v1/chat/completions", json=warm) for _ in range(4)))
        runs = []
        for i in range(args.rounds):
            order = (False, True) if i % 2 == 0 else (True, False)  # ABBA
            for adaptive in order:
                name = f"adaptive (ceiling 16) #{i + 1}" if adaptive else f"fixed cap {args.slots} #{i + 1}"
                runs.append(await run_way(name, server.url, args, adaptive=adaptive))
    return report(runs, args)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=40.0, help="load per way (default 40)")
    p.add_argument("--clients", type=int, default=16, help="closed-loop clients (default 16)")
    p.add_argument("--slots", type=int, default=4, help="llama.cpp slots, and the fixed cap (default 4)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    p.add_argument("--model", default="med", help="tests/support/llamacpp.py model size (default med)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (default 64)")
    p.add_argument("--lane", default="interactive", help="lane of the load (default interactive: no headroom)")
    p.add_argument("--rounds", type=int, default=2, help="fixed/adaptive pairs, in ABBA order (default 2)")
    args = p.parse_args()
    print(asyncio.run(main_async(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
