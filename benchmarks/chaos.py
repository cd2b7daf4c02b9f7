"""A bounded chaos soak: the guard in front of a real llama.cpp server at 3x its cap, with every kind of client
misbehaviour at once and the server killed (SIGKILL) and restarted on the same port.

One command, one run, on 127.0.0.1:

1. starts llama.cpp's own server (xllamacpp, the random-weight model of ``tests/support/llamacpp.py``, 4 slots)
   and ``gateway-guard`` (its own process, cap ``--cap``, batch lane without headroom, a ``hurried`` lane whose
   queue deadline is 0.3 s);
2. runs, for ``--seconds``, 3x the cap in closed-loop clients, each of one class:
   ``full_stream`` and ``full_call`` (batch, read to the end), ``abandoned_stream`` and ``abandoned_call``
   (batch, 300 tokens, the client gives up after 0.2-0.8 s), ``queue_timeout`` (the hurried lane: served or
   refused with 429 + Retry-After), plus ``bad_json`` (a malformed body every 0.2 s: 400) and ``interactive``
   (one short stream a second, ``X-Guard-Lane: interactive``, open loop);
3. kills the server ``--kills`` times, evenly spaced, and starts it again ``--outage`` seconds later.

It prints, side by side with the targets of issue 14: the most the server held (``llamacpp:requests_processing
+ requests_deferred`` sampled every 20 ms) against the cap, each class's requests by how they ended (a
``failed`` one is a failure the guard should have prevented; a ``cut`` one is a stream already relaying when the
server died, ended by the documented SSE error event), the permits left once the clients are gone, and the
guard's RSS before (after a warm-up) and after.

Usage: ``.venv/bin/python benchmarks/chaos.py [--seconds 600] [--model med] [--cap 2] [--kills 1] [--outage 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: llama.cpp, the guard, the sampler

from tests.support.outage import (
    HeldSampler,
    Restartable,
    guard_with_config,
    restartable_llamacpp,
    rss_kib,
    write_guard_config,
)

CHAT = "/v1/chat/completions"
HURRIED = """
[lanes.hurried]
priority = 1
queue_size = 64
queue_timeout = 0.3
"""
Outcomes = dict[str, Counter[str]]


def chat(model: str, tokens: int, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": tokens,
        "ignore_eos": True,  # random weights: exactly max_tokens
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def read_stream(response: httpx.Response) -> str:
    """``ok`` ([DONE] after usage), ``cut`` (content, then the SSE error event), else what went wrong."""
    began = finished = errored = False
    async for line in response.aiter_lines():
        if line == "data: [DONE]":
            finished = True
        elif line.startswith("data: "):
            event = json.loads(line.removeprefix("data: "))
            errored = errored or "error" in event
            began = began or bool(event.get("choices"))
    if finished and not errored:
        return "ok"
    return "cut" if began and errored else "failed:stream-ended-without-done"


class Soak:
    def __init__(self, guard: str, model: str, until: float) -> None:
        self.guard, self.model, self.until = guard, model, until
        self.seconds = until - time.monotonic()
        self.outcomes: Outcomes = defaultdict(Counter)
        self.details: list[str] = []
        self.failed_at: list[float] = []  # seconds since the start of the soak

    def note(self, cls: str, result: str, detail: str = "") -> None:
        self.outcomes[cls][result] += 1
        if result.startswith("failed"):
            at = time.monotonic() - (self.until - self.seconds)
            self.failed_at.append(at)
            if len(self.details) < 20:
                self.details.append(f"{cls} at {at:.1f} s: {result} {detail[:160]}")

    async def full(self, client: httpx.AsyncClient, *, stream: bool) -> None:
        cls = "full_stream" if stream else "full_call"
        body = chat(self.model, 32, stream=stream)
        try:
            if stream:
                async with client.stream("POST", f"{self.guard}{CHAT}", json=body) as response:
                    if response.status_code != 200:
                        self.note(cls, f"failed:{response.status_code}", (await response.aread()).decode())
                        return
                    self.note(cls, await read_stream(response))
            else:
                response = await client.post(f"{self.guard}{CHAT}", json=body)
                if response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 32:
                    self.note(cls, "ok")
                else:
                    self.note(cls, f"failed:{response.status_code}", response.text)
        except httpx.HTTPError as exc:
            self.note(cls, f"failed:{type(exc).__name__}")

    async def abandoned(self, client: httpx.AsyncClient, *, stream: bool) -> None:
        cls = "abandoned_stream" if stream else "abandoned_call"
        body = chat(self.model, 300, stream=stream)
        try:
            async with asyncio.timeout(random.uniform(0.2, 0.8)):
                if stream:
                    async with client.stream("POST", f"{self.guard}{CHAT}", json=body) as response:
                        async for _ in response.aiter_raw():
                            pass
                        self.note(cls, "ok" if response.status_code == 200 else f"failed:{response.status_code}")
                else:
                    response = await client.post(f"{self.guard}{CHAT}", json=body)
                    self.note(cls, "ok" if response.status_code == 200 else f"failed:{response.status_code}")
        except TimeoutError:
            self.note(cls, "abandoned")
        except httpx.HTTPError as exc:
            self.note(cls, f"failed:{type(exc).__name__}")

    async def queue_timeout(self, client: httpx.AsyncClient) -> None:
        body = chat(self.model, 32, stream=False)
        try:
            response = await client.post(f"{self.guard}{CHAT}", json=body, headers={"X-Guard-Lane": "hurried"})
        except httpx.HTTPError as exc:
            self.note("queue_timeout", f"failed:{type(exc).__name__}")
            return
        if response.status_code == 200:
            self.note("queue_timeout", "ok")
        elif response.status_code == 429 and response.headers.get("retry-after", "").isdigit():
            self.note("queue_timeout", "refused-429")
            await asyncio.sleep(0.2)  # a client would wait Retry-After; this one comes back soon to keep the pressure
        else:
            self.note("queue_timeout", f"failed:{response.status_code}", response.text)

    async def bad_json(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            f"{self.guard}{CHAT}", content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}
        )
        self.note("bad_json", "refused-400" if response.status_code == 400 else f"failed:{response.status_code}")
        await asyncio.sleep(0.2)

    async def interactive(self, client: httpx.AsyncClient) -> None:
        body = chat(self.model, 8, stream=True)
        headers = {"X-Guard-Lane": "interactive"}
        try:
            async with client.stream("POST", f"{self.guard}{CHAT}", json=body, headers=headers) as response:
                if response.status_code != 200:
                    self.note("interactive", f"failed:{response.status_code}", (await response.aread()).decode())
                    return
                self.note("interactive", await read_stream(response))
        except httpx.HTTPError as exc:
            self.note("interactive", f"failed:{type(exc).__name__}")

    async def loop(self, one: Callable[[], Coroutine[Any, Any, None]], *, every: float | None = None) -> None:
        """Closed loop (``every`` None) or one start every ``every`` seconds, until the end of the soak."""
        pending: set[asyncio.Task[None]] = set()
        while time.monotonic() < self.until:
            if every is None:
                await one()
            else:
                task = asyncio.create_task(one())
                pending.add(task)
                task.add_done_callback(pending.discard)
                await asyncio.sleep(every)
        if pending:
            await asyncio.wait(pending)


async def chaos(llama: Restartable, guard: str, guard_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=5.0), limits=limits) as client:
        warm = Soak(guard, args.model, time.monotonic() + 3)  # warm-up: every path once before RSS is read
        await asyncio.gather(warm.full(client, stream=True), warm.full(client, stream=False), warm.bad_json(client))
        rss_before = rss_kib(guard_pid)
        started = time.monotonic()
        soak = Soak(guard, args.model, started + args.seconds)
        n = args.cap * 3
        classes: list[Callable[[], Coroutine[Any, Any, None]]] = [
            lambda: soak.full(client, stream=True),
            lambda: soak.full(client, stream=False),
            lambda: soak.abandoned(client, stream=True),
            lambda: soak.abandoned(client, stream=False),
            lambda: soak.queue_timeout(client),
        ]
        clients = [soak.loop(classes[i % len(classes)]) for i in range(n)]
        clients += [soak.loop(lambda: soak.bad_json(client)), soak.loop(lambda: soak.interactive(client), every=1.0)]
        kills: list[tuple[float, float]] = []

        async def killer() -> None:
            for k in range(args.kills):
                at = started + args.seconds * (k + 1) / (args.kills + 1)
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                killed = time.monotonic()
                llama.kill()
                await asyncio.sleep(args.outage)
                await asyncio.to_thread(llama.start)
                kills.append((killed - started, time.monotonic() - killed))

        with HeldSampler(llama.url) as sampler:
            async with asyncio.timeout(args.seconds + 300):
                await asyncio.gather(*clients, killer())
            ended = time.monotonic()
            permits_left = None
            for _ in range(100):  # the last permits come back within the abort grace: up to 5 s
                up = (await client.get(f"{guard}/guard/capacity")).json()["upstreams"]["default"]
                permits_left = up["in_flight"] + up["queued"]
                if not permits_left:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(max(0.0, ended + 2.2 - time.monotonic()))
        rss_after = rss_kib(guard_pid)
    return {
        "soak": soak,
        "kills": kills,
        "most_held": sampler.most,
        "over_cap": [(round(at - started, 2), held) for at, held in sampler.samples if held > args.cap],
        "samples": len(sampler.samples),
        "unanswered": sampler.unanswered,
        "held_2s_after": max(sampler.held_at(ended + 2.0), default=None),
        "permits_left": permits_left,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "duration": ended - started,
    }


def report(result: dict[str, Any], args: argparse.Namespace) -> bool:
    soak: Soak = result["soak"]
    cap = args.cap
    print(
        f"\nchaos soak: {result['duration']:.0f} s, model {args.model}, cap {cap} (server: 4 slots), "
        f"{3 * cap} closed-loop clients + bad JSON + 1 interactive/s"
    )
    for at, lasted in result["kills"]:
        print(f"  llama.cpp killed (SIGKILL) at {at:.1f} s, back {lasted:.1f} s later (same port)")
    print(f"\n{'class':<18}{'requests':>9}  outcomes")
    failed_total = 0
    for cls in (
        "full_stream",
        "full_call",
        "abandoned_stream",
        "abandoned_call",
        "queue_timeout",
        "bad_json",
        "interactive",
    ):
        counts = soak.outcomes.get(cls, Counter())
        failed = sum(v for k, v in counts.items() if k.startswith("failed"))
        failed_total += failed
        shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"{cls:<18}{sum(counts.values()):>9}  {shown}")
    cut = sum(c.get("cut", 0) for c in soak.outcomes.values())
    # A failure from the kill itself or the restart: from the kill to 3 s after the server was back.
    by_outage = sum(1 for t in soak.failed_at if any(at <= t <= at + lasted + 3 for at, lasted in result["kills"]))
    elsewhere = failed_total - by_outage
    growth = (result["rss_after"] - result["rss_before"]) / 1024
    rows = [
        (
            "server held, most (processing + deferred)",
            f"{result['most_held']} (cap {cap})",
            f"<= {cap}",
            result["most_held"] <= cap,
        ),
        ("server held 2 s after the clients left", str(result["held_2s_after"]), "0", result["held_2s_after"] == 0),
        ("requests failed by the outage (kill .. back + 3 s)", str(by_outage), "0", by_outage == 0),
        ("requests failed at other times", str(elsewhere), "0", elsewhere == 0),
        ("streams cut by a kill (SSE error event)", str(cut), f"<= {cap} per kill", cut <= cap * max(1, args.kills)),
        ("permits left", str(result["permits_left"]), "0", result["permits_left"] == 0),
        (
            "guard RSS before / after (MiB)",
            f"{result['rss_before'] / 1024:.1f} / {result['rss_after'] / 1024:.1f}",
            "growth < 10",
            growth < 10,
        ),
    ]
    print(f"\n{'figure':<52}{'measured':>16}  {'target':<16}")
    for name, value, target, ok in rows:
        print(f"{name:<52}{value:>16}  {target:<16}{'' if ok else '  MISSED'}")
    print(f"\n{result['samples']} server samples every 20 ms ({result['unanswered']} unanswered: the server was down)")
    if result["over_cap"]:
        print(f"  samples over the cap (s since start, held): {result['over_cap'][:20]}")
    for line in soak.details:
        print("  " + line)
    return all(ok for *_, ok in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="how long the load runs (default 600)")
    parser.add_argument("--model", default="med", help="random model size from tests/support/llamacpp.py")
    parser.add_argument("--cap", type=int, default=2, help="the guard's max_inflight (the server has 4 slots)")
    parser.add_argument("--kills", type=int, default=1, help="server kills, evenly spaced (default 1)")
    parser.add_argument("--outage", type=float, default=3.0, help="seconds between a kill and the restart")
    args = parser.parse_args()
    if args.seconds < 10 or args.seconds > 3600:
        parser.error("--seconds must be between 10 and 3600")
    with tempfile.TemporaryDirectory() as tmp, restartable_llamacpp(args.model, slots=4, ctx=4096) as llama:
        config = write_guard_config(Path(tmp) / "guard.toml", llama.url, cap=args.cap, extra="")
        config.write_text(config.read_text() + HURRIED)
        with guard_with_config(config, Path(tmp) / "guard.log") as (guard, pid):
            result = asyncio.run(chaos(llama, guard, pid, args))
    return 0 if report(result, args) else 1


if __name__ == "__main__":
    sys.exit(main())
