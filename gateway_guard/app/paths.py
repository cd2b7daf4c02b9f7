"""Strict, canonical request paths: what the guard routes on is exactly what it forwards.

The request's raw path (``scope["raw_path"]``, as the client encoded it) is checked once:

- printable ASCII only, every ``%`` a valid escape;
- no ``.`` or ``..`` segment, raw or encoded (``%2e%2e``), no empty segment but a trailing one (``/api//pull``);
- no encoded ``/`` (``%2F``), ``\\`` (``%5C``), ``?`` (``%3F``), ``#`` (``%23``), no NUL, control character or
  space once decoded (``/api/pull%20``), no raw backslash.

Anything else is a 400. The decoded path is what routing reads (``route`` makes the key that admin-only and
metadata calls are matched on: lower case, trailing ``/`` cut, so ``/api/pull/`` is ``/api/pull``), and its
one correct encoding (``encoded``: unreserved characters plain, the rest percent-encoded) is what goes
upstream: the server sees the very path that was checked, however the client spelt it.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

from gateway_guard.app.asgi import Scope
from gateway_guard.errors import ClientError

# Ollama calls that read metadata only: forwarded without a generation permit.
METADATA_POSTS = frozenset({"/api/show", "/api/tags", "/api/ps", "/api/version"})
# Ollama calls that change the server's models: only with the admin token.
ADMIN_ONLY = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"})
PROXIED_PREFIXES = ("/v1/", "/api/")

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_FORBIDDEN_ESCAPE = re.compile(r"%(2[Ff]|5[Cc]|3[Ff]|23|[01][0-9A-Fa-f]|7[Ff]|20)")
_RAW_OK = re.compile(r"[!-~]*")  # printable ASCII, no space
_SAFE = "/:@!$&'()*+,;=-._~"  # RFC 3986 pchar and '/': never encoded


class BadPath(ClientError):
    code = "invalid_path"


def request_path(scope: Scope) -> str:
    """The request's path (of an ASGI scope), decoded and checked; raises ``BadPath`` (400)."""
    raw_bytes = scope.get("raw_path")
    if isinstance(raw_bytes, bytes | bytearray):
        raw = bytes(raw_bytes).split(b"?", 1)[0].decode("latin-1")  # some clients' raw_path carries the query
    else:
        raw = quote(str(scope["path"]), safe=_SAFE + "%")
    return check(raw)


def check(raw: str) -> str:
    """``raw``, a path as sent (percent-encoded), checked and decoded."""
    shown = ascii(raw[:200])
    if not raw.startswith("/"):
        raise BadPath(f"the path must start with '/' (got {shown})")
    if "\\" in raw or not _RAW_OK.fullmatch(raw):
        raise BadPath(f"the path may hold only printable ASCII, no backslash (got {shown})")
    if _BAD_ESCAPE.search(raw):
        raise BadPath(f"the path has a broken %-escape (got {shown})")
    if _FORBIDDEN_ESCAPE.search(raw):
        raise BadPath(f"the path has an encoded '/', '\\', '?', '#', space or control character (got {shown})")
    try:
        path = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise BadPath(f"the path's %-escapes are not UTF-8 (got {shown})") from None
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        if segment in (".", ".."):
            raise BadPath(f"the path has a '{segment}' segment (got {shown})")
        if segment == "" and i != len(segments) - 1:
            raise BadPath(f"the path has an empty segment (got {shown})")
    return path


def encoded(path: str) -> str:
    """The one correct encoding of a checked path: what is forwarded (``/v1/caf%C3%A9``; ``%41`` is ``A``)."""
    return quote(path, safe=_SAFE)


def route(path: str) -> str:
    """The key a route is matched on: lower case, trailing '/' cut (``/API/Pull/`` -> ``/api/pull``)."""
    return path.rstrip("/").lower() or "/"


def is_proxied(path: str) -> bool:
    return path.startswith(PROXIED_PREFIXES)


def is_admin_only(path: str) -> bool:
    return route(path) in ADMIN_ONLY


def needs_permit(method: str, path: str) -> bool:
    return method == "POST" and route(path) not in METADATA_POSTS
