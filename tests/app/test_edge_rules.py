"""The edge's pure rules, with plain values: strict paths, defensive JSON, the body budget, what goes upstream,
escaped log fields, URL userinfo. (The live-process attacks are in tests/integration/test_edge_attacks.py.)"""

from __future__ import annotations

import json
import logging

import pytest

from gateway_guard.app.asgi import BodyBudget, BodyBudgetFull, Message
from gateway_guard.app.body import model_of, parse_json
from gateway_guard.app.paths import BadPath, check, encoded, is_admin_only, is_proxied, needs_permit, request_path
from gateway_guard.errors import ClientError, ConfigError, InvalidJSON
from gateway_guard.settings import parse_settings, redact_url
from gateway_guard.telemetry import JsonLogFormatter
from gateway_guard.telemetry.access_log import escape, log_access
from gateway_guard.telemetry.record import RequestRecord
from gateway_guard.upstream.headers import upstream_request_headers

REJECTED = [
    "/api//pull",
    "/api/./pull",
    "/api/../api/pull",
    "/v1/%2e%2e/%2e%2e/admin",
    "/v1/%2E/x",
    "/v1/a%2Fb",
    "/v1/a%2fb",
    "/v1/a%5Cb",
    "/v1/a\\b",
    "/v1/chat%3Fx=1",
    "/v1/a%23b",
    "/v1/a%00",
    "/v1/a%0d%0aX: y",
    "/api/pull%20",
    "/v1/%zz",
    "/v1/%4",
    "/v1/%ff",
    "v1/x",
    "/v1/\x01",
]


@pytest.mark.parametrize("raw", REJECTED)
def test_paths_that_are_not_canonical_are_400(raw: str) -> None:
    with pytest.raises(BadPath) as caught:
        check(raw)
    assert caught.value.status == 400 and caught.value.code == "invalid_path"


def test_admin_and_metadata_routes_match_the_canonical_path() -> None:
    for raw in ("/api/pull", "/api/pull/", "/API/Pull", "/api/%70ull"):
        assert is_admin_only(check(raw)), raw
    assert not needs_permit("POST", check("/api/show/")) and needs_permit("POST", check("/api/chat"))
    assert is_proxied("/v1/models") and not is_proxied("/v2/x") and not is_proxied("/guard/x")


def test_the_forwarded_path_is_the_one_encoding_of_the_checked_path() -> None:
    assert encoded(check("/v1/models/caf%C3%A9%41%7e")) == "/v1/models/caf%C3%A9A~"
    assert encoded(check("/v1/a%25b")) == "/v1/a%25b"  # a literal '%' stays one
    assert encoded(check('/v1/a"b{c}')) == "/v1/a%22b%7Bc%7D"
    assert request_path({"raw_path": b"/v1/x%41?q=1", "path": "/v1/xA"}) == "/v1/xA"
    with pytest.raises(BadPath):  # no raw_path: the decoded path is re-encoded, then checked the same way
        request_path({"path": "/v1/x y"})


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"a":' * 100_000,
        b'{"n":' + b"9" * 5000 + b"}",
        b'{"n": NaN}',
        b'{"n": [Infinity]}',
        b'{"n": -Infinity}',
        b'{"n": 1e999}',
        b"\xff",
        b'{"a": 1',
        b"",
    ],
)
def test_hostile_json_is_a_400(body: bytes) -> None:
    with pytest.raises(InvalidJSON) as caught:
        parse_json(body)
    assert caught.value.status == 400
    assert json.loads(caught.value.body())["error"]["type"] == "invalid_request_error"


def test_model_of_reads_the_model_and_refuses_what_is_not_a_string() -> None:
    assert model_of("POST", "/v1/chat/completions", b'{"model": "m", "n": 12345678901234567890}', "") == "m"
    assert model_of("GET", "/v1/models/abc", b"", "") == "abc"
    assert model_of("POST", "/v1/x", b"not json", "text/plain") is None
    with pytest.raises(ClientError):
        model_of("POST", "/v1/x", b'{"model": 1}', "application/json")
    with pytest.raises(InvalidJSON):
        model_of("POST", "/v1/x", b"[1]", "application/json")


async def test_the_body_budget_refuses_past_its_limit_and_gives_back_everything() -> None:
    budget = BodyBudget(130)
    chunks: list[Message] = [{"type": "http.request", "body": b"x" * 40, "more_body": True}] * 3

    def receiver() -> object:
        it = iter(chunks)

        async def receive() -> Message:
            return next(it)

        return receive

    first, second = budget.metered(receiver()), budget.metered(receiver())  # type: ignore[arg-type]
    await first()
    await first()
    await second()
    assert budget.held == 120
    with pytest.raises(BodyBudgetFull) as caught:
        await second()
    assert caught.value.status == 429 and caught.value.headers()["retry-after"] == "2"
    assert caught.value.headers()["connection"] == "close"
    first.release()
    second.release()
    second.release()  # once only
    assert budget.held == 0


def test_nothing_of_the_guards_own_goes_upstream() -> None:
    client = [
        ("x-guard-admin-token", "adm"),
        ("x-guard-lane", "batch"),
        ("x-guard-whatever", "1"),
        ("authorization", "Bearer client"),
        ("x-api-key", "client"),
        ("connection", "x-private"),
        ("x-private", "1"),
        ("x-kept", "yes"),
    ]
    assert upstream_request_headers(client, "up-key") == [("x-kept", "yes"), ("authorization", "Bearer up-key")]


def test_control_characters_in_logged_request_data_are_escaped(caplog: pytest.LogCaptureFixture) -> None:
    assert escape("/v1/a\r\nb\x1b[31m\\x\x7f\x85") == "/v1/a\\x0d\\x0ab\\x1b[31m\\\\x\\x7f\\x85"
    record = RequestRecord(method="POST", path="/v1/x\r\nFAKE 200\x1b[2J")
    record.model = "m\nx"
    with caplog.at_level(logging.INFO, logger="gateway_guard.access"):
        log_access(record, as_json=False)
        log_access(record, as_json=True)
    text, as_json = caplog.records
    assert "\n" not in text.getMessage() and "\x1b" not in text.getMessage() and "\r" not in text.getMessage()
    line = JsonLogFormatter().format(as_json)
    assert (
        "\\u001b" not in line and "\x1b" not in line and json.loads(line)["path"] == "/v1/x\\x0d\\x0aFAKE 200\\x1b[2J"
    )
    assert json.loads(line)["model"] == "m\\x0ax"


def test_a_url_with_userinfo_is_refused_and_never_printed() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"upstreams": {"gpu": {"url": "http://alice:s3cr3t-pw@127.0.0.1:8080/v1"}}}, environ={})
    message = str(caught.value)
    assert "upstreams.gpu.url" in message and "s3cr3t-pw" not in message and "alice" not in message
    with pytest.raises(ConfigError) as caught:
        parse_settings({"upstreams": {"gpu": {"url": "ftp://alice:s3cr3t-pw@host"}}}, environ={})
    assert "s3cr3t-pw" not in str(caught.value)
    assert redact_url("https://u:p@h:1/x@y") == "https://***@h:1/x@y"
    assert redact_url("http://h:1/") == "http://h:1/"


def test_edge_settings_have_safe_defaults_and_name_the_key() -> None:
    server = parse_settings({"upstreams": {"gpu": {"url": "http://127.0.0.1:1"}}}, environ={}).server
    assert server.max_header_bytes == 32 * 1024 and server.header_timeout == 10 and server.body_timeout == 60
    assert server.max_connections == 512 and server.max_idle_connections == 64
    assert server.body_budget_bytes == 256 * 1024 * 1024 and server.metrics_token is None
    with pytest.raises(ConfigError, match="server.body_budget_bytes"):
        parse_settings(
            {"server": {"body_budget_bytes": 1024}, "upstreams": {"gpu": {"url": "http://127.0.0.1:1"}}}, environ={}
        )
    with pytest.raises(ConfigError, match="server.header_timeout"):
        parse_settings(
            {"server": {"header_timeout": 0}, "upstreams": {"gpu": {"url": "http://127.0.0.1:1"}}}, environ={}
        )
    token = parse_settings({"upstreams": {"gpu": {"url": "http://127.0.0.1:1"}}}, environ={"GUARD_METRICS_TOKEN": "t"})
    assert token.server.metrics_token == "t" and "'t'" not in repr(token.server)


def test_edge_refusal_lines_are_rate_limited_and_count_what_they_left_out() -> None:
    from gateway_guard.app.edge import _LogBudget

    budget = _LogBudget(rate=10, burst=50)
    assert all(budget.take(0.0) for _ in range(50))
    assert not budget.take(0.0) and not budget.take(0.05)
    assert budget.left_out == 2
    assert budget.take(0.2)  # 10 a second: two lines' worth after 0.2 s
