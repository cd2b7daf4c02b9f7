"""The sim's ASGI app: an OpenAI-compatible, llama.cpp-like server in front of the GPU model.

Served by uvicorn (``python -m gateway_guard.sim``) or mounted in-process: ``build_sim_app(SimConfig(...))``.
Endpoints: ``/health``, ``/v1/models[/{id}]``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings`` (each also without ``/v1``), ``/metrics`` (llama.cpp's names plus ``sim:*``), ``/props``,
``/slots``, and an emulation of Ollama's native ``/api/*`` routes (``ollama.py``). With
``SimConfig(ollama=False)`` ``/api/*`` answers 404 as llama.cpp does, so clients that probe ``/api/tags`` to
spot Ollama (Hermes does) take the sim for llama.cpp.

A client that disconnects mid-request ends its generation at once and frees its slot, as llama.cpp does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
import urllib.parse
from collections.abc import Coroutine, Mapping
from typing import Any

from gateway_guard.sim.asgi import (
    SSE_TYPE,
    ClientGone,
    Receive,
    Scope,
    Send,
    Stream,
    openai_error,
    read_body,
    run_until_disconnect,
    send_bytes,
    send_json,
)
from gateway_guard.sim.model import Gpu, GpuStats, SimConfig, Sleep
from gateway_guard.sim.ollama import OllamaEmulation, OllamaError
from gateway_guard.sim.openai_wire import ChatWire, TextWire, model_object
from gateway_guard.sim.replies import (
    BadRequest,
    ContextExceeded,
    Reply,
    chat_prompt_tokens,
    chat_reply,
    check_context,
    completion_prompt_tokens,
    estimate_tokens,
    output_limit,
    requested_max_tokens,
    text_reply,
)

Work = Coroutine[Any, Any, None]
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def build_sim_app(config: SimConfig, *, sleep: Sleep = asyncio.sleep) -> SimApp:
    """The sim as an ASGI app; ``app.gpu`` exposes its counters and ``wait_until`` for tests."""
    return SimApp(config, sleep=sleep)


def metrics_text(stats: GpuStats) -> str:
    rows = (
        ("llamacpp:prompt_tokens_total", "counter", "Number of prompt tokens processed.", stats.prompt_tokens_total),
        ("llamacpp:tokens_predicted_total", "counter", "Number of generation tokens.", stats.tokens_predicted_total),
        ("llamacpp:requests_processing", "gauge", "Number of requests processing.", stats.requests_processing),
        ("llamacpp:requests_deferred", "gauge", "Number of requests deferred.", stats.requests_deferred),
        ("sim:slots", "gauge", "Requests decoded at once.", stats.slots),
        (
            "sim:max_concurrent_seen",
            "gauge",
            "Most requests held at once (processing + deferred).",
            stats.max_concurrent_seen,
        ),
        ("sim:requests_total", "counter", "Generation and embedding requests received.", stats.requests_total),
        (
            "sim:requests_abandoned_total",
            "counter",
            "Requests ended before their last token (client gone).",
            stats.requests_abandoned_total,
        ),
    )
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


def embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    digest = hashlib.shake_256(text.encode()).digest(dim * 2)
    raw = [int.from_bytes(digest[2 * i : 2 * i + 2], "little") / 32768.0 - 1.0 for i in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def embedding_inputs(body: Mapping[str, Any]) -> list[str]:
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'input' must be a string or a non-empty list")
    return [item if isinstance(item, str) else json.dumps(item) for item in inputs]


class SimApp:
    """Routes by method and path; every generation runs under ``run_until_disconnect``."""

    def __init__(self, config: SimConfig, *, sleep: Sleep = asyncio.sleep) -> None:
        self.config = config
        self.gpu = Gpu(config, sleep=sleep)
        self.ollama = OllamaEmulation(config, self.gpu)
        self.started = int(time.time())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            with contextlib.suppress(ClientGone):
                await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if path.startswith("/v1/"):
            path = path[3:]
        if method == "GET":
            await self._get(path, scope, send)
        elif method == "POST":
            await self._post(path, receive, send)
        else:
            await send_json(send, 405, openai_error(f"method {method} not allowed", code=405))

    async def _get(self, path: str, scope: Scope, send: Send) -> None:
        cfg, stats = self.config, self.gpu.stats()
        if path == "/health":
            await send_json(send, 200, {"status": "ok"})
        elif path == "/models":
            await send_json(
                send, 200, {"object": "list", "data": [model_object(cfg.model_id, self.started, cfg.context_length)]}
            )
        elif path.startswith("/models/"):
            model_id = urllib.parse.unquote(path.removeprefix("/models/"))
            if model_id == cfg.model_id:
                await send_json(send, 200, model_object(cfg.model_id, self.started, cfg.context_length))
            else:
                error = openai_error(f"The model '{model_id}' does not exist", code="model_not_found")
                await send_json(send, 404, error)
        elif path == "/metrics":
            await send_bytes(send, 200, metrics_text(stats).encode(), METRICS_TYPE)
        elif path == "/props":
            await send_json(send, 200, self._props())
        elif path == "/slots":
            query = urllib.parse.parse_qs(scope.get("query_string", b"").decode())
            if query.get("fail_on_no_slot", ["0"])[0] not in ("0", "") and stats.requests_processing >= cfg.slots:
                await send_json(send, 503, openai_error("no slot available", type_="unavailable_error", code=503))
                return
            slots = [{"id": i, "is_processing": i < stats.requests_processing} for i in range(cfg.slots)]
            await send_json(send, 200, slots)
        elif path == "/api/tags" and cfg.ollama:
            await send_json(send, 200, self.ollama.tags())
        elif path == "/api/ps" and cfg.ollama:
            await send_json(send, 200, self.ollama.ps())
        elif path == "/api/version" and cfg.ollama:
            await send_json(send, 200, {"version": "0.0.0-sim"})
        else:
            await send_json(send, 404, openai_error(f"no route GET {path}", type_="not_found_error", code=404))

    async def _post(self, path: str, receive: Receive, send: Send) -> None:
        raw = await read_body(receive)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            await send_json(send, 400, openai_error(f"invalid JSON body: {error}", code="invalid_json"))
            return
        if not isinstance(body, dict):
            await send_json(send, 400, openai_error("the JSON body must be an object", code="invalid_json"))
            return
        try:
            work = self._work(path, body, send)
        except ContextExceeded as error:
            await send_json(send, 400, error.body())
            return
        except BadRequest as error:
            await send_json(send, 400, openai_error(str(error), code="invalid_request"))
            return
        except OllamaError as error:
            await send_json(send, error.status, {"error": str(error)})
            return
        if work is None:
            await send_json(send, 404, openai_error(f"no route POST {path}", type_="not_found_error", code=404))
            return
        await run_until_disconnect(receive, work)

    def _work(self, path: str, body: Mapping[str, Any], send: Send) -> Work | None:
        """Validate the request now (raising BadRequest) and return the coroutine that answers it."""
        stream = bool(body.get("stream", False))
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, Mapping) and bool(stream_options.get("include_usage"))
        model = str(body.get("model") or self.config.model_id)
        if path == "/chat/completions":
            prompt_tokens = check_context(chat_prompt_tokens(body), self.config)
            chat = ChatWire(model, chat_reply(body, self.config), prompt_tokens)
            if stream:
                return self._stream(send, chat, include_usage)
            return self._complete(send, chat.reply, chat.prompt_tokens, chat.completion)
        if path == "/completions":
            n_tokens, hit_limit = output_limit(requested_max_tokens(body), self.config.max_output_tokens)
            prompt_tokens = check_context(completion_prompt_tokens(body), self.config)
            text = TextWire(model, text_reply(n_tokens, hit_limit), prompt_tokens)
            if stream:
                return self._stream(send, text, include_usage)
            return self._complete(send, text.reply, text.prompt_tokens, text.completion)
        if path == "/embeddings":
            return self._embeddings(send, embedding_inputs(body), model)
        if not self.config.ollama:
            return None
        if path == "/api/chat":
            return self.ollama.chat(body, send)
        if path == "/api/generate":
            return self.ollama.generate(body, send)
        if path == "/api/show":
            return send_json(send, 200, self.ollama.show(body))
        return None

    def _props(self) -> dict[str, Any]:
        """llama.cpp's ``/props`` keys that clients read: Hermes identifies llama.cpp by
        ``default_generation_settings``; the guard reads ``total_slots``."""
        cfg = self.config
        settings = {"n_ctx": cfg.context_length, "params": {"n_predict": -1}}
        return {
            "default_generation_settings": settings,
            "total_slots": cfg.slots,
            "model_alias": cfg.model_id,
            "model_path": cfg.model_id,
            "build_info": "gateway_guard-sim",
        }

    async def _complete(self, send: Send, reply: Reply, prompt_tokens: int, answer: Any) -> None:
        async with contextlib.aclosing(self.gpu.generate(prompt_tokens, len(reply.pieces))) as tokens:
            async for _ in tokens:
                pass
        await send_json(send, 200, answer())

    async def _stream(self, send: Send, wire: ChatWire | TextWire, include_usage: bool) -> None:
        stream = Stream(send, SSE_TYPE)
        n_tokens = len(wire.reply.pieces)
        start = wire.stream_start() if isinstance(wire, ChatWire) else None
        async with contextlib.aclosing(self.gpu.generate(wire.prompt_tokens, n_tokens)) as tokens:
            async for i in tokens:
                if i == 0 and start is not None:
                    await stream.sse(start)
                await stream.sse(wire.stream_piece(i))
        if n_tokens == 0 and start is not None:
            await stream.sse(start)
        await stream.sse(wire.stream_end())
        if include_usage:
            await stream.sse(wire.stream_usage(n_tokens))
        await stream.write(b"data: [DONE]\n\n")
        await stream.close()

    async def _embeddings(self, send: Send, texts: list[str], model: str) -> None:
        prompt_tokens = sum(estimate_tokens(t) for t in texts)
        await self.gpu.embed(prompt_tokens)
        data = [
            {"object": "embedding", "index": i, "embedding": embedding(t, self.config.embedding_dim)}
            for i, t in enumerate(texts)
        ]
        tokens = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        answer = {"object": "list", "data": data, "model": model, "usage": tokens}
        await send_json(send, 200, answer)
