"""The sim's HTTP surface: through httpx.ASGITransport, and through a real socket (uvicorn in this loop) where
chunk timing or a client disconnect matters. The Ollama routes are an emulation (no Ollama server runs here)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway_guard.sim import SimApp, SimConfig, build_sim_app
from tests.support.inprocess import serve_in_process

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hermes-0.19.0-chat-request.json"


class Permits:
    """A sleep that waits for the test to hand out one permit per simulated wait (ttft, then each token)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[None] = asyncio.Queue()

    async def sleep(self, seconds: float) -> None:
        await self.queue.get()

    def give(self, n: int = 1) -> None:
        for _ in range(n):
            self.queue.put_nowait(None)


@contextlib.asynccontextmanager
async def client_for(app: SimApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as client:
        yield client


def sse_events(text: str) -> list[Any]:
    events: list[Any] = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metrics(text: str) -> dict[str, float]:
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}


def hermes_body() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(FIXTURE.read_text())["body"]
    return body


def fast(**overrides: Any) -> SimApp:
    return build_sim_app(dataclasses.replace(SimConfig(mode="zero", max_output_tokens=8), **overrides))


async def test_health_models_and_unknown_model() -> None:
    async with client_for(fast(model_id="m1")) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        listing = (await client.get("/v1/models")).json()
        assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == ["m1"]
        assert (await client.get("/v1/models/m1")).json()["id"] == "m1"
        missing = await client.get("/v1/models/other")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b'{"messages": "hi"}', b'{"messages": [], "max_tokens": "x"}']
)
async def test_bad_bodies_get_an_openai_400(raw: bytes) -> None:
    async with client_for(fast()) as client:
        response = await client.post("/v1/chat/completions", content=raw)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "code"}


async def test_chat_non_stream_usage_and_finish_reason() -> None:
    app = fast(max_output_tokens=8)
    async with client_for(app) as client:
        capped = (await client.post("/v1/chat/completions", json=hermes_body() | {"stream": False})).json()
        short = (
            await client.post(
                "/chat/completions", json={"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 3}
            )
        ).json()
    assert capped["object"] == "chat.completion"
    assert capped["choices"][0]["finish_reason"] == "stop"  # the sim's cap, not Hermes's max_tokens 65536
    assert capped["usage"]["completion_tokens"] == 8
    assert capped["usage"]["prompt_tokens"] > 15_000  # ~76 kB of Hermes prompt and tools at ~4 chars a token
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["choices"][0]["message"]["content"] == "lorem ipsum dolor"
    assert short["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    stats = app.gpu.stats()
    assert stats.tokens_predicted_total == 11
    assert stats.prompt_tokens_total == capped["usage"]["prompt_tokens"] + 10


async def test_chat_stream_wire_format_with_usage() -> None:
    async with client_for(fast()) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "lorem ipsum dolor sit"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_legacy_completions_and_embeddings() -> None:
    async with client_for(fast()) as client:
        plain = (await client.post("/v1/completions", json={"prompt": "abcdefgh", "max_tokens": 2})).json()
        streamed = await client.post(
            "/v1/completions",
            json={"prompt": ["ab"], "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}},
        )
        vectors = (await client.post("/v1/embeddings", json={"input": ["a", "b"]})).json()
    assert plain["object"] == "text_completion" and plain["choices"][0]["text"] == "lorem ipsum"
    assert plain["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    events = sse_events(streamed.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-2] if e["choices"]) == "lorem ipsum"
    assert events[-2]["usage"]["completion_tokens"] == 2 and events[-1] == "[DONE]"
    assert [len(d["embedding"]) for d in vectors["data"]] == [16, 16]
    assert vectors["data"][0]["embedding"] != vectors["data"][1]["embedding"]


async def test_scripted_mode_completes_a_hermes_card_through_the_openai_client() -> None:
    """Parsed by the client library Hermes uses (over a real socket), with the real captured Hermes request."""
    app = build_sim_app(SimConfig(mode="scripted", ttft=0, tokens_per_second=10_000))
    body = hermes_body()
    async with serve_in_process(app) as url, openai.AsyncOpenAI(api_key="k", base_url=f"{url}/v1") as client:
        stream = await client.chat.completions.create(
            model=body["model"],
            messages=body["messages"],
            tools=body["tools"],
            max_tokens=65536,
            stream=True,
            stream_options={"include_usage": True},
        )
        names, arguments, finish, used = [], "", None, None
        call_id = ""
        async for chunk in stream:
            used = chunk.usage or used
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for call in choice.delta.tool_calls or ():
                    call_id = call.id or call_id
                    if call.function and call.function.name:
                        names.append(call.function.name)
                    arguments += (call.function.arguments or "") if call.function else ""
        assert names == ["kanban_complete"] and finish == "tool_calls"
        args = json.loads(arguments)
        assert args["summary"] and "task_id" not in args  # Hermes fills in HERMES_KANBAN_TASK
        assert used is not None and used.completion_tokens == app.gpu.stats().tokens_predicted_total

        made = {"id": call_id, "type": "function", "function": {"name": "kanban_complete", "arguments": arguments}}
        follow_up = body["messages"] + [
            {"role": "assistant", "content": None, "tool_calls": [made]},
            {"role": "tool", "tool_call_id": call_id, "content": '{"ok": true, "task_id": "t_1"}'},
        ]
        final = await client.chat.completions.create(
            model=body["model"], messages=follow_up, tools=body["tools"], max_tokens=65536
        )
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.tool_calls is None
    assert "complete" in (final.choices[0].message.content or "")


async def test_scripted_mode_without_the_kanban_tool_writes_text() -> None:
    async with client_for(build_sim_app(SimConfig(mode="scripted", ttft=0, tokens_per_second=1e4))) as client:
        answer = (
            await client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            )
        ).json()
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "lorem ipsum"}


async def test_ollama_emulation_chat_ndjson_and_generate() -> None:
    async with client_for(fast(model_id="sim")) as client:
        chat = await client.post(
            "/api/chat",
            json={"model": "sim", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 3}},
        )
        generate = (
            await client.post("/api/generate", json={"model": "sim:latest", "prompt": "abcd", "stream": False})
        ).json()
        loaded = (await client.post("/api/generate", json={"model": "sim"})).json()
        show = await client.post("/api/show", json={"model": "sim"})
        unknown = await client.post("/api/show", json={"model": "llama3"})
        ps = (await client.get("/api/ps")).json()
        tags = (await client.get("/api/tags")).json()
    assert chat.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in chat.text.splitlines()]
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert "".join(line["message"]["content"] for line in lines) == "lorem ipsum dolor"
    assert lines[-1]["eval_count"] == 3 and lines[-1]["prompt_eval_count"] == 1
    assert lines[-1]["done_reason"] == "length"
    assert generate["done"] and generate["eval_count"] == 8 and generate["done_reason"] == "stop"
    assert generate["response"].startswith("lorem ipsum")
    assert loaded["done_reason"] == "load"
    assert show.status_code == 200 and show.json()["details"]["format"] == "gguf"
    assert unknown.status_code == 404 and "not found" in unknown.json()["error"]
    assert ps["models"][0]["name"] == tags["models"][0]["name"] == "sim:latest"


async def test_without_ollama_the_sim_looks_like_llamacpp_to_server_probes() -> None:
    """Hermes tells servers apart by probing /api/tags (Ollama) then /props (llama.cpp); it refuses a window
    under 64K and sends ~19K-token prompts."""
    async with client_for(fast(context_length=100, ollama=False)) as client:
        tags = await client.get("/api/tags")
        chat = await client.post("/api/chat", json={"model": "sim", "messages": []})
        props = (await client.get("/props")).json()
        model = (await client.get("/v1/models/sim")).json()
        too_long = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 404}]}
        )
    assert tags.status_code == chat.status_code == 404
    assert props["default_generation_settings"]["n_ctx"] == 100 and props["total_slots"] == 4
    assert model["meta"]["n_ctx"] == 100
    assert too_long.status_code == 400
    assert too_long.json()["error"]["type"] == "exceed_context_size_error"
    assert too_long.json()["error"]["n_prompt_tokens"] == 101
    assert SimConfig().context_length >= 64_000


async def test_requests_beyond_the_slots_show_as_deferred_in_metrics_and_slots() -> None:
    permits = Permits()
    app = build_sim_app(SimConfig(slots=2, max_output_tokens=1), sleep=permits.sleep)
    request = {"messages": [{"role": "user", "content": "hi"}]}
    async with client_for(app) as client:
        posts = [asyncio.create_task(client.post("/v1/chat/completions", json=request)) for _ in range(3)]
        await asyncio.wait_for(app.gpu.wait_until(lambda s: s.requests_deferred == 1), 2)
        seen = metrics((await client.get("/metrics")).text)
        slots = (await client.get("/slots")).json()
        busy = await client.get("/slots?fail_on_no_slot=1")
        permits.give(3)  # one ttft each; a single token needs no further wait
        answers = await asyncio.wait_for(asyncio.gather(*posts), 2)
        after = metrics((await client.get("/metrics")).text)
        props = (await client.get("/props")).json()
    assert seen["llamacpp:requests_processing"] == 2 and seen["llamacpp:requests_deferred"] == 1
    assert [s["is_processing"] for s in slots] == [True, True]
    assert busy.status_code == 503
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert after["llamacpp:requests_processing"] == 0 and after["llamacpp:requests_deferred"] == 0
    assert after["sim:max_concurrent_seen"] == 3 and after["llamacpp:tokens_predicted_total"] == 3
    assert after["sim:requests_abandoned_total"] == 0 and props["total_slots"] == 2


async def test_stream_chunks_leave_one_by_one_over_a_real_socket() -> None:
    """Each token needs a permit; the test reads token k before it grants token k+1, so a server that
    buffered the stream would stall here instead of passing."""
    permits = Permits()
    app = build_sim_app(SimConfig(slots=1, max_output_tokens=3), sleep=permits.sleep)
    request = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with serve_in_process(app) as url, httpx.AsyncClient(base_url=url) as client:
        permits.give()  # the ttft: the headers go out with the first token
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            lines = response.aiter_lines()

            async def next_content() -> str:
                while True:
                    line = await asyncio.wait_for(anext(lines), 2)
                    if line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        if delta.get("content"):
                            return str(delta["content"])

            for expected, produced in (("lorem", 1), (" ipsum", 2), (" dolor", 3)):
                assert await next_content() == expected
                assert app.gpu.stats().tokens_predicted_total == produced
                permits.give()
            assert [line async for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"


async def test_a_client_that_leaves_mid_stream_frees_the_slot_and_stops_generation() -> None:
    permits = Permits()
    app = build_sim_app(SimConfig(slots=1, max_output_tokens=50), sleep=permits.sleep)
    request = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with serve_in_process(app) as url, httpx.AsyncClient(base_url=url) as client:
        permits.give()
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            async for line in response.aiter_lines():
                if '"lorem"' in line:
                    break  # leave after the first token; closing the stream drops the connection
        stats = await asyncio.wait_for(
            app.gpu.wait_until(lambda s: s.requests_abandoned_total == 1 and s.requests_processing == 0), 2
        )
        after = metrics((await client.get("/metrics")).text)
    assert stats.tokens_predicted_total == 1
    assert after["sim:requests_abandoned_total"] == 1 and after["llamacpp:requests_processing"] == 0


async def test_a_client_that_leaves_a_non_stream_request_frees_the_slot() -> None:
    permits = Permits()
    app = build_sim_app(SimConfig(slots=1), sleep=permits.sleep)
    async with serve_in_process(app) as url, httpx.AsyncClient(base_url=url) as client:
        post = asyncio.create_task(client.post("/v1/chat/completions", json={"messages": []}))
        await asyncio.wait_for(app.gpu.wait_until(lambda s: s.requests_processing == 1), 2)
        post.cancel()
        with pytest.raises(asyncio.CancelledError):
            await post
        stats = await asyncio.wait_for(
            app.gpu.wait_until(lambda s: s.requests_abandoned_total == 1 and s.requests_processing == 0), 2
        )
    assert stats.tokens_predicted_total == 0
