"""How soon does a server let go of a request whose client hung up? Measured on the server's own ``/slots``.

Three ways to ask for the same long completion, each hung up ``--hang-up`` seconds after it was sent:

* ``non-stream``  the client's own non-streamed request, sent as it is;
* ``stream``      a streamed request;
* ``assembled``   the non-streamed request as the guard sends it: converted by ``upstream/assemble.py`` to a
                  stream, through the production h1 client, hung up by ``UpstreamResponse.aclose()``.

For each: seconds from the hang-up until no slot ``is_processing`` (polled every 20 ms), and the tokens the
server generated for it (``llamacpp:tokens_predicted_total`` before/after; the request asked for ``--tokens``).

    .venv/bin/python tests/support/disconnect.py --model med --tokens 400 --runs 3

Starts its own llama.cpp (xllamacpp) process on a free 127.0.0.1 port and stops it (by its PID) at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

if __package__ in (None, ""):  # run as a script: import from the repository, not from tests/support/
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from gateway_guard.settings import UpstreamSettings
from gateway_guard.upstream.assemble import CHAT_PATH, to_stream_request
from gateway_guard.upstream.client import Upstream
from tests.support.llamacpp import llamacpp_server

WAYS = ("non-stream", "stream", "assembled")


@dataclass(frozen=True)
class Freed:
    way: str
    seconds: float  # from the hang-up until no slot is processing
    tokens: float  # tokens the server generated for the request


def payload(tokens: int, *, stream: bool) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


async def _busy(http: httpx.AsyncClient, base: str) -> bool:
    slots = (await http.get(f"{base}/slots")).json()
    return any(slot["is_processing"] for slot in slots)


async def _predicted(http: httpx.AsyncClient, base: str) -> float:
    for line in (await http.get(f"{base}/metrics")).text.splitlines():
        if line.startswith("llamacpp:tokens_predicted_total "):
            return float(line.split()[1])
    raise AssertionError("llamacpp:tokens_predicted_total not in /metrics")


async def _raw_hang_up(base: str, body: dict[str, Any], after: float) -> None:
    """Send over a plain socket, then close it (FIN) after ``after`` seconds, having read nothing."""
    parts = urlsplit(base)
    data = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = f"POST {CHAT_PATH} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-type: application/json\r\n"
    writer.write(head.encode() + b"content-length: %d\r\n\r\n" % len(data) + data)
    await writer.drain()
    await asyncio.sleep(after)  # the client gives up after this long
    writer.close()
    await writer.wait_closed()


async def _assembled_hang_up(base: str, body: dict[str, Any], after: float) -> None:
    converted = to_stream_request(CHAT_PATH, body)
    assert converted is not None
    up = Upstream(UpstreamSettings(name="llama", url=base))
    try:
        response = await up.send(
            "POST", CHAT_PATH, b"", [("content-type", "application/json")], json.dumps(converted).encode()
        )
        assert response.status == 200 and "event-stream" in response.content_type

        async def read() -> None:  # as the guard would, until the client gives up
            async for _ in response.chunks():
                pass

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read(), after)
        await response.aclose()  # the guard hangs up on the server
    finally:
        await up.aclose()


async def measure(base: str, way: str, tokens: int, hang_up: float, limit: float = 60.0) -> Freed:
    async with httpx.AsyncClient(timeout=10) as http:
        while await _busy(http, base):  # start from an idle server
            await asyncio.sleep(0.02)
        before = await _predicted(http, base)
        if way == "assembled":
            await _assembled_hang_up(base, payload(tokens, stream=False), hang_up)
        else:
            await _raw_hang_up(base, payload(tokens, stream=way == "stream"), hang_up)
        gone = time.monotonic()
        while await _busy(http, base):
            if time.monotonic() - gone > limit:
                raise AssertionError(f"{way}: a slot still busy {limit} s after the hang-up")
            await asyncio.sleep(0.02)  # polling another process's /slots: there is no event to wait on
        freed = time.monotonic() - gone
        return Freed(way, freed, await _predicted(http, base) - before)


async def run(base: str, tokens: int, hang_up: float, runs: int) -> list[Freed]:
    results = []
    for _ in range(runs):
        for way in WAYS:
            results.append(await measure(base, way, tokens, hang_up))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="med", help="size name (tiny, med) or a GGUF path")
    parser.add_argument("--tokens", type=int, default=400, help="max_tokens of each request (ignore_eos)")
    parser.add_argument("--hang-up", type=float, default=0.5, help="seconds before the client hangs up")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slots", type=int, default=2)
    args = parser.parse_args(argv)
    with llamacpp_server(args.model, slots=args.slots, ctx=args.slots * 2048) as base:
        results = asyncio.run(run(base, args.tokens, args.hang_up, args.runs))
    print(f"model {args.model}, {args.tokens} tokens asked, client hangs up after {args.hang_up} s")
    print(f"{'way':<12} {'freed after hang-up (s)':>24} {'tokens generated':>17}")
    for r in results:
        print(f"{r.way:<12} {r.seconds:>24.3f} {r.tokens:>17.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
