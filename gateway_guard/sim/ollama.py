"""An EMULATION of Ollama's native API on the sim's GPU model (no Ollama server can run on these machines).

It follows Ollama's documented wire format, not a live server: ``POST /api/chat`` and ``POST /api/generate``
stream NDJSON (one JSON object a line) unless ``"stream": false``; the last object has ``done: true``,
``done_reason``, ``prompt_eval_count``, ``eval_count`` and durations in nanoseconds. ``GET /api/tags``,
``GET /api/ps`` and ``POST /api/show`` describe the one model (``<model_id>`` or ``<model_id>:latest``);
unknown models answer 404 ``{"error": "..."}`` as Ollama does. A request with no messages (chat) or no prompt
(generate) is Ollama's "load the model" call and answers at once with ``done_reason: "load"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway_guard.sim.asgi import NDJSON_TYPE, Send, Stream, send_json
from gateway_guard.sim.model import Gpu, SimConfig
from gateway_guard.sim.replies import BadRequest, Reply, chat_messages, estimate_tokens, output_limit, text_reply

Work = Coroutine[Any, Any, None]
MODEL_SIZE = 110_000_000


class OllamaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _content_of(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


class OllamaEmulation:
    def __init__(self, config: SimConfig, gpu: Gpu) -> None:
        self.config = config
        self.gpu = gpu
        self.name = f"{config.model_id}:latest" if ":" not in config.model_id else config.model_id
        self.digest = hashlib.sha256(config.model_id.encode()).hexdigest()

    def _details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "27M",
            "quantization_level": "F32",
        }

    def _model_of(self, body: Mapping[str, Any]) -> str:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise OllamaError(400, "model is required")
        if name not in (self.config.model_id, self.name):
            raise OllamaError(404, f'model "{name}" not found, try pulling it first')
        return name

    def tags(self) -> dict[str, Any]:
        model = {
            "name": self.name,
            "model": self.name,
            "modified_at": _now(),
            "size": MODEL_SIZE,
            "digest": self.digest,
            "details": self._details(),
        }
        return {"models": [model]}

    def ps(self) -> dict[str, Any]:
        expires = (datetime.now(UTC) + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
        model = {
            "name": self.name,
            "model": self.name,
            "size": MODEL_SIZE,
            "digest": self.digest,
            "details": self._details(),
            "expires_at": expires,
            "size_vram": MODEL_SIZE,
            "context_length": self.config.context_length,
        }
        return {"models": [model]}

    def show(self, body: Mapping[str, Any]) -> dict[str, Any]:
        self._model_of(body)
        return {
            "modelfile": f"# emulated by gateway_guard.sim\nFROM {self.name}\n",
            "parameters": f"num_ctx {self.config.context_length}\nnum_predict {self.config.max_output_tokens}",
            "template": "{{ .Prompt }}",
            "details": self._details(),
            "model_info": {"general.architecture": "llama", "llama.context_length": self.config.context_length},
            "capabilities": ["completion", "tools"],
            "modified_at": _now(),
        }

    def _limit(self, body: Mapping[str, Any]) -> tuple[int, bool]:
        options = body.get("options")
        requested = options.get("num_predict") if isinstance(options, Mapping) else None
        try:
            return output_limit(requested, self.config.max_output_tokens)
        except BadRequest as error:
            raise OllamaError(400, str(error)) from error

    def chat(self, body: Mapping[str, Any], send: Send) -> Work:
        model = self._model_of(body)
        try:
            messages = chat_messages(body) if "messages" in body else []
        except BadRequest as error:
            raise OllamaError(400, str(error)) from error
        prompt = "".join(_content_of(m) for m in messages)

        def piece(text: str) -> dict[str, Any]:
            return {"message": {"role": "assistant", "content": text}}

        return self._answer(send, body, model, prompt, piece, load=not messages)

    def generate(self, body: Mapping[str, Any], send: Send) -> Work:
        model = self._model_of(body)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise OllamaError(400, "prompt must be a string")
        system = body.get("system")
        text = (system if isinstance(system, str) else "") + prompt

        def piece(text: str) -> dict[str, Any]:
            return {"response": text}

        return self._answer(send, body, model, text, piece, load=not prompt)

    def _answer(
        self,
        send: Send,
        body: Mapping[str, Any],
        model: str,
        prompt: str,
        piece: Callable[[str], dict[str, Any]],
        *,
        load: bool,
    ) -> Work:
        """Validate now; return the coroutine that answers."""
        if load:
            loaded = {"model": model, "created_at": _now(), **piece(""), "done": True, "done_reason": "load"}
            return send_json(send, 200, loaded)
        reply = text_reply(*self._limit(body))
        stream = body.get("stream", True) is not False
        return self._generate(send, model, estimate_tokens(prompt), reply, piece, stream)

    async def _generate(
        self,
        send: Send,
        model: str,
        prompt_tokens: int,
        reply: Reply,
        piece: Callable[[str], dict[str, Any]],
        stream: bool,
    ) -> None:
        n_tokens = len(reply.pieces)
        out = Stream(send, NDJSON_TYPE) if stream else None
        started = first = time.perf_counter_ns()
        async with contextlib.aclosing(self.gpu.generate(prompt_tokens, n_tokens)) as tokens:
            async for i in tokens:
                if i == 0:
                    first = time.perf_counter_ns()
                if out is not None:
                    await out.ndjson({"model": model, "created_at": _now(), **piece(reply.pieces[i]), "done": False})
        final = self._final(model, reply, prompt_tokens, started, first)
        if out is None:
            await send_json(send, 200, final | piece(reply.text))
            return
        await out.ndjson(final | piece(""))
        await out.close()

    def _final(self, model: str, reply: Reply, prompt_tokens: int, started: int, first: int) -> dict[str, Any]:
        ended = time.perf_counter_ns()
        return {
            "model": model,
            "created_at": _now(),
            "done": True,
            "done_reason": reply.finish_reason,
            "total_duration": ended - started,
            "load_duration": 0,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": first - started,
            "eval_count": len(reply.pieces),
            "eval_duration": ended - first,
        }
