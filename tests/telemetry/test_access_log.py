"""One access line per request, text or JSON, with the trace id; never the client's key."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from gateway_guard.sim import SimConfig
from gateway_guard.telemetry import JsonLogFormatter
from tests.telemetry.conftest import chat, running_guard

SECRET = "sk-test-very-secret-1"
TRACE = "0af7651916cd43dd8448eb211c80319c"
KEYS = {"keys": {"worker1": SECRET}, "profiles": {"worker1": {"lane": "batch"}}}


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    """What ``gateway_guard.access`` writes, through the JSON formatter the CLI installs for --log-json."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("gateway_guard.access")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


async def test_json_lines_carry_the_fields_and_never_the_key(
    access_lines: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good = {"authorization": f"Bearer {SECRET}", "traceparent": f"00-{TRACE}-b7ad6b7169203331-01"}
    async with running_guard(sim=SimConfig(mode="zero"), server={"log_json": True}, **KEYS) as g:
        ok = await g.client.post("/v1/chat/completions", json=chat(), headers=good)
        bad = await g.client.post("/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {SECRET}x"})
    assert (ok.status_code, bad.status_code) == (200, 401)

    lines = [json.loads(line) for line in access_lines.getvalue().splitlines()]
    assert len(lines) == 2
    first, second = lines
    assert first["logger"] == "gateway_guard.access"
    assert (first["lane"], first["profile"], first["status"], first["outcome"]) == ("batch", "worker1", 200, "admitted")
    assert first["trace_id"] == TRACE
    assert first["wait_s"] >= 0 and first["duration_s"] > 0
    assert first["completion_tokens"] > 0
    assert (second["status"], second["outcome"]) == (401, "rejected_client")
    assert SECRET not in access_lines.getvalue()
    assert SECRET not in caplog.text, "no log line of any logger carries the key"


async def test_text_lines_name_lane_profile_status_wait_duration_outcome(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway_guard.access")
    async with running_guard(sim=SimConfig(mode="zero")) as g:
        r = await g.client.post("/v1/chat/completions", json=chat(), headers={"x-guard-profile": "alice"})
        assert r.status_code == 200
    (line,) = [r.getMessage() for r in caplog.records if r.name == "gateway_guard.access"]
    assert line.startswith("POST /v1/chat/completions status=200 outcome=admitted lane=batch profile=alice ")
    assert " wait=" in line and " duration=" in line and " ttft=" in line
    assert "trace_id" not in line, "no client trace and tracing off: no trace id to show"


def test_the_json_formatter_writes_valid_json_whatever_the_message() -> None:
    record = logging.LogRecord("gateway_guard", logging.WARNING, __file__, 1, 'quote " and \\ and %s', ("x",), None)
    line = json.loads(JsonLogFormatter().format(record))
    assert (line["level"], line["logger"], line["msg"]) == ("WARNING", "gateway_guard", 'quote " and \\ and x')
