"""Stream-and-assemble (pure): which requests are converted, and the non-streamed answer rebuilt from SSE bytes
chunked every which way. Against the real servers: tests/integration/test_assemble_llamacpp.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway_guard.sim.model import SimConfig
from gateway_guard.sim.openai_wire import ChatWire, TextWire
from gateway_guard.sim.replies import KANBAN_COMPLETE, scripted_reply, text_reply
from gateway_guard.upstream.assemble import CHAT_PATH, MAX_EVENT, TEXT_PATH, Assembler, to_stream_request
from gateway_guard.upstream.errors import UpstreamProtocolError


def sse(*events: object, done: bool = True) -> bytes:
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


def assemble(path: str, data: bytes, size: int | None = None) -> tuple[int, Any]:
    assembler = Assembler(path)
    step = size or len(data) or 1
    for i in range(0, len(data), step):
        assembler.feed(data[i : i + step])
    status, body = assembler.finish()
    return status, json.loads(body)


# -- which requests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "payload", "converted"),
    [
        (CHAT_PATH, {"messages": []}, True),
        (CHAT_PATH, {"messages": [], "stream": False}, True),
        (CHAT_PATH, {"messages": [], "stream": None}, True),
        (TEXT_PATH, {"prompt": "x", "n": 2}, True),
        (CHAT_PATH, {"messages": [], "stream": True}, False),
        (CHAT_PATH, {"messages": [], "stream": "yes"}, False),
        (TEXT_PATH, {"prompt": "x", "best_of": 3}, False),
        (CHAT_PATH, {"messages": [], "stream_options": "bad"}, False),
        ("/v1/embeddings", {"input": "x"}, False),
        ("/api/chat", {"messages": [], "stream": False}, False),
        (CHAT_PATH, ["not", "an", "object"], False),
    ],
)
def test_which_requests_are_converted(path: str, payload: object, converted: bool) -> None:
    out = to_stream_request(path, payload)
    if not converted:
        assert out is None
        return
    assert out is not None and isinstance(payload, dict)
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in out.items() if k not in ("stream", "stream_options")} == {
        k: v for k, v in payload.items() if k != "stream"
    }
    assert "stream_options" not in payload  # a copy: the client's payload is untouched


def test_the_clients_stream_options_are_kept() -> None:
    out = to_stream_request(CHAT_PATH, {"messages": [], "stream_options": {"x": 1, "include_usage": False}})
    assert out is not None and out["stream_options"] == {"x": 1, "include_usage": True}


# -- chat --------------------------------------------------------------------------------------------------

TOP = {
    "id": "chatcmpl-1",
    "created": 1796046289,
    "model": "m",
    "system_fingerprint": "b0",
    "object": "chat.completion.chunk",
}


def chat_chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0, **extra: Any) -> dict[str, Any]:
    return TOP | {"choices": [{"index": index, "delta": delta, "finish_reason": finish}]} | extra


USAGE = {"prompt_tokens": 29, "completion_tokens": 4, "total_tokens": 33}
LLAMA_CHAT = sse(  # the shape llama.cpp's server streams (seen on xllamacpp 2026.10)
    chat_chunk({"role": "assistant", "content": None}),
    chat_chunk({"content": "E"}),
    chat_chunk({"content": " card"}),
    chat_chunk({"content": "5"}),
    chat_chunk({"content": "4"}),
    chat_chunk({}, "length"),
    TOP | {"choices": [], "usage": USAGE, "timings": {"predicted_n": 4}},
)


@pytest.mark.parametrize("size", [None, 1, 2, 3, 5, 17, 64])
def test_chat_text_whatever_the_chunking(size: int | None) -> None:
    status, answer = assemble(CHAT_PATH, LLAMA_CHAT, size)
    assert status == 200
    assert answer == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1796046289,
        "model": "m",
        "system_fingerprint": "b0",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "E card54"},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": USAGE,
        "timings": {"predicted_n": 4},
    }


def test_crlf_comments_and_multi_line_data() -> None:
    data = (
        b": keep-alive\r\n\r\n"
        + b'data: {"id": "a", "choices": [{"index": 0,\r\ndata: "delta": {"content": "hi"}}]}\r\n\r\n'
        + b"data: [DONE]\r\n\r\n"
    )
    status, answer = assemble(CHAT_PATH, data, 3)
    assert status == 200 and answer["choices"][0]["message"]["content"] == "hi"


def test_tool_calls_merged_by_index_with_arguments_concatenated() -> None:
    data = sse(
        chat_chunk({"role": "assistant", "content": None}),
        chat_chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}
                ]
            }
        ),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x": '}}]}),
        chat_chunk(
            {
                "tool_calls": [
                    {"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}
                ]
            }
        ),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chat_chunk({}, "tool_calls"),
    )
    status, answer = assemble(CHAT_PATH, data, 7)
    message = answer["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
            {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
        ],
    }
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    assert "usage" not in answer  # the server sent none


def test_role_and_ids_repeated_in_every_chunk_are_not_doubled() -> None:
    call = {"index": 0, "id": "call_a", "type": "function", "function": {"arguments": "ab"}}
    data = sse(
        chat_chunk({"role": "assistant", "tool_calls": [call | {"function": {"name": "f", "arguments": ""}}]}),
        chat_chunk({"role": "assistant", "tool_calls": [call]}),
    )
    _, answer = assemble(CHAT_PATH, data)
    message = answer["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["tool_calls"] == [{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "ab"}}]


def test_reasoning_content_and_logprobs() -> None:
    lp = {"token": "x", "logprob": -1.0, "bytes": [120], "top_logprobs": []}
    data = sse(
        chat_chunk({"role": "assistant", "reasoning_content": "think"}),
        chat_chunk({"reasoning_content": "ing"}),
        chat_chunk({"content": "a"})
        | {"choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": {"content": [lp]}}]},
        chat_chunk({"content": "b"})
        | {"choices": [{"index": 0, "delta": {"content": "b"}, "logprobs": {"content": [lp, lp]}}]},
        chat_chunk({}, "stop"),
    )
    _, answer = assemble(CHAT_PATH, data, 11)
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "ab", "reasoning_content": "thinking"}
    assert choice["logprobs"] == {"content": [lp, lp, lp]}


def test_several_choices_interleaved() -> None:
    data = sse(
        chat_chunk({"role": "assistant", "content": "a"}, index=1),
        chat_chunk({"role": "assistant", "content": "x"}, index=0),
        chat_chunk({"content": "b"}, "stop", index=1),
        chat_chunk({"content": "y"}, "length", index=0),
    )
    _, answer = assemble(CHAT_PATH, data, 4)
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in answer["choices"]] == [
        (0, "xy", "length"),
        (1, "ab", "stop"),
    ]


# -- the sim's own streams: assembled equals its non-streamed answer ---------------------------------------


def _sim_chat_stream(wire: ChatWire) -> bytes:
    pieces = [wire.stream_piece(i) for i in range(len(wire.reply.pieces))]
    return sse(wire.stream_start(), *pieces, wire.stream_end(), wire.stream_usage(len(wire.reply.pieces)))


def test_the_sims_kanban_complete_call_assembles_into_its_non_streamed_answer() -> None:
    tools = [{"type": "function", "function": {"name": KANBAN_COMPLETE, "parameters": {}}}]
    reply = scripted_reply([{"role": "user", "content": "work the card"}], tools, 12, SimConfig(mode="scripted"))
    assert reply is not None and reply.tool_call is not None and len(reply.pieces) > 1
    wire = ChatWire(model="sim", reply=reply, prompt_tokens=40)
    status, answer = assemble(CHAT_PATH, _sim_chat_stream(wire), 9)
    assert status == 200
    assert answer == wire.completion()
    call = answer["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == KANBAN_COMPLETE
    assert json.loads(call["function"]["arguments"])["summary"]


def test_the_sims_text_completion_assembles_into_its_non_streamed_answer() -> None:
    wire = TextWire(model="sim", reply=text_reply(6, True), prompt_tokens=3)
    pieces = [wire.stream_piece(i) for i in range(6)]
    data = sse(*pieces, wire.stream_end(), wire.stream_usage(6))
    status, answer = assemble(TEXT_PATH, data, 5)
    assert status == 200
    assert answer == wire.completion()


# -- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b'data: {"error": {"code": 500, "message": "boom", "type": "server_error"}}\n\n', 500),
        (b'event: error\ndata: {"error": {"code": 400, "message": "boom"}}\n\n', 400),
        (b'error: {"code": 503, "message": "boom"}\n\n', 503),
        (b'data: {"error": {"code": "weird", "message": "boom"}}\n\n', 500),
    ],
    ids=["data-error", "event-error", "error-field", "non-numeric-code"],
)
def test_an_error_event_becomes_an_error_answer(data: bytes, status: int) -> None:
    first = sse(chat_chunk({"role": "assistant", "content": "partial"}), done=False)
    assembler = Assembler(CHAT_PATH)
    assembler.feed(first + data)
    got_status, body = assembler.finish()
    assert got_status == status
    error = json.loads(body)["error"]
    assert error["message"] == "boom"
    assert assembler.error is not None


@pytest.mark.parametrize(
    "data",
    [b"", b"data: [DONE]\n\n", b"data: {not json\n\n", b"data: [1, 2]\n\n", b"data: \xff\xfe\n\n"],
    ids=["empty", "done-only", "not-json", "not-object", "not-utf8"],
)
def test_a_stream_without_an_answer_is_a_protocol_error(data: bytes) -> None:
    assembler = Assembler(CHAT_PATH, upstream="gpu")
    with pytest.raises(UpstreamProtocolError) as info:
        assembler.feed(data)
        assembler.finish()
    assert info.value.status == 502
    assert "'gpu'" in info.value.message


def test_an_endless_line_is_refused_past_the_bound() -> None:
    assembler = Assembler(CHAT_PATH)
    piece = b"x" * (1024 * 1024)
    with pytest.raises(UpstreamProtocolError, match="SSE line over"):
        for _ in range(MAX_EVENT // len(piece) + 2):
            assembler.feed(piece)


def test_many_small_pieces_are_joined_once() -> None:
    n = 50_000
    events = [chat_chunk({"role": "assistant", "content": ""})] + [chat_chunk({"content": "ab"}) for _ in range(n)]
    status, answer = assemble(CHAT_PATH, sse(*events), 4096)
    assert status == 200
    assert answer["choices"][0]["message"]["content"] == "ab" * n


def test_unknown_path_is_refused() -> None:
    with pytest.raises(ValueError, match="no non-streamed shape"):
        Assembler("/v1/embeddings")
