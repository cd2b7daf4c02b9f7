"""Stream-and-assemble against real servers over 127.0.0.1, through the production h1 client:

* llama.cpp (xllamacpp, tiny random model, greedy): the same request non-streamed directly, and streamed then
  assembled, give the same content, finish_reason and usage numbers;
* the scripted sim: its ``kanban_complete`` tool call assembles into the ``message.tool_calls`` it answers
  non-streamed;
* hanging up an assembled request stops llama.cpp's generation (its own counters say so) and frees the slot.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from gateway_guard.settings import UpstreamSettings
from gateway_guard.sim.replies import KANBAN_COMPLETE
from gateway_guard.upstream.assemble import CHAT_PATH, TEXT_PATH, Assembler, to_stream_request
from gateway_guard.upstream.client import Upstream
from tests.support.disconnect import measure
from tests.support.llamacpp import llamacpp_server, sim_server

JSON = [("content-type", "application/json")]
GREEDY = {"temperature": 0, "seed": 42, "ignore_eos": True, "max_tokens": 32}
# max_tokens 32 on this prompt ends on whole characters: when max_tokens cuts a multi-byte character, llama.cpp's
# non-streamed answer ends with U+FFFD and its stream drops the partial bytes (docs/upstream-client.md).


@pytest.fixture(scope="module")
def llama() -> Iterator[str]:
    pytest.importorskip("xllamacpp")
    with llamacpp_server("tiny", slots=2, ctx=2 * 2048) as url:
        yield url


@contextlib.asynccontextmanager
async def _upstream(url: str) -> AsyncIterator[Upstream]:
    up = Upstream(UpstreamSettings(name="up", url=url, read_timeout=60))
    try:
        yield up
    finally:
        await up.aclose()


async def direct(up: Upstream, path: str, payload: dict[str, Any]) -> Any:
    response = await up.send("POST", path, b"", JSON, json.dumps(payload).encode())
    try:
        body = b"".join([chunk async for chunk in response.chunks()])
    finally:
        await response.aclose()
    assert response.status == 200, body
    return json.loads(body)


async def assembled(up: Upstream, path: str, payload: dict[str, Any]) -> Any:
    converted = to_stream_request(path, payload)
    assert converted is not None
    response = await up.send("POST", path, b"", JSON, json.dumps(converted).encode())
    assembler = Assembler(path, upstream=up.name)
    try:
        assert response.status == 200 and "text/event-stream" in response.content_type
        async for chunk in response.chunks():
            assembler.feed(chunk)
    finally:
        await response.aclose()
    status, body = assembler.finish()
    assert status == 200 and assembler.done
    return json.loads(body)


def _usage(answer: Any) -> tuple[int, int, int]:
    usage = answer["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


@pytest.mark.llamacpp
@pytest.mark.parametrize(
    ("path", "request_", "text_of"),
    [
        (CHAT_PATH, {"messages": [{"role": "user", "content": "hello world"}]}, lambda c: c["message"]["content"]),
        (TEXT_PATH, {"prompt": "hello world"}, lambda c: c["text"]),
    ],
    ids=["chat", "text"],
)
async def test_llamacpp_streamed_and_assembled_equals_non_streamed(
    llama: str, path: str, request_: dict[str, Any], text_of: Any
) -> None:
    payload = request_ | GREEDY
    async with _upstream(llama) as up:
        plain = await direct(up, path, payload)
        built = await assembled(up, path, payload)
    assert built["object"] == plain["object"]
    assert built["model"] == plain["model"]
    (plain_choice,), (built_choice,) = plain["choices"], built["choices"]
    assert text_of(built_choice) == text_of(plain_choice) != ""
    assert built_choice["finish_reason"] == plain_choice["finish_reason"] == "length"
    assert _usage(built) == _usage(plain)
    assert _usage(built)[1] == GREEDY["max_tokens"]
    if path == CHAT_PATH:
        assert built_choice["message"]["role"] == "assistant"


async def test_the_sims_kanban_complete_call_assembles_into_its_tool_calls() -> None:
    tools = [{"type": "function", "function": {"name": KANBAN_COMPLETE, "parameters": {"type": "object"}}}]
    payload = {"model": "sim", "messages": [{"role": "user", "content": "work the card"}], "tools": tools}
    with sim_server(mode="scripted", ttft=0, tokens_per_second=2000, ollama=False) as url:
        async with _upstream(url) as up:
            plain = await direct(up, CHAT_PATH, payload)
            built = await assembled(up, CHAT_PATH, payload)
    plain_message, built_message = plain["choices"][0]["message"], built["choices"][0]["message"]
    (plain_call,), (built_call,) = plain_message["tool_calls"], built_message["tool_calls"]
    assert built_call["function"] == plain_call["function"]
    assert built_call["function"]["name"] == KANBAN_COMPLETE
    assert json.loads(built_call["function"]["arguments"])["summary"]
    assert built_call["type"] == "function" and built_call["id"].startswith("call_")
    assert built_message["content"] is None and built_message["role"] == "assistant"
    assert built["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"] == "tool_calls"
    assert _usage(built) == _usage(plain)


@pytest.mark.llamacpp
async def test_hanging_up_an_assembled_request_stops_llamacpp(llama: str) -> None:
    """The guard's side of the mechanism: the client's non-streamed request, converted and hung up after 50 ms,
    must not run to its end at the server (tokens counted by llama.cpp itself) and its slot must be free."""
    tokens = 1900  # of the slot's 2048 context; seconds on these machines, ~0.4 s at 5,000 tokens/s
    freed = await measure(llama, "assembled", tokens, hang_up=0.05, limit=30)
    assert freed.tokens < tokens, freed
    async with httpx.AsyncClient(timeout=10) as http:
        slots = (await http.get(f"{llama}/slots")).json()
    assert not any(slot["is_processing"] for slot in slots)
