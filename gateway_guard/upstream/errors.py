"""The one boundary where httpx exceptions become the guard's own (as httpx maps httpcore's)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from gateway_guard.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable


@contextmanager
def map_httpx_errors(upstream: str, read_timeout: float) -> Iterator[None]:
    """Never shows the upstream's URL with credentials, nor any header: only the upstream's name."""
    try:
        yield
    except httpx.ConnectTimeout:
        raise UpstreamUnavailable(f"upstream {upstream!r} did not accept the connection in time") from None
    except httpx.ConnectError:
        raise UpstreamUnavailable(f"upstream {upstream!r} is unreachable (connection refused or no route)") from None
    except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
        raise UpstreamTimeout(f"upstream {upstream!r} sent nothing for {read_timeout:g}s (timed out)") from None
    except httpx.RemoteProtocolError:
        raise UpstreamError(f"upstream {upstream!r} closed the connection before the response was complete") from None
    except (httpx.ReadError, httpx.WriteError):
        raise UpstreamError(f"upstream {upstream!r} connection failed while transferring (reset)") from None
    except httpx.TransportError as exc:
        raise UpstreamError(f"upstream {upstream!r} transport error: {type(exc).__name__}") from None
