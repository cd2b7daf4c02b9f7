"""Fuzzing the edge: hypothesis writes raw HTTP/1.1 requests (methods, paths, headers, bodies, framing) to a live
``gateway-guard`` process on a real socket in front of the sim. After every example: no 5xx that the guard
originated (the sim's own answers carry no ``x-guard-*`` error of ours), no permit left, ``/guard/health``
answers.

The CI budget is bounded (``EDGE_FUZZ_EXAMPLES``, default 150, and hypothesis' own deadline off: the machine is
shared); ``python -m tests.integration.test_edge_fuzz --examples 5000`` runs a longer campaign.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.edge_support import Guard, edge_guard
from tests.support.llamacpp import sim_server

EXAMPLES = int(os.environ.get("EDGE_FUZZ_EXAMPLES", "150"))
SERVER = {
    "header_timeout": 2.0,
    "body_timeout": 2.0,
    "max_body_bytes": 256 * 1024,
    "body_budget_bytes": 1024 * 1024,
    "admin_token": "fuzz-admin",
}

methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT", "FOO"])
segments = st.sampled_from(
    [
        "v1",
        "api",
        "chat",
        "completions",
        "models",
        "pull",
        "show",
        "p",
        "worker",
        "guard",
        "capacity",
        "health",
        "metrics",
        ".",
        "..",
        "",
        "%2e%2e",
        "%2F",
        "%3F",
        "%23",
        "%00",
        "%20",
        "%zz",
        "%41",
        "caf%C3%A9",
        "%ff",
        "a;b",
        "x?y=1",
        "*",
        "\\",
        "upstreams",
        "gpu",
        "limit",
        "reload",
        "events",
    ]
)
valid_paths = st.sampled_from(
    [
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/models/sim",
        "/api/chat",
        "/api/generate",
        "/api/show",
        "/api/pull",
        "/guard/capacity",
        "/guard/health",
        "/metrics",
        "/p/worker/v1/chat/completions",
    ]
)
paths = st.one_of(
    valid_paths,
    valid_paths,
    st.lists(segments, min_size=0, max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.sampled_from(["*", "http://127.0.0.1/v1/models", "/v1/chat/completions?stream=true"]),
)
header_names = st.sampled_from(
    [
        "content-type",
        "content-length",
        "transfer-encoding",
        "x-guard-lane",
        "x-guard-profile",
        "x-guard-admin-token",
        "authorization",
        "x-api-key",
        "connection",
        "expect",
        "upgrade",
        "host",
        "te",
        "x-junk",
        "accept-encoding",
    ]
)
header_values = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "chunked",
            "close",
            "keep-alive",
            "100-continue",
            "interactive",
            "batch",
            "nope",
            "Bearer fuzz-admin",
            "fuzz-admin",
            "0",
            "5",
            "-1",
            "99999999999",
            "gzip",
            "websocket",
            "identity, chunked",
            "text/plain",
        ]
    ),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)
json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
).map(lambda v: json.dumps({"model": "sim", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}], "x": v}))
bodies = st.one_of(
    st.just(b""),
    json_bodies.map(str.encode),
    json_bodies.map(str.encode),
    st.binary(max_size=300),
    st.sampled_from([b"[" * 5000, b'{"a": NaN}', b'{"n": ' + b"9" * 5000 + b"}", b'{"model": 1}', b"{}"]),
)
framings = st.sampled_from(["length", "length", "length", "none", "chunked", "short", "long", "both"])


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    method, path, body, framing = draw(methods), draw(paths), draw(bodies), draw(framings)
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=6))
    version = draw(st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x"]))
    lines = [f"{method} {path} {version}", "host: 127.0.0.1"]
    lines += [f"{n}: {v}" for n, v in headers]
    payload = body
    if framing in ("length", "both"):
        lines.append(f"content-length: {len(body)}")
    if framing == "short":
        lines.append(f"content-length: {len(body) + 10}")
    if framing == "long":
        lines.append(f"content-length: {max(0, len(body) - 3)}")
    if framing in ("chunked", "both"):
        lines.append("transfer-encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + draw(st.sampled_from([b"0\r\n\r\n", b""]))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data``; read until one whole final response has come (or the guard closes, or ``timeout``)."""
    head_only = data.split(b" ", 1)[0] == b"HEAD"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        buf = b""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline and not _complete(buf, head_only):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return buf


def _complete(buf: bytes, head_only: bool) -> bool:
    while buf.startswith(b"HTTP/1.1 1") and b"\r\n\r\n" in buf:  # 100 Continue: the final answer follows
        buf = buf.split(b"\r\n\r\n", 1)[1]
    if b"\r\n\r\n" not in buf:
        return False
    head, body = buf.split(b"\r\n\r\n", 1)
    low = head.lower()
    if head_only or low.startswith((b"http/1.1 204", b"http/1.1 304")):
        return True
    if b"content-length:" in low:
        return len(body) >= int(low.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    if b"transfer-encoding: chunked" in low:
        return body.endswith(b"0\r\n\r\n")
    return False  # delimited by close


def guard_originated_5xx(answer: bytes) -> list[str]:
    """Heads of 5xx responses the guard wrote itself: not relayed from the sim (``x-guard-upstream``), and not
    an admission refusal (503 with ``retry-after``)."""
    found = []
    for part in answer.split(b"HTTP/1.1 ")[1:]:
        head = part.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
        if head[:1] != "5" or "x-guard-upstream:" in head:
            continue
        if head.startswith("503") and "retry-after:" in head:
            continue
        found.append(head[:300])
    return found


def check_after(guard: Guard) -> None:
    deadline = time.monotonic() + 10
    while True:
        health = httpx.get(f"{guard.url}/guard/health", timeout=10)
        assert health.status_code == 200
        if guard.in_flight() == 0:
            return
        assert time.monotonic() < deadline, f"a permit or queue entry left: {guard.capacity()}"
        time.sleep(0.05)  # a released permit may wait its 100 ms grace: polling a foreign process


@contextlib.contextmanager
def fuzz_target() -> Iterator[Guard]:
    with (
        sim_server(slots=2, mode="zero") as sim,
        edge_guard(sim, server=SERVER, upstream_table={"max_inflight": 2, "models": ["sim"]}) as guard,
    ):
        yield guard


def run(guard: Guard, examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(raw_requests())
    def example(data: bytes) -> None:
        answer = exchange(guard.port, data)
        assert not guard_originated_5xx(answer), (data[:300], answer[:500])
        check_after(guard)

    example()
    assert "Traceback" not in guard.log() and "Exception in ASGI application" not in guard.log()


def test_raw_http_fuzz_never_breaks_the_edge() -> None:
    with fuzz_target() as guard:
        run(guard, EXAMPLES)


def main() -> None:
    parser = argparse.ArgumentParser(description="a longer fuzzing run of the guard's edge")
    parser.add_argument("--examples", type=int, default=5000)
    args = parser.parse_args()
    started = time.monotonic()
    with fuzz_target() as guard:
        run(guard, args.examples)
    print(f"{args.examples} examples, no guard 5xx, no permit left, {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
