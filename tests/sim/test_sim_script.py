"""The scripted multi-step card: the tool calls a Hermes kanban worker gets, turn by turn, from the sim's replies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway_guard.sim.model import SimConfig
from gateway_guard.sim.replies import chat_reply

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hermes-0.19.0-chat-request.json"


def hermes_request() -> dict[str, Any]:
    """A real Hermes 0.19.0 worker's first chat request (27 tools, the task id in the user message)."""
    body: dict[str, Any] = json.loads(FIXTURE.read_text())["body"]
    return body


def play(config: SimConfig, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Answer turn after turn as a worker would (each tool call followed by its result) until the final text."""
    messages = list(body["messages"])
    calls: list[tuple[str, dict[str, Any]]] = []
    for turn in range(20):
        reply = chat_reply({**body, "messages": messages}, config)
        if reply.tool_call is None:
            assert reply.finish_reason == "stop" and reply.text
            return calls
        call = reply.tool_call
        args = json.loads(call.arguments)
        assert "".join(reply.pieces) == call.arguments
        calls.append((call.name, args))
        made = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        messages += [{"role": "assistant", "content": None, "tool_calls": [made]},
                     {"role": "tool", "tool_call_id": call.id, "content": f'{{"ok": true, "turn": {turn}}}'}]
    raise AssertionError(f"no final text after 20 turns: {calls}")


def test_one_step_is_the_old_script() -> None:
    calls = play(SimConfig(mode="scripted"), hermes_request())
    assert [name for name, _ in calls] == ["kanban_complete"]


def test_k_steps_show_sleep_comment_then_complete() -> None:
    body = hermes_request()
    tid = body["messages"][1]["content"].split()[-1]
    calls = play(SimConfig(mode="scripted", steps=6, tool_seconds=2.5), body)
    assert [name for name, _ in calls] == [
        "kanban_show", "terminal", "kanban_comment", "kanban_show", "terminal", "kanban_complete",
    ]
    assert calls[0][1] == {}
    assert calls[1][1] == {"command": "sleep 2.5", "timeout": 62}
    assert calls[2][1]["task_id"] == tid and calls[2][1]["body"]
    assert calls[-1][1]["summary"]


def test_a_tool_not_offered_ends_the_card() -> None:
    body = hermes_request()
    body["tools"] = [t for t in body["tools"] if t["function"]["name"] != "terminal"]
    calls = play(SimConfig(mode="scripted", steps=4), body)
    assert [name for name, _ in calls] == ["kanban_show", "kanban_complete"]


def test_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="steps"):
        SimConfig(steps=0)
    with pytest.raises(ValueError, match="tool_seconds"):
        SimConfig(tool_seconds=-1)
