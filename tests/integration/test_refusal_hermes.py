"""Every refusal the guard can make, read the way a Hermes 0.19.0 worker reads it.

A Hermes worker honours ``Retry-After`` only for an error it classifies as a rate limit; a 429 whose message
matches one of its overload phrases is "overloaded" and gets a short jittered backoff instead (FACTS.md). The
phrases are read from the installed wheel (``agent/error_classifier.py``, ``_OVERLOADED_PATTERNS``) so this
test follows Hermes when it changes, and each refusal is also handed to Hermes' own ``classify_api_error``
(run in ``.venv-hermes``) as the openai SDK there builds the error from the guard's answer.

The guard is served by uvicorn in this loop on a real socket; the upstream is the simulated GPU (or a port
where nothing listens, for an upstream that is down). That the openai SDK waits the Retry-After before its
retry is tested in ``test_guard_openai_sdk.py`` (``test_sdk_honours_retry_after_and_its_retry_succeeds``).
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import os
import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_guard.sim import SimConfig, build_sim_app
from tests.integration.conftest import CHAT_PATH, guard_in_process, guard_settings, wait_all_free
from tests.support.inprocess import serve_in_process
from tests.support.llamacpp import REPO_ROOT, free_port
from tests.support.outage import guard_with_config

HERMES_VENV = Path(os.environ.get("GUARD_TEST_HERMES") or REPO_ROOT / ".venv-hermes" / "bin" / "hermes").parents[1]
CLASSIFIERS = sorted(HERMES_VENV.glob("lib/python3*/site-packages/agent/error_classifier.py"))
BODY = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
WORKER = {"X-Guard-Profile": "worker"}


def hermes_overload_phrases() -> list[str]:
    """``_OVERLOADED_PATTERNS`` from the installed Hermes wheel, read without importing it."""
    if not CLASSIFIERS:
        pytest.skip(f"Hermes is not installed under {HERMES_VENV} (./run-tests installs it)")
    tree = ast.parse(CLASSIFIERS[0].read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_OVERLOADED_PATTERNS" for t in node.targets):
            phrases = ast.literal_eval(node.value)
            assert isinstance(phrases, list) and all(isinstance(p, str) for p in phrases)
            return phrases
    raise AssertionError(f"_OVERLOADED_PATTERNS not found in {CLASSIFIERS[0]}: Hermes changed, read it again")


HERMES_CLASSIFY = """
import json, sys
import httpx, openai
from agent.error_classifier import classify_api_error

client = openai.OpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1")
out = {}
for case in json.load(sys.stdin):
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx.Response(case["status"], headers=case["headers"], content=case["body"].encode(), request=request)
    error = client._make_status_error_from_response(response)  # what the SDK raises for this answer
    classified = classify_api_error(error, provider="custom", model="sim")
    out[case["name"]] = {"reason": classified.reason.value, "sdk_error": type(error).__name__}
print(json.dumps(out))
"""


def hermes_classify(refusals: dict[str, httpx.Response]) -> dict[str, dict[str, str]]:
    cases = [
        {"name": name, "status": r.status_code, "headers": dict(r.headers), "body": r.text}
        for name, r in refusals.items()
    ]
    python = HERMES_VENV / "bin" / "python"
    proc = subprocess.run(
        [str(python), "-c", HERMES_CLASSIFY],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith(("HERMES_", "GUARD"))},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, dict[str, str]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def sim() -> Any:
    return build_sim_app(SimConfig(slots=4, tokens_per_second=20.0, ttft=0.01, max_output_tokens=1000))


@dataclass
class Holder:
    """A stream that holds the guard's only slot until closed."""

    response: httpx.Response

    async def close(self) -> None:
        await self.response.aclose()


@asynccontextmanager
async def holding(http: httpx.AsyncClient, guard: str) -> AsyncIterator[Holder]:
    body = BODY | {"max_tokens": 1000, "stream": True}
    request = http.build_request("POST", f"{guard}{CHAT_PATH}", json=body, headers={"X-Guard-Profile": "holder"})
    response = await http.send(request, stream=True)
    assert response.status_code == 200, await response.aread()
    chunks = response.aiter_raw()
    await anext(chunks)  # the stream has begun: the slot is taken
    try:
        yield Holder(response)
    finally:
        await response.aclose()


async def refused(overrides: dict[str, Any], *, upstream_down: bool = False, first_ok: bool = False) -> httpx.Response:
    """One refusal from a guard configured by ``overrides`` (cap 1, batch lane) while its slot is taken."""
    settings_overrides = {"upstreams.default.max_inflight": 1, "lanes.batch.headroom": 0, **overrides}
    async with serve_in_process(sim()) as up:
        url = f"http://127.0.0.1:{free_port()}" if upstream_down else up
        async with (
            guard_in_process(guard_settings(url, **settings_overrides)) as (guard, _),
            httpx.AsyncClient(timeout=30) as http,
        ):
            if upstream_down:
                response = await http.post(f"{guard}{CHAT_PATH}", json=BODY, headers=WORKER)
            else:
                if first_ok:
                    assert (await http.post(f"{guard}{CHAT_PATH}", json=BODY, headers=WORKER)).status_code == 200
                async with holding(http, guard):
                    response = await http.post(f"{guard}{CHAT_PATH}", json=BODY, headers=WORKER)
                await wait_all_free(http, guard)
    return response


CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "queue_full": ({"lanes.batch.queue_size": 0}, {}),
    "queue_deadline_exceeded": ({"lanes.batch.queue_timeout": 0.3}, {}),
    "profile_queue_full": ({"profiles.worker.max_queued": 0}, {}),
    "rate_limited": ({"profiles.worker.requests_per_minute": 1, "lanes.batch.queue_timeout": 0.3}, {"first_ok": True}),
    "deadline_upstream_down": ({"lanes.batch.queue_timeout": 0.5}, {"upstream_down": True}),
}


async def test_every_refusal_is_a_rate_limit_to_hermes_with_an_honest_retry_after() -> None:
    phrases = hermes_overload_phrases()
    assert "overloaded" in phrases and "at capacity" in phrases, phrases  # the list is the one FACTS.md names
    names = list(CASES)
    answers = await asyncio.gather(*(refused(CASES[n][0], **CASES[n][1]) for n in names))
    refusals = dict(zip(names, answers, strict=True))

    for name, response in refusals.items():
        assert response.status_code == 429, (name, response.status_code, response.text)
        retry_after = response.headers.get("retry-after")
        assert retry_after is not None and retry_after.isdigit() and 1 <= int(retry_after) <= 600, (name, retry_after)
        error = response.json()["error"]
        assert error["type"] == "rate_limit_error" and error["lane"] == "batch", (name, error)
        assert error["retry_after_seconds"] == int(retry_after), (name, error)
        text = response.text.lower()
        said = [p for p in phrases if p in text]
        assert not said, f"{name}: the refusal says {said}, which Hermes reads as 'overloaded': {error['message']}"
    codes = {name: r.json()["error"]["code"] for name, r in refusals.items()}
    assert codes == {
        "queue_full": "queue_full",
        "queue_deadline_exceeded": "queue_deadline_exceeded",
        "profile_queue_full": "profile_queue_full",
        "rate_limited": "rate_limited",
        "deadline_upstream_down": "queue_deadline_exceeded",
    }, codes
    assert "not ready" in refusals["deadline_upstream_down"].json()["error"]["message"]

    classified = hermes_classify(refusals)
    assert {n: c["reason"] for n, c in classified.items()} == dict.fromkeys(names, "rate_limit"), classified
    assert {c["sdk_error"] for c in classified.values()} == {"RateLimitError"}, classified


async def test_a_lane_that_asks_for_503_gets_it_with_retry_after() -> None:
    response = await refused({"lanes.batch.queue_size": 0, "lanes.batch.refusal_status": 503})
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"].isdigit()
    said = [p for p in hermes_overload_phrases() if p in response.text.lower()]
    assert not said, said


# -- a real Hermes worker, refused, waits the Retry-After ------------------------------------------------------

HERMES_GUARD_CONFIG = """
[server]
host = "127.0.0.1"
default_lane = "batch"

[lanes.batch]
headroom = 0
queue_timeout = 0.5
requests_per_minute = 6

[upstreams.default]
url = "{sim}"
max_inflight = 2

[profiles.w]
lane = "batch"

[profiles.drain]
lane = "batch"

[keys]
w = "sk-hermes-w"
drain = "sk-drain"
"""
ACCESS = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO gateway_guard\.access: POST /v1/chat/completions "
    r"status=(\d+) outcome=\S+ lane=\S+ profile=(\S+) upstream=\S+ wait=\S+ duration=([\d.]+)s(.*)$",
    re.M,
)


@dataclass
class Call:
    ended: float  # the access log's timestamp, seconds
    status: int
    duration: float
    room_in: float | None  # for a 429: "room again in X s" (Retry-After is X rounded up, at least 1)

    @property
    def started(self) -> float:
        return self.ended - self.duration


def worker_calls(log: str) -> list[Call]:
    calls = []
    for stamp, status, profile, duration, rest in ACCESS.findall(log):
        if profile != "w":
            continue
        at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        room = re.search(r"room again in ([\d.]+)s", rest)
        calls.append(Call(at, int(status), float(duration), float(room[1]) if room else None))
    return calls


@pytest.mark.slow
@pytest.mark.hermes
async def test_a_real_hermes_worker_waits_the_retry_after_between_attempts(tmp_path: Path) -> None:
    """The batch lane's rate (6 a minute) is kept full by another profile until the worker's first call is
    refused; the worker must come back after the Retry-After it was given, not after its own 2-3 s backoff."""
    hermes = HERMES_VENV / "bin" / "hermes"
    if not hermes.exists():
        pytest.skip(f"hermes CLI not found at {hermes}")
    home = tmp_path / "hermes"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERMES_", "GUARD"))}
    env |= {"HERMES_HOME": str(home), "HERMES_DISABLE_LAZY_INSTALLS": "1"}
    async with serve_in_process(build_sim_app(SimConfig(slots=4, tokens_per_second=500.0, ttft=0.01))) as sim_url:
        config = tmp_path / "guard.toml"
        config.write_text(HERMES_GUARD_CONFIG.format(sim=sim_url))
        log = tmp_path / "guard.log"
        with guard_with_config(config, log) as (guard, _pid):
            for name, value in (
                ("model.provider", "custom"),
                ("model.base_url", f"{guard}/v1"),
                ("model.api_key", "sk-hermes-w"),
                ("model.default", "sim"),
            ):  # one at a time: each rewrites config.yaml
                proc = await asyncio.create_subprocess_exec(
                    str(hermes), "config", "set", name, value, env=env, stdout=subprocess.DEVNULL
                )
                assert await proc.wait() == 0
            stop = asyncio.Event()

            async def drain() -> None:
                """Keep the lane's bucket empty (one request always waiting for the next unit) until the
                worker has been refused once."""
                headers = {"Authorization": "Bearer sk-drain"}
                async with httpx.AsyncClient(timeout=30) as http:
                    while not stop.is_set():
                        await http.post(f"{guard}{CHAT_PATH}", json=BODY, headers=headers)
                        if any(c.status == 429 for c in worker_calls(log.read_text())):
                            stop.set()

            drainer = asyncio.create_task(drain())
            worker = await asyncio.create_subprocess_exec(
                str(hermes), "chat", "-Q", "-q", "Say hello.", env=env, cwd=tmp_path,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                async with asyncio.timeout(240):
                    output, _ = await worker.communicate()
            finally:
                stop.set()
                if worker.returncode is None:
                    worker.kill()
                    await worker.wait()
                await drainer
        calls = worker_calls(log.read_text())
    assert worker.returncode == 0, output.decode(errors="replace")[-3000:]
    refused = [i for i, c in enumerate(calls) if c.status == 429]
    assert refused, f"the worker was never refused: {calls}"
    assert calls[-1].status == 200, calls
    for i in refused:
        call, retry = calls[i], calls[i + 1]
        assert call.room_in is not None
        retry_after = max(1, math.ceil(call.room_in))
        waited = retry.started - call.ended
        # Hermes' own backoff for a first retry is 2-3 s; honouring Retry-After, it waits just that long.
        assert retry_after - 0.15 <= waited <= retry_after + 1.0, (waited, retry_after, calls)
    seen = [(c.status, c.room_in, round(calls[n + 1].started - c.ended, 2) if n in refused else None)
            for n, c in enumerate(calls)]  # fmt: skip
    print(f"\nthe worker's chat calls (status, room again in s, waited s): {seen}")
