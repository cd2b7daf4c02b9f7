"""Does llama.cpp keep a connection alive after a streamed answer? A measurement, on a raw 127.0.0.1 socket.

Starts llama.cpp (xllamacpp, tiny model, 4 slots), then on one keep-alive connection sends ``--requests``
chat completions of 8 tokens back to back, each written the moment the previous answer ended (its last chunk,
or all of its Content-Length). A request answered by nothing (the server closed the connection) is counted as
dropped and the next one goes on a new connection. At the end the server's own counters say how many it worked
on: ``llamacpp:tokens_predicted_total`` (8 per request it ran) and ``llamacpp:prompt_tokens_total``.

    .venv/bin/python tests/support/keepalive.py --requests 150 [--no-stream]

Seen with xllamacpp 2026.10 (2026-11-30): streamed, ``oDoDoD...`` -- every request written at once after a
streamed answer on the same connection is dropped, and the counters show the server never ran it (tokens =
8 x the answered ones); non-streamed, all answered on one connection.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.outage import restartable_llamacpp

COUNTERS = ("llamacpp:tokens_predicted_total", "llamacpp:prompt_tokens_total")


def counters(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in COUNTERS:
            values[name] = float(value)
    return values


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer (chunked or Content-Length), or what came before the server closed."""
    buf = b""
    while True:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep:
            lower = head.lower()
            if b"transfer-encoding: chunked" in lower and (
                rest.startswith(b"0\r\n\r\n") or rest.endswith(b"\r\n0\r\n\r\n")
            ):
                return buf
            if b"content-length: " in lower:
                length = int(lower.split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(rest) >= length:
                    return buf
        data = sock.recv(65536)
        if not data:
            return buf
        buf += data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--no-stream", action="store_true")
    args = parser.parse_args()
    stream = not args.no_stream
    with restartable_llamacpp("tiny", slots=4, ctx=4096) as llama:
        before = counters(llama.url)
        seq = []
        sock = socket.create_connection(("127.0.0.1", llama.port))
        for i in range(min(args.requests, 1000)):
            body = {"model": "tiny", "messages": [{"role": "user", "content": f"hi {i} " * 3}], "max_tokens": 8}
            body |= {"ignore_eos": True, "stream": stream, "cache_prompt": False}
            data = json.dumps(body).encode()
            head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            sock.sendall(head.encode() + b"Content-Length: %d\r\n\r\n" % len(data) + data)
            answer = read_answer(sock)
            seq.append("o" if answer.startswith(b"HTTP/1.1 200") else "D" if not answer else "p")
            if seq[-1] != "o":
                sock.close()
                sock = socket.create_connection(("127.0.0.1", llama.port))
        sock.close()
        time.sleep(1.0)  # the counters are updated when a slot is released
        after = counters(llama.url)
    answered = seq.count("o")
    tokens = after[COUNTERS[0]] - before[COUNTERS[0]]
    print("".join(seq))
    print(
        f"{'streamed' if stream else 'non-streamed'}: {answered} answered, {seq.count('D')} dropped, "
        f"{seq.count('p')} partial; tokens predicted {tokens:.0f} (8 x answered = {8 * answered}); "
        f"prompt tokens {after[COUNTERS[1]] - before[COUNTERS[1]]:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
