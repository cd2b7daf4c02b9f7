"""What the sim answers: how many tokens, which words, and the scripted reply that finishes a Hermes kanban card.

Scripted mode, for end-to-end runs with real Hermes workers (a random-weight model never finishes a card):
when the request offers the ``kanban_complete`` tool and the conversation holds no result of it yet, the reply
is one ``kanban_complete`` call. Its arguments follow Hermes Agent 0.19.0 (``tools/kanban_tools.py``,
``_handle_complete``): ``summary`` or ``result`` is required, ``metadata`` is a free-form dict, and
``task_id`` defaults to the worker's ``HERMES_KANBAN_TASK``, so it is left out. Once the tool's result is in
the conversation, the reply is a short final text, and the worker ends.

Multi-step (``SimConfig.steps`` = K > 1), the shape of real agent work: the K tool-calling turns are
``kanban_show``, then ``terminal`` (``sleep tool_seconds``: tool time in which the card holds no GPU slot)
and ``kanban_comment`` in turn, and ``kanban_complete`` last; K + 1 LLM calls a card. The turn is counted
from the assistant tool calls already in the conversation. These tools run unattended in a kanban worker
(Hermes 0.19.0): the kanban tools act on the worker's own task (``HERMES_KANBAN_TASK``), and ``terminal``
asks for approval only for commands matching ``tools/approval.py``'s dangerous patterns (``sleep`` does
not); ``clarify`` would wait for a human and ``delegate_task`` would start more agents, so the script
uses neither.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway_guard.sim.model import SimConfig

KANBAN_COMPLETE = "kanban_complete"
STEP_TOOLS = ("kanban_show", "terminal", "kanban_comment")
COMMENT = "Simulated progress note from the gateway_guard sim."
TASK_ID = re.compile(r"\bt_[0-9a-f]{4,}\b")
WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do")
FINAL_TEXT = "Done: the card is marked complete."
SUMMARY = "Simulated work: the gateway_guard sim answered this card; no real work was done."


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Reply:
    """One answer: ``pieces`` are its tokens' texts (the tool call's arguments when ``tool_call`` is set)."""

    pieces: tuple[str, ...]
    finish_reason: str
    tool_call: ToolCall | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class BadRequest(ValueError):
    """The body is valid JSON but not a request the endpoint understands."""


class ContextExceeded(BadRequest):
    """The prompt alone is longer than the context window (llama.cpp's ``exceed_context_size_error``)."""

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"request ({prompt_tokens} tokens) exceeds the available context size ({context_length} tokens),"
            " try increasing it"
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length

    def body(self) -> dict[str, Any]:
        error = {"code": 400, "message": str(self), "type": "exceed_context_size_error"}
        return {"error": error | {"n_prompt_tokens": self.prompt_tokens, "n_ctx": self.context_length}}


def check_context(prompt_tokens: int, config: SimConfig) -> int:
    if prompt_tokens > config.context_length:
        raise ContextExceeded(prompt_tokens, config.context_length)
    return prompt_tokens


def estimate_tokens(text: str) -> int:
    """About four characters a token; at least one."""
    return max(1, math.ceil(len(text) / 4))


def output_limit(requested: object, cap: int) -> tuple[int, bool]:
    """Tokens to generate for a requested maximum, and whether that maximum (not the sim's cap) ends the reply."""
    if requested is None or (isinstance(requested, int) and not isinstance(requested, bool) and requested < 0):
        return cap, False
    if not isinstance(requested, int) or isinstance(requested, bool):
        raise BadRequest(f"max_tokens must be an integer, got {requested!r}")
    return min(requested, cap), requested <= cap


def text_reply(n_tokens: int, hit_limit: bool) -> Reply:
    pieces = tuple((" " if i else "") + WORDS[i % len(WORDS)] for i in range(n_tokens))
    return Reply(pieces, "length" if hit_limit else "stop")


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return ""


def chat_messages(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise BadRequest("'messages' must be a list of objects")
    return messages


def chat_prompt_tokens(body: Mapping[str, Any]) -> int:
    parts = [_content_text(m.get("content")) for m in chat_messages(body)]
    parts += [json.dumps(m["tool_calls"]) for m in chat_messages(body) if m.get("tool_calls")]
    if body.get("tools"):
        parts.append(json.dumps(body["tools"]))
    return estimate_tokens("".join(parts))


def completion_prompt_tokens(body: Mapping[str, Any]) -> int:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return estimate_tokens(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return len(prompt)  # already tokens
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return estimate_tokens("".join(prompt))
    raise BadRequest("'prompt' must be a string, a list of strings or a list of token ids")


def requested_max_tokens(body: Mapping[str, Any]) -> object:
    return body.get("max_completion_tokens", body.get("max_tokens"))


def chat_reply(body: Mapping[str, Any], config: SimConfig) -> Reply:
    n_tokens, hit_limit = output_limit(requested_max_tokens(body), config.max_output_tokens)
    if config.mode == "scripted":
        scripted = scripted_reply(chat_messages(body), body.get("tools"), n_tokens, config)
        if scripted is not None:
            return scripted
    return text_reply(n_tokens, hit_limit)


def offers_tool(tools: object, name: str) -> bool:
    if not isinstance(tools, list):
        return False
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and function.get("name") == name:
            return True
    return False


def has_tool_result(messages: Sequence[Mapping[str, Any]], name: str) -> bool:
    """True when a ``tool`` message answers a call of ``name`` (matched by call id, or by the message's name)."""
    call_ids = set()
    for message in messages:
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping) and function.get("name") == name:
                call_ids.add(call.get("id"))
    return any(
        m.get("role") == "tool" and (m.get("name") == name or m.get("tool_call_id") in call_ids) for m in messages
    )


def kanban_complete_arguments(config: SimConfig) -> dict[str, Any]:
    return {"summary": SUMMARY, "metadata": {"simulated": True, "sim_model": config.model_id}}


def scripted_reply(
    messages: Sequence[Mapping[str, Any]], tools: object, n_tokens: int, config: SimConfig
) -> Reply | None:
    """The kanban_complete call, or the final text after its result; None when the request is no kanban turn.

    The arguments are written whole even when ``n_tokens`` is smaller (a sim simplification): a cut call
    would only make the worker fail.
    """
    if not offers_tool(tools, KANBAN_COMPLETE):
        return None
    if has_tool_result(messages, KANBAN_COMPLETE):
        words = FINAL_TEXT.split(" ")
        return Reply(tuple((" " if i else "") + w for i, w in enumerate(words)), "stop")
    name, args = next_step(messages, tools, config)
    arguments = json.dumps(args)
    n_pieces = max(1, min(n_tokens, estimate_tokens(arguments)))
    size = math.ceil(len(arguments) / n_pieces)
    pieces = tuple(arguments[i : i + size] for i in range(0, len(arguments), size))
    call = ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=arguments)
    return Reply(pieces, "tool_calls", call)


def turns_taken(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for m in messages if m.get("role") == "assistant" and m.get("tool_calls"))


def task_id(messages: Sequence[Mapping[str, Any]]) -> str | None:
    for message in messages:
        if message.get("role") == "user":
            found = TASK_ID.search(_content_text(message.get("content")))
            if found:
                return found.group(0)
    return None


def next_step(messages: Sequence[Mapping[str, Any]], tools: object, config: SimConfig) -> tuple[str, dict[str, Any]]:
    """The tool call of this turn of the script: ``kanban_complete`` on the last turn (or when the tool the
    script wants is not offered, or no task id is known for a comment)."""
    turn = turns_taken(messages)
    if turn < config.steps - 1:
        name = STEP_TOOLS[turn % len(STEP_TOOLS)]
        if offers_tool(tools, name):
            if name == "kanban_show":
                return name, {}
            if name == "terminal":
                return name, {"command": f"sleep {config.tool_seconds:g}", "timeout": int(config.tool_seconds) + 60}
            tid = task_id(messages)
            if tid is not None:
                return name, {"task_id": tid, "body": COMMENT}
    return KANBAN_COMPLETE, kanban_complete_arguments(config)
