"""One upstream server: the only place that speaks httpx."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from gateway_guard.errors import GuardError
from gateway_guard.settings import UpstreamSettings
from gateway_guard.upstream.errors import map_httpx_errors
from gateway_guard.upstream.headers import upstream_request_headers

READY_PATHS = ("/health", "/v1/models", "/api/tags")
STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class UpstreamResponse:
    """A response whose body has not been read yet; ``aclose()`` drops the connection (frees the GPU slot)."""

    __slots__ = ("_response", "_upstream")

    def __init__(self, response: httpx.Response, upstream: Upstream) -> None:
        self._response = response
        self._upstream = upstream

    @property
    def status(self) -> int:
        return self._response.status_code

    @property
    def content_type(self) -> str:
        return str(self._response.headers.get("content-type", ""))

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return list(self._response.headers.raw)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Bytes as they arrive, undecoded (content-encoding passes through untouched)."""
        up = self._upstream.settings
        with map_httpx_errors(up.name, up.read_timeout):
            async for chunk in self._response.aiter_raw():
                yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


class Upstream:
    """Talks to the transport directly, not through ``httpx.AsyncClient``: a proxy must have no cookie jar
    (the client's jar would carry one user's ``Set-Cookie`` into another user's request), no redirects, no
    environment proxies and no per-request URL merging — and skipping them is most of httpx's per-request cost.
    """

    def __init__(self, settings: UpstreamSettings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self._base = httpx.URL(settings.url)
        self._timeouts = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout, pool=None).as_dict()
        self._transport = transport or httpx.AsyncHTTPTransport(
            # Servers close idle keep-alive connections (llama.cpp's cpp-httplib after 5 s); expire ours sooner.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0),
            trust_env=False,  # the upstream comes from config only, never from proxy variables
        )

    @property
    def name(self) -> str:
        return self.settings.name

    def _request(
        self, method: str, path: str, query: bytes, headers: list[tuple[str, str]], body: bytes, timeout: float | None
    ) -> httpx.Request:
        raw_path = (self._base.raw_path.rstrip(b"/") + path.encode()) + (b"?" + query if query else b"")
        url = self._base.copy_with(raw_path=raw_path)
        timeouts = self._timeouts if timeout is None else {**self._timeouts, "read": timeout, "connect": timeout}
        return httpx.Request(method, url, headers=headers, content=body, extensions={"timeout": timeouts})

    async def send(
        self, method: str, path: str, query: bytes, headers: list[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        """Send and return once the upstream's status line and headers have arrived."""
        request = self._request(
            method, path, query, upstream_request_headers(headers, self.settings.api_key), body, None
        )
        with map_httpx_errors(self.name, self.settings.read_timeout):
            try:
                response = await self._transport.handle_async_request(request)
            except STALE_CONNECTION:
                # Closed before a single byte of the response: a pooled keep-alive connection the server had
                # just dropped. Nothing was generated; try once more on a fresh connection.
                response = await self._transport.handle_async_request(request)
        return UpstreamResponse(response, self)

    async def get_text(self, path: str, *, timeout: float = 2.0) -> tuple[int, str]:
        """A small GET for probes (readiness, the server's own /metrics)."""
        request = self._request("GET", path, b"", list(self._auth().items()), b"", timeout)
        with map_httpx_errors(self.name, timeout):
            response = await self._transport.handle_async_request(request)
            try:
                body = await response.aread()
            finally:
                await response.aclose()
        return response.status_code, body.decode("utf-8", "replace")

    async def ready(self) -> tuple[bool, str]:
        """Reachable and answering? Tries the health endpoints llama.cpp, vLLM, OpenAI-likes and Ollama have."""
        last = "no probe answered"
        for path in READY_PATHS:
            try:
                status, _ = await self.get_text(path)
            except GuardError as exc:  # a probe reports, never raises
                return False, str(exc)
            if status < 400:
                return True, f"GET {path} -> {status}"
            last = f"GET {path} -> {status}"
        return False, last

    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}

    async def aclose(self) -> None:
        await self._transport.aclose()
