"""The edge's pure rules, with plain values: strict paths, defensive JSON, the body budget, what goes upstream,
escaped log fields, URL userinfo. (The live-process attacks are in tests/integration/test_edge_attacks.py.)"""

from __future__ import annotations

import json
import logging

import pytest

from gateway_guard.app.asgi import BodyBudget, BodyBudgetFull, Message
from gateway_guard.app.body import model_of, parse_json
from gateway_guard.app.edge_bytes import head_can_end
from gateway_guard.app.edge_room import HEAD_GRACE, IDLE_GRACE, SILENT_GRACE, LogBudget, Room
from gateway_guard.app.paths import BadPath, check, encoded, is_admin_only, is_proxied, needs_permit, request_path
from gateway_guard.app.read_limit import ReadLimit, TokenBucket, endpoint_of
from gateway_guard.errors import ClientError, ConfigError, InvalidJSON
from gateway_guard.settings import ServerSettings, parse_settings, redact_url
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
    assert server.read_rate == 50
    with pytest.raises(ConfigError, match="server.read_rate"):
        parse_settings({"server": {"read_rate": -1}, "upstreams": {"gpu": {"url": "http://127.0.0.1:1"}}}, environ={})
    token = parse_settings({"upstreams": {"gpu": {"url": "http://127.0.0.1:1"}}}, environ={"GUARD_METRICS_TOKEN": "t"})
    assert token.server.metrics_token == "t" and "'t'" not in repr(token.server)


def test_edge_refusal_lines_are_rate_limited_and_count_what_they_left_out() -> None:
    budget = LogBudget(rate=10, burst=50)
    assert all(budget.take(0.0) for _ in range(50))
    assert not budget.take(0.0) and not budget.take(0.05)
    assert budget.left_out == 2
    assert budget.take(0.2)  # 10 a second: two lines' worth after 0.2 s


class _Conn:
    def __init__(self, name: str, dropped: list[str]) -> None:
        self.name, self.dropped = name, dropped

    def drop(self, reason: str) -> None:
        self.dropped.append(self.name)


def test_room_is_made_from_the_least_valuable_connection_first() -> None:
    """Silent ones past their grace, then ones stuck in their headers, then idle ones refused for their read
    rate, then kept-alive ones idle past their grace; never a connection that has just connected, just begun its
    request or is between two requests."""
    dropped: list[str] = []
    room = Room()
    names = ("kept-alive", "refused", "slow head", "silent", "young", "busy client")
    kept, refused, slow, silent, young, client = (_Conn(n, dropped) for n in names)
    room.add_idle(kept, 8, 0.0)
    room.add_idle(refused, 8, 0.0, refused=True)
    room.heads[slow] = 0.0
    room.fresh[silent] = 0.0
    room.fresh[young] = 5.0
    room.add_idle(client, 8, 5.0)
    now = 5.0 + SILENT_GRACE / 2  # "young" is inside its grace, "busy client" inside its own
    assert all(room.make_room(now) for _ in range(4))
    assert not room.make_room(now)  # the newcomer is refused
    assert dropped == ["silent", "slow head", "refused", "kept-alive"]
    assert room.make_room(5.0 + IDLE_GRACE) and dropped[-1] == "young"
    assert room.make_room(5.0 + IDLE_GRACE) and dropped[-1] == "busy client"
    room.heads[slow] = 10.0
    assert not room.make_room(10.0 + HEAD_GRACE / 2)
    assert room.make_room(10.0 + HEAD_GRACE) and dropped[-1] == "slow head"


def test_past_max_idle_connections_refused_ones_go_first_even_when_newer() -> None:
    dropped: list[str] = []
    room = Room()
    room.add_idle(_Conn("client", dropped), 2, 0.0)
    for i in range(3):  # a burst of refused readers back to idle at once
        room.add_idle(_Conn(f"refused {i}", dropped), 2, 0.0, refused=True)
    assert dropped == ["refused 0", "refused 1"]
    room.add_idle(_Conn("client 2", dropped), 2, 0.0)
    assert dropped[-1] == "refused 2"
    room.add_idle(_Conn("client 3", dropped), 2, 0.0)  # one over for now: both are in use
    assert dropped[-1] == "refused 2" and len(room.waiting) == 3
    room.add_idle(_Conn("client 4", dropped), 2, IDLE_GRACE)
    assert dropped[-2:] == ["client", "client 2"]  # then the kept-alive ones idle past their grace, oldest first


def test_read_rate_buckets_refuse_past_the_rate_and_spare_token_holders() -> None:
    bucket = TokenBucket(rate=10, burst=20)
    assert all(bucket.take(0.0) == 0.0 for _ in range(20))
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.1) == 0.0  # one token back after 0.1 s

    server = ServerSettings(read_rate=1.0, metrics_token="metrics-tok", admin_token="admin-tok")
    limit = ReadLimit(lambda: server)
    get = b"GET"
    assert limit.check(get, b"/metrics", [], 0.0, close=False) is None
    assert limit.check(get, b"/metrics", [], 0.0, close=False) is None  # burst: two seconds' worth
    refused = limit.check(get, b"/metrics?x=1", [], 0.0, close=False)
    assert refused is not None and refused.startswith(b"HTTP/1.1 429 ")
    assert b"retry-after: 1\r\n" in refused and b"connection: close" not in refused
    assert json.loads(refused.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "read_rate_limited"
    assert b"connection: close" in (limit.check(get, b"/%6detrics", [], 0.0, close=True) or b"")  # decoded
    assert limit.check(b"HEAD", b"/metrics", [], 0.0, close=False) == refused.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert limit.check(get, b"/metrics", [(b"authorization", b"Bearer metrics-tok")], 0.0, close=False) is None
    assert limit.check(get, b"/metrics", [(b"x-guard-admin-token", b"admin-tok")], 0.0, close=False) is None
    assert limit.check(get, b"/metrics", [(b"authorization", b"Bearer wrong")], 0.0, close=False) is not None
    assert limit.check(get, b"/guard/capacity", [], 0.0, close=False) is None  # a bucket per endpoint
    assert limit.check(b"POST", b"/metrics", [], 0.0, close=False) is None  # reads only
    assert limit.refused == 4
    targets = (b"/guard/health", b"/v1/models", b"/guard/static/page.js", b"/guard/", b"http://h:1/metrics?x")
    assert [endpoint_of(u) for u in targets] == [None, None, "status page", "status page", "metrics"]
    server = ServerSettings(read_rate=0)  # a reload to 0: no limit
    assert limit.check(get, b"/metrics", [], 0.0, close=False) is None


def test_a_head_that_cannot_end_within_the_limit_is_seen_without_parsing() -> None:
    assert not head_can_end(b"", b"POST / HTTP/1.1\r\nx: " + b"a" * 100, 50)
    assert head_can_end(b"", b"GET / HTTP/1.1\r\n\r\n" + b"a" * 100, 20)  # a small head, then a body
    assert head_can_end(b"x\r\n", b"\r\n" + b"a" * 100, 0)  # the empty line straddles two reads
    assert head_can_end(b"", b"GET / HTTP/1.1\n\n" + b"a" * 100, 16)  # bare LF line ends
