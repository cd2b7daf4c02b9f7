"""The usage meter: right numbers whatever the chunking, and bounded memory on a line that never ends."""

from __future__ import annotations

import json

import pytest

from gateway_guard.upstream.usage import MAX_LINE, UsageMeter

SSE = "text/event-stream"


def _stream(pieces: int, usage: tuple[int, int] | None) -> bytes:
    events: list[dict[str, object]] = [
        {"choices": [{"index": 0, "delta": {"content": f"w{i}"}}]} for i in range(pieces)
    ]
    if usage is not None:
        events.append({"choices": [], "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("size", [1, 3, 7, 64, 100_000])
def test_usage_read_off_any_chunking(size: int) -> None:
    body = _stream(20, (11, 20))
    meter = UsageMeter(SSE)
    for i in range(0, len(body), size):
        meter.feed(body[i : i + size])
    meter.finish()
    assert (meter.prompt_tokens, meter.completion_tokens, meter.estimated) == (11, 20, False)
    assert meter.content_chunks == 20


def test_content_chunks_estimate_when_no_usage() -> None:
    meter = UsageMeter(SSE)
    meter.feed(_stream(5, None))
    meter.finish()
    assert (meter.completion_tokens, meter.estimated) == (5, True)


def test_an_endless_line_is_bounded_and_skipped_to_its_newline() -> None:
    meter = UsageMeter(SSE)
    chunk = b"x" * 1000
    most = 0
    for _ in range(20_000):  # 20 MB of one line, in 20,000 chunks
        meter.feed(chunk)
        most = max(most, meter.partial_size)
    assert most <= MAX_LINE
    # the long line ends; what follows is read normally
    meter.feed(b"tail-of-the-long-line\n" + _stream(2, (3, 2)))
    meter.finish()
    assert (meter.prompt_tokens, meter.completion_tokens) == (3, 2)
    assert meter.content_chunks == 2  # the skipped line counted for nothing
    assert meter.partial_size == 0


def test_a_long_line_in_one_chunk_is_skipped_and_what_follows_is_read() -> None:
    meter = UsageMeter(SSE)
    meter.feed(b"data: " + b"y" * (MAX_LINE * 2) + b"\n" + _stream(1, (4, 1)))
    meter.finish()
    assert (meter.prompt_tokens, meter.completion_tokens) == (4, 1)


def test_a_line_just_under_the_bound_split_in_pieces_is_parsed() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 9}
    line = b'data: {"pad": "' + b"p" * (MAX_LINE - 200) + b'", "choices": [], "usage": ' + json.dumps(usage).encode()
    line += b"}\n\n"
    meter = UsageMeter(SSE)
    for i in range(0, len(line), 1000):
        meter.feed(line[i : i + 1000])
    meter.finish()
    assert (meter.prompt_tokens, meter.completion_tokens) == (7, 9)


def test_ndjson_done_object_split_across_chunks() -> None:
    body = b'{"response":"a","done":false}\n{"response":"","done":true,"prompt_eval_count":5,"eval_count":1}\n'
    meter = UsageMeter("application/x-ndjson")
    for i in range(0, len(body), 4):
        meter.feed(body[i : i + 4])
    meter.finish()
    assert (meter.prompt_tokens, meter.completion_tokens) == (5, 1)


def test_json_body_usage() -> None:
    meter = UsageMeter("application/json")
    meter.feed(b'{"usage": {"prompt_tokens": 2,')
    meter.feed(b' "completion_tokens": 3}}')
    meter.finish()
    assert (meter.prompt_tokens, meter.completion_tokens) == (2, 3)
