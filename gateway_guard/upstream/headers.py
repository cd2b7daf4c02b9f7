"""Which headers cross the proxy. Hop-by-hop headers (RFC 9110 §7.6.1) stop here, in both directions; the
client's credentials never reach the upstream (the upstream's own key from config is sent instead), and
nothing of the guard's own does either: no ``X-Guard-*`` header (the admin token, lane, profile, ...)."""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the guard itself on the way up: the transport computes host/length; credentials are replaced.
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "authorization", "x-api-key"}
GUARD_PREFIX = "x-guard-"  # the guard's own headers (X-Guard-Admin-Token, -Lane, -Profile, ...) stop here


def _connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    tokens: set[str] = set()
    for name, value in headers:
        if name == "connection":
            tokens |= {t.strip().lower() for t in value.split(",") if t.strip()}
    return tokens


def upstream_request_headers(client: list[tuple[str, str]], api_key: str | None) -> list[tuple[str, str]]:
    """``client`` names are lower-case."""
    drop = REQUEST_DROP | _connection_tokens(client)
    out = [(n, v) for n, v in client if n not in drop and not n.startswith(GUARD_PREFIX)]
    if api_key:
        out.append(("authorization", f"Bearer {api_key}"))
    return out


# The guard's own server (uvicorn) writes these; passing the upstream's on would send each twice.
RESPONSE_DROP = HOP_BY_HOP | {"server", "date"}


def client_response_headers(upstream: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    pairs = list(upstream)
    as_text = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in pairs]
    drop = RESPONSE_DROP | _connection_tokens(as_text)
    return [(n, v) for (n, v), (low, _) in zip(pairs, as_text, strict=True) if low not in drop]
