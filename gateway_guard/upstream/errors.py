"""The one boundary where httpx exceptions become the guard's own (as httpx maps httpcore's)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from gateway_guard.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable


class UpstreamProtocolError(UpstreamError):
    """The answer broke HTTP/1.1 (a 101, a status outside 100..599, a malformed status line, conflicting
    Content-Length, headers over the size bound): a 502, and the connection is never reused."""

    code = "upstream_protocol_error"


class UpstreamClosedEarly(UpstreamError):
    """The server closed or reset the connection after the request was written, before a single byte of its
    answer. It may have started on the request, so the request is not sent again: a 502. To the caller this is
    also a sign that the server may have gone away (a restart)."""


# One wording for both clients (httpx's errors mapped below, and upstream/h1.py's own).
def connect_timeout_error(upstream: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(f"upstream {upstream!r} did not accept the connection in time")


def connect_error(upstream: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(f"upstream {upstream!r} is unreachable (connection refused or no route)")


def read_timeout_error(upstream: str, read_timeout: float) -> UpstreamTimeout:
    return UpstreamTimeout(f"upstream {upstream!r} sent nothing for {read_timeout:g}s (timed out)")


def header_timeout_error(upstream: str, read_timeout: float) -> UpstreamTimeout:
    return UpstreamTimeout(f"upstream {upstream!r} did not finish its response headers within {read_timeout:g}s")


def closed_error(upstream: str) -> UpstreamError:
    return UpstreamError(f"upstream {upstream!r} closed the connection before the response was complete")


def reset_error(upstream: str) -> UpstreamError:
    return UpstreamError(f"upstream {upstream!r} connection failed while transferring (reset)")


def closed_early_error(upstream: str, *, reset: bool) -> UpstreamClosedEarly:
    how = "reset" if reset else "closed"
    return UpstreamClosedEarly(
        f"upstream {upstream!r} {how} the connection before answering; not sent again (it may have started on it)"
    )


def protocol_error(upstream: str, detail: str = "RemoteProtocolError") -> UpstreamProtocolError:
    return UpstreamProtocolError(f"upstream {upstream!r} transport error: {detail}")


@contextmanager
def map_httpx_errors(upstream: str, read_timeout: float) -> Iterator[None]:
    """Never shows the upstream's URL with credentials, nor any header: only the upstream's name."""
    try:
        yield
    except httpx.ConnectTimeout:
        raise connect_timeout_error(upstream) from None
    except httpx.ConnectError:
        raise connect_error(upstream) from None
    except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
        raise read_timeout_error(upstream, read_timeout) from None
    except httpx.RemoteProtocolError:
        raise closed_error(upstream) from None
    except (httpx.ReadError, httpx.WriteError):
        raise reset_error(upstream) from None
    except httpx.TransportError as exc:
        raise UpstreamError(f"upstream {upstream!r} transport error: {type(exc).__name__}") from None
