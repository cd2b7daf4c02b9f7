"""OpenAI wire objects as llama.cpp's server writes them: completions, stream chunks, usage, models."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gateway_guard.sim.replies import Reply


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_object(model_id: str, created: int, context_length: int) -> dict[str, Any]:
    """As llama.cpp lists its model: the window under ``meta``, not at the top level."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "gateway_guard-sim",
        "meta": {"n_ctx": context_length, "n_ctx_train": context_length},
    }


@dataclass
class ChatWire:
    """The objects of one chat completion; ``stream_*`` give its SSE chunks in order."""

    model: str
    reply: Reply
    prompt_tokens: int
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "sim",
            "choices": choices,
        }

    def _delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def stream_start(self) -> dict[str, Any]:
        call = self.reply.tool_call
        if call is None:
            return self._delta({"role": "assistant", "content": ""})
        header = {"index": 0, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        return self._delta({"role": "assistant", "content": None, "tool_calls": [header]})

    def stream_piece(self, index: int) -> dict[str, Any]:
        piece = self.reply.pieces[index]
        if self.reply.tool_call is None:
            return self._delta({"content": piece})
        return self._delta({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})

    def stream_end(self) -> dict[str, Any]:
        return self._delta({}, self.reply.finish_reason)

    def stream_usage(self, completion_tokens: int) -> dict[str, Any]:
        return self._chunk([]) | {"usage": usage(self.prompt_tokens, completion_tokens)}

    def completion(self) -> dict[str, Any]:
        call = self.reply.tool_call
        message: dict[str, Any] = {"role": "assistant", "content": self.reply.text}
        if call is not None:
            function = {"name": call.name, "arguments": call.arguments}
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": call.id, "type": "function", "function": function}],
            }
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.reply.finish_reason}
        return self._chunk([choice]) | {
            "object": "chat.completion",
            "usage": usage(self.prompt_tokens, len(self.reply.pieces)),
        }


@dataclass
class TextWire:
    """The objects of one legacy ``/v1/completions`` answer."""

    model: str
    reply: Reply
    prompt_tokens: int
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _object(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "sim",
            "choices": choices,
        }

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return self._object([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}])

    def stream_piece(self, index: int) -> dict[str, Any]:
        return self._choice(self.reply.pieces[index], None)

    def stream_end(self) -> dict[str, Any]:
        return self._choice("", self.reply.finish_reason)

    def stream_usage(self, completion_tokens: int) -> dict[str, Any]:
        return self._object([]) | {"usage": usage(self.prompt_tokens, completion_tokens)}

    def completion(self) -> dict[str, Any]:
        return self._choice(self.reply.text, self.reply.finish_reason) | {
            "usage": usage(self.prompt_tokens, len(self.reply.pieces))
        }
