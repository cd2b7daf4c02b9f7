"""Locust scenarios for gateway_guard, or for any OpenAI-compatible server (llama.cpp, vLLM, Ollama's /v1).

Three kinds of users, all streaming ``POST /v1/chat/completions``:

* ``InteractiveChat`` - a person chatting: short prompts, ``X-Guard-Lane: interactive``, a think time between
  turns. Its time to first token is recorded as its own statistic (type ``TTFT``, name ``interactive``).
* ``BatchWorker`` - a Hermes kanban worker: the real request Hermes Agent 0.19.0 sends (12.5 kB system prompt,
  27 tools, ``stream_options.include_usage``, its client headers) from ``tests/fixtures/``, with ``model`` and
  ``max_tokens`` overridden to fit the server. No lane header, like Hermes: the guard's default lane (batch)
  or the API key's profile decides. Closed loop: the next request follows the last at once.
* ``DisconnectStorm`` - a client that reads a few chunks of a stream and hangs up, over and over: the server
  should stop generating for it, and a guard should free its slot at once.

Headless, with the CSV and HTML reports (see loadtest/README.md)::

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8090 -u 20 -r 5 -t 2m \\
        --interactive-weight 1 --batch-weight 4 --storm-weight 1 --llm-model MODEL \\
        --csv loadtest/reports/run --html loadtest/reports/run.html

Each option can also come from the environment (``LOADTEST_MODEL``, ``LOADTEST_API_KEY``, ...; see ``--help``).
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, events, task
from locust.env import Environment

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "hermes-0.19.0-chat-request.json"
# Headers of the captured request that describe the transport or the credentials, not the client.
FIXTURE_HEADERS_DROPPED = {"host", "content-length", "connection", "accept-encoding", "authorization"}

INTERACTIVE_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about a busy GPU.",
    "Explain a mutex in one sentence.",
    "Give me three names for a cat.",
    "How do I reverse a list in Python?",
    "Summarise the plot of Hamlet in two lines.",
)


# -- command line -------------------------------------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any, **_: Any) -> None:
    parser.add_argument("--llm-model", env_var="LOADTEST_MODEL", default="default", help="model name sent")
    parser.add_argument("--api-key", env_var="LOADTEST_API_KEY", default="", is_secret=True, help="Bearer key")
    parser.add_argument(
        "--batch-api-key",
        env_var="LOADTEST_BATCH_API_KEY",
        default="",
        is_secret=True,
        help="key of the batch workers (default: --api-key); with a guard that maps keys to profiles",
    )
    parser.add_argument("--chat-path", default="/v1/chat/completions", help="appended to --host")
    parser.add_argument("--interactive-weight", type=int, env_var="LOADTEST_INTERACTIVE_WEIGHT", default=1)
    parser.add_argument("--batch-weight", type=int, env_var="LOADTEST_BATCH_WEIGHT", default=4)
    parser.add_argument("--storm-weight", type=int, env_var="LOADTEST_STORM_WEIGHT", default=0)
    parser.add_argument(
        "--interactive-count", type=int, default=0, help="fixed number of interactive users (overrides weight)"
    )
    parser.add_argument("--batch-count", type=int, default=0, help="fixed number of batch users (overrides weight)")
    parser.add_argument("--storm-count", type=int, default=0, help="fixed number of storm users (overrides weight)")
    parser.add_argument("--interactive-max-tokens", type=int, env_var="LOADTEST_INTERACTIVE_MAX_TOKENS", default=32)
    parser.add_argument(
        "--batch-max-tokens",
        type=int,
        env_var="LOADTEST_BATCH_MAX_TOKENS",
        default=64,
        help="replaces Hermes' 65536 so a request ends in seconds",
    )
    parser.add_argument("--interactive-think", type=float, default=3.0, help="mean seconds between chat turns")
    parser.add_argument("--batch-think", type=float, default=0.0, help="seconds between a worker's requests")
    parser.add_argument("--storm-chunks", type=int, default=3, help="chunks a storm user reads before hanging up")
    parser.add_argument("--storm-think", type=float, default=1.0, help="seconds between abandoned streams")
    parser.add_argument(
        "--ignore-eos",
        action="store_true",
        env_var="LOADTEST_IGNORE_EOS",
        help='send "ignore_eos": true (llama.cpp, vLLM): every reply is exactly max_tokens long',
    )
    parser.add_argument("--no-lane-header", action="store_true", help="interactive users send no X-Guard-Lane")
    parser.add_argument("--hermes-fixture", default=str(DEFAULT_FIXTURE), help="captured Hermes request (JSON)")
    parser.add_argument(
        "--batch-system-chars",
        type=int,
        default=0,
        help="cut Hermes' 12.5 kB system prompt to this many characters (0: keep it) for small-context servers",
    )
    parser.add_argument("--batch-no-tools", action="store_true", help="drop Hermes' 27 tool definitions")
    parser.add_argument("--read-timeout", type=float, default=600.0, help="seconds to wait for the next bytes")


DEFAULTS: dict[str, Any] = {
    "llm_model": "default",
    "api_key": "",
    "batch_api_key": "",
    "chat_path": "/v1/chat/completions",
    "interactive_max_tokens": 32,
    "batch_max_tokens": 64,
    "interactive_think": 3.0,
    "batch_think": 0.0,
    "storm_chunks": 3,
    "storm_think": 1.0,
    "ignore_eos": False,
    "no_lane_header": False,
    "hermes_fixture": str(DEFAULT_FIXTURE),
    "batch_system_chars": 0,
    "batch_no_tools": False,
    "read_timeout": 600.0,
}


def option(environment: Environment, name: str) -> Any:
    """A parsed option, or its default when the file runs without Locust's command line (library use)."""
    return getattr(environment.parsed_options, name, DEFAULTS.get(name))


@events.init.add_listener
def apply_weights(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None:
        return
    for cls, weight, count in (
        (InteractiveChat, opts.interactive_weight, opts.interactive_count),
        (BatchWorker, opts.batch_weight, opts.batch_count),
        (DisconnectStorm, opts.storm_weight, opts.storm_count),
    ):
        cls.weight = max(0, weight)
        cls.fixed_count = max(0, count)
    kept = [u for u in environment.user_classes if u.weight > 0 or u.fixed_count > 0]
    if not kept:
        raise ValueError("every user class has weight 0 and count 0: set --interactive/--batch/--storm-weight")
    environment.user_classes[:] = kept


# -- requests -----------------------------------------------------------------------------------------------------


def load_hermes_request(environment: Environment) -> tuple[dict[str, Any], dict[str, str]]:
    """(body, headers) of the captured Hermes request, adjusted by the options."""
    captured = json.loads(Path(option(environment, "hermes_fixture")).read_text(encoding="utf-8"))
    body = copy.deepcopy(captured["body"])
    body["model"] = option(environment, "llm_model")
    body["max_tokens"] = option(environment, "batch_max_tokens")
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    if option(environment, "ignore_eos"):
        body["ignore_eos"] = True
    cut = option(environment, "batch_system_chars")
    if cut > 0:
        for message in body["messages"]:
            if message.get("role") == "system" and isinstance(message.get("content"), str):
                message["content"] = message["content"][:cut]
    if option(environment, "batch_no_tools"):
        body.pop("tools", None)
    headers = {k: v for k, v in captured.get("headers", {}).items() if k.lower() not in FIXTURE_HEADERS_DROPPED}
    return body, headers


def sse_data(line: bytes) -> bytes | None:
    """The payload of an SSE ``data:`` line, else None."""
    if line.startswith(b"data:"):
        return line[5:].strip()
    return None


def has_content(payload: bytes) -> bool:
    """True for a chunk that carries generated text (or a tool call), not just the role or usage."""
    try:
        chunk = json.loads(payload)
    except ValueError:
        return False
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content"):
            return True
    return False


class ChatUser(HttpUser):
    """Common streaming logic; not run itself."""

    abstract = True
    stat_name = "chat"
    wants_usage = False

    def headers(self) -> dict[str, str]:
        key = option(self.environment, "api_key")
        headers = {"Accept": "text/event-stream"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def stream_chat(self, body: dict[str, Any], headers: dict[str, str], *, abandon_after: int = 0) -> bool:
        """POST a streamed chat; one Locust entry for the whole stream, one ``TTFT`` entry for its first token.

        ``abandon_after`` > 0 reads that many SSE events and then closes the connection mid-stream. Returns
        whether the request succeeded.
        """
        path = option(self.environment, "chat_path")
        timeout = (10.0, option(self.environment, "read_timeout"))
        t0 = time.perf_counter()
        with self.client.post(
            path, json=body, headers=headers, stream=True, catch_response=True, name=self.stat_name, timeout=timeout
        ) as response:
            if response.status_code != 200:
                text = response.text[:200] if response.status_code else str(response.error)
                response.failure(f"HTTP {response.status_code}: {text}")
                return False
            events_seen = 0
            nbytes = 0
            first_token: float | None = None
            done = False
            usage = False
            try:
                for line in response.iter_lines(chunk_size=None):
                    nbytes += len(line) + 1
                    payload = sse_data(line)
                    if payload is None:
                        continue
                    events_seen += 1
                    if payload == b"[DONE]":
                        done = True
                        break
                    if first_token is None and has_content(payload):
                        first_token = time.perf_counter()
                        self.environment.events.request.fire(
                            request_type="TTFT",
                            name=self.stat_name,
                            response_time=(first_token - t0) * 1000,
                            response_length=0,
                            exception=None,
                            context={},
                        )
                    if b'"usage"' in payload and b'"usage":null' not in payload.replace(b" ", b""):
                        usage = True
                    if abandon_after and events_seen >= abandon_after:
                        response.close()  # hang up mid-stream: the server should stop generating
                        break
            except Exception as exc:  # connection reset, read timeout, ...: a failed stream, not a crash
                response.failure(f"stream broken after {events_seen} events: {type(exc).__name__}: {exc}")
                return False
            response.request_meta["response_time"] = (time.perf_counter() - t0) * 1000
            response.request_meta["response_length"] = nbytes
            if abandon_after:
                problem = None if events_seen >= abandon_after or done else "ended before the hang-up point"
            elif not done:
                problem = "ended without [DONE]"
            elif first_token is None:
                problem = "finished without any generated token"
            elif self.wants_usage and not usage:
                problem = "finished without a usage chunk (stream_options.include_usage)"
            else:
                problem = None
            if problem is None:
                response.success()
                return True
            response.failure(f"stream {problem} ({events_seen} events)")
            return False


class InteractiveChat(ChatUser):
    """A person chatting: short prompts, streamed, first in line at the guard."""

    weight = 1
    stat_name = "interactive"

    def wait_time(self) -> float:
        mean = option(self.environment, "interactive_think")
        return float(random.uniform(0.5 * mean, 1.5 * mean))

    @task
    def chat(self) -> None:
        body: dict[str, Any] = {
            "model": option(self.environment, "llm_model"),
            "messages": [{"role": "user", "content": random.choice(INTERACTIVE_PROMPTS)}],
            "max_tokens": option(self.environment, "interactive_max_tokens"),
            "stream": True,
        }
        if option(self.environment, "ignore_eos"):
            body["ignore_eos"] = True
        headers = self.headers()
        if not option(self.environment, "no_lane_header"):
            headers["X-Guard-Lane"] = "interactive"
        self.stream_chat(body, headers)


class BatchWorker(ChatUser):
    """A Hermes kanban worker: the real Hermes request shape, streamed with usage, back to back."""

    weight = 4
    stat_name = "batch"
    wants_usage = True

    def on_start(self) -> None:
        self.body, self.fixture_headers = load_hermes_request(self.environment)

    backoff = 0.0

    def wait_time(self) -> float:
        return max(self.backoff, float(option(self.environment, "batch_think")))

    def headers(self) -> dict[str, str]:
        headers = {**self.fixture_headers, **super().headers()}
        key = option(self.environment, "batch_api_key")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    @task
    def work(self) -> None:
        ok = self.stream_chat(self.body, self.headers())
        self.backoff = 0.0 if ok else 1.0  # closed loop, but no tight loop of failures (a down server)


class DisconnectStorm(ChatUser):
    """Opens a stream, reads ``--storm-chunks`` events, hangs up; again after ``--storm-think`` seconds."""

    weight = 1  # Locust drops weight-0 classes before the options are read: --storm-weight (default 0) sets it
    stat_name = "abandoned"

    def wait_time(self) -> float:
        return float(option(self.environment, "storm_think"))

    @task
    def abandon(self) -> None:
        body: dict[str, Any] = {
            "model": option(self.environment, "llm_model"),
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
            "max_tokens": max(64, option(self.environment, "batch_max_tokens")),
            "stream": True,
        }
        if option(self.environment, "ignore_eos"):
            body["ignore_eos"] = True
        self.stream_chat(body, self.headers(), abandon_after=max(1, option(self.environment, "storm_chunks")))
