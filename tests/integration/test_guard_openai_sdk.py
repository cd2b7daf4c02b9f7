"""The real ``openai`` SDK (AsyncOpenAI) as the guard's client, and the real Hermes request going through it.

The guard is served by uvicorn in this loop on a real 127.0.0.1 socket; upstreams are the simulated GPU
(``gateway_guard.sim``) or a small recording server, both on real sockets too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway_guard.sim import SimConfig, build_sim_app
from tests.integration.conftest import CHAT_PATH, guard_in_process, guard_settings, wait_all_free
from tests.support.inprocess import serve_in_process

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hermes-0.19.0-chat-request.json"
MESSAGES: list[Any] = [{"role": "user", "content": "Say something."}]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def sim(**overrides: Any) -> Any:
    config: dict[str, Any] = {"slots": 4, "tokens_per_second": 200.0, "ttft": 0.01, "max_output_tokens": 64}
    return build_sim_app(SimConfig(**(config | overrides)))


def sdk(guard: str, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{guard}/v1", api_key="sk-client", **options)


# -- a normal call and a streamed one -----------------------------------------------------------------------


async def test_sdk_chat_completion_through_the_guard() -> None:
    async with (
        serve_in_process(sim(model_id="sim-model")) as upstream,
        guard_in_process(guard_settings(upstream)) as (guard, _),
        sdk(guard, max_retries=0) as client,
        httpx.AsyncClient() as http,
    ):
        completion = await client.chat.completions.create(model="sim-model", messages=MESSAGES, max_tokens=8)
        models = await client.models.list()
        await wait_all_free(http, guard)
    assert completion.model == "sim-model"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    assert [m.id for m in models.data] == ["sim-model"]


async def test_sdk_stream_arrives_in_chunks_with_usage() -> None:
    tokens, rate = 8, 40.0  # 7 gaps of 25 ms between tokens at the upstream
    async with (
        serve_in_process(sim(tokens_per_second=rate, batch_slowdown=0.0)) as upstream,
        guard_in_process(guard_settings(upstream)) as (guard, _),
        sdk(guard, max_retries=0) as client,
    ):
        stream = await client.chat.completions.create(
            model="sim",
            messages=MESSAGES,
            max_tokens=tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        content_at: list[float] = []
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                content_at.append(time.monotonic())
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
        async with httpx.AsyncClient() as http:
            await wait_all_free(http, guard)
    assert len(content_at) == tokens and text
    assert usage is not None and usage.completion_tokens == tokens
    spread = content_at[-1] - content_at[0]
    assert spread > 0.5 * (tokens - 1) / rate, f"chunks arrived together ({spread:.3f} s apart): stream was buffered"


# -- a rejection whose Retry-After the SDK honours ----------------------------------------------------------


@dataclass
class Attempt:
    client: str | None
    retry_count: str | None
    arrived: float
    status: int | None = None
    answered: float | None = None
    retry_after: str | None = None


class AttemptLog:
    """An ASGI hook around the guard: each chat request that reaches it and what the guard answered."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.attempts: list[Attempt] = []
        self.rejected = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        attempt = Attempt(headers.get("x-test-client"), headers.get("x-stainless-retry-count"), time.monotonic())
        self.attempts.append(attempt)

        async def hooked(message: Message) -> None:
            if message["type"] == "http.response.start":
                attempt.status, attempt.answered = message["status"], time.monotonic()
                sent = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message["headers"]}
                attempt.retry_after = sent.get("retry-after")
                if attempt.status >= 400:
                    self.rejected.set()
            await send(message)

        await self.app(scope, receive, hooked)

    def of(self, client: str) -> list[Attempt]:
        return [a for a in self.attempts if a.client == client]


@pytest.mark.parametrize(
    ("overrides", "status"),
    [
        pytest.param({"profiles.worker.max_queued": 0}, 429, id="429-profile-may-queue-nothing"),
        pytest.param({"lanes.batch.queue_size": 0}, 429, id="429-lane-queue-of-zero"),
        pytest.param(
            {"lanes.batch.queue_size": 0, "lanes.batch.refusal_status": 503}, 503, id="503-when-the-lane-asks"
        ),
    ],
)
async def test_sdk_honours_retry_after_and_its_retry_succeeds(overrides: dict[str, Any], status: int) -> None:
    settings_overrides = {"upstreams.default.max_inflight": 1, **overrides}
    hook: list[AttemptLog] = []

    def wrap(app: Any) -> AttemptLog:
        hook.append(AttemptLog(app))
        return hook[0]

    async with serve_in_process(sim(tokens_per_second=20.0, max_output_tokens=1000)) as upstream:
        settings = guard_settings(upstream, **settings_overrides)
        async with guard_in_process(settings, wrap=wrap) as (guard, _), httpx.AsyncClient(timeout=30) as http:
            log = hook[0]
            worker = {"X-Guard-Profile": "worker"}
            # The holder takes the only slot with a stream that would run for 50 s.
            body = {"model": "sim", "messages": MESSAGES, "max_tokens": 1000, "stream": True}
            holder = await http.send(
                http.build_request("POST", f"{guard}{CHAT_PATH}", json=body, headers=worker), stream=True
            )
            try:
                assert holder.status_code == 200
                chunks = holder.aiter_raw()  # keep a reference: a collected generator closes the connection
                await anext(chunks)
                # Without retries the SDK surfaces the guard's OpenAI-style error.
                async with sdk(guard, max_retries=0, default_headers={**worker, "X-Test-Client": "once"}) as once:
                    with pytest.raises(openai.APIStatusError) as refused:
                        await once.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=4)
                assert refused.value.status_code == status
                assert isinstance(refused.value.body, dict) and refused.value.body["lane"] == "batch"
                log.rejected.clear()

                retrying = sdk(guard, max_retries=1, default_headers={**worker, "X-Test-Client": "retrying"})
                async with retrying:
                    call = asyncio.create_task(
                        retrying.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=4)
                    )
                    async with asyncio.timeout(10):
                        await log.rejected.wait()  # the guard has answered the first attempt
                    # Close the holder's stream: its permit comes back while the SDK waits out Retry-After.
                    await holder.aclose()
                    completion = await asyncio.wait_for(call, 15)
            finally:
                await holder.aclose()
            await wait_all_free(http, guard)

    first, second = log.of("retrying")
    assert (first.status, first.retry_count) == (status, "0")
    assert (second.status, second.retry_count) == (200, "1")
    assert first.retry_after is not None and first.answered is not None
    waited = second.arrived - first.answered
    # The SDK's own backoff without Retry-After is 0.375-0.5 s; the guard's estimate is at least 1 s.
    assert float(first.retry_after) >= 1
    assert waited >= float(first.retry_after) - 0.05, f"retried after {waited:.2f} s, Retry-After {first.retry_after}"
    assert completion.choices[0].message.content


# -- the real Hermes request ----------------------------------------------------------------------------------


class RecordingUpstream:
    """Keeps the exact bytes and headers of every request; answers a short SSE stream with usage."""

    def __init__(self) -> None:
        self.requests: list[tuple[Scope, list[tuple[str, str]], bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        self.requests.append((scope, headers, b"".join(chunks)))
        events = [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": 19000, "completion_tokens": 1, "total_tokens": 19001}},
        ]
        start = {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream"),
                (b"x-upstream-hop", b"1"),
                (b"connection", b"x-upstream-hop"),
            ],
        }
        await send(start)
        for event in events:
            data = b"data: " + json.dumps(event).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


HOP_BY_HOP_SENT = {
    "connection": "keep-alive, x-hop-test",
    "x-hop-test": "named by Connection, so hop-by-hop",
    "keep-alive": "timeout=5, max=100",
    "proxy-authorization": "Basic Zm9vOmJhcg==",
    "proxy-connection": "keep-alive",
    "te": "trailers",
}


async def test_real_hermes_request_arrives_unchanged_with_the_upstreams_key() -> None:
    fixture = json.loads(FIXTURE.read_text(encoding="utf-8"))
    body = json.dumps(fixture["body"], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    assert len(body) > 70_000 and len(fixture["body"]["tools"]) == 27 and fixture["body"]["stream"]
    client_headers = {k: v for k, v in fixture["headers"].items() if k.lower() not in {"host", "content-length"}}
    client_headers.update(HOP_BY_HOP_SENT)
    client_key = fixture["headers"]["Authorization"].removeprefix("Bearer ")

    upstream = RecordingUpstream()
    async with serve_in_process(upstream) as up_url:
        settings = guard_settings(up_url, **{"upstreams.default.api_key": "sk-upstream-secret"})
        async with guard_in_process(settings) as (guard, _), httpx.AsyncClient(timeout=30) as http:
            response = await http.post(f"{guard}{CHAT_PATH}", content=body, headers=client_headers)
            await wait_all_free(http, guard)

    assert response.status_code == 200, response.text
    assert response.text.endswith("data: [DONE]\n\n") and '"usage"' in response.text
    assert "x-upstream-hop" not in response.headers, "a response header named by Connection crossed the guard"

    [(scope, seen, received)] = upstream.requests
    assert (scope["method"], scope["path"]) == ("POST", CHAT_PATH)
    assert received == body, "the body was changed on the way"
    names = dict(seen)
    assert names["content-length"] == str(len(body))
    assert [v for k, v in seen if k == "authorization"] == ["Bearer sk-upstream-secret"]
    assert not [k for k, v in seen if client_key in v], "the client's API key reached the upstream"
    for name in HOP_BY_HOP_SENT:
        if name == "connection":
            assert "x-hop-test" not in names.get("connection", ""), names.get("connection")
        else:
            assert name not in names, f"hop-by-hop header {name!r} was forwarded"
    for name, value in fixture["headers"].items():  # every end-to-end header arrives as the client sent it
        if name.lower() not in {"host", "content-length", "authorization", "connection"}:
            assert names.get(name.lower()) == value, name
