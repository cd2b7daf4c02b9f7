"""One upstream server: plain-http upstreams through the h1 client, https and injected transports through httpx."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import httpx

from gateway_guard.errors import GuardError
from gateway_guard.settings import UpstreamSettings
from gateway_guard.upstream.errors import map_httpx_errors
from gateway_guard.upstream.h1 import H1Client, H1Response
from gateway_guard.upstream.headers import upstream_request_headers

READY_PATHS = ("/health", "/v1/models", "/api/tags")


class UpstreamResponse:
    """A response whose body has not been read yet; ``aclose()`` drops the connection (frees the GPU slot)."""

    __slots__ = ("_h1", "_response", "_upstream")

    def __init__(self, response: httpx.Response | H1Response, upstream: Upstream) -> None:
        self._h1 = response if isinstance(response, H1Response) else None
        self._response = response
        self._upstream = upstream

    @property
    def status(self) -> int:
        if self._h1 is not None:
            return self._h1.status
        assert isinstance(self._response, httpx.Response)
        return self._response.status_code

    @property
    def content_type(self) -> str:
        if self._h1 is not None:
            return self._h1.content_type
        assert isinstance(self._response, httpx.Response)
        return str(self._response.headers.get("content-type", ""))

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        if self._h1 is not None:
            return list(self._h1.raw_headers)
        assert isinstance(self._response, httpx.Response)
        return list(self._response.headers.raw)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Bytes as they arrive, undecoded (content-encoding passes through untouched)."""
        if self._h1 is not None:
            async for chunk in self._h1.chunks():
                yield chunk
            return
        assert isinstance(self._response, httpx.Response)
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
        self._h1: H1Client | None = None
        if transport is None and self._base.scheme == "http":
            port = self._base.port or 80
            host = self._base.host
            host_header = (f"[{host}]" if ":" in host else host) + ("" if self._base.port is None else f":{port}")
            self._h1 = H1Client(settings.name, host, port, host_header, settings.connect_timeout)
            # Probes keep their own connection: one the proxied requests cannot take, so a probe never waits
            # behind them for a new connection (and a server's HTTP thread) when the server is busy.
            self._h1_probe = H1Client(settings.name, host, port, host_header, settings.connect_timeout)
            self._prefix = self._base.raw_path.rstrip(b"/").decode("ascii")
        self._transport = transport or httpx.AsyncHTTPTransport(
            # Servers close idle keep-alive connections (llama.cpp's cpp-httplib after 5 s); expire ours sooner.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0),
            trust_env=False,  # the upstream comes from config only, never from proxy variables
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],  # headers and body go out at once
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
        if self._h1 is not None:
            target = self._prefix + path + ("?" + query.decode("latin-1") if query else "")
            h1 = await self._h1.request(
                method,
                target,
                upstream_request_headers(headers, self.settings.api_key),
                body,
                read_timeout=self.settings.read_timeout,
            )
            return UpstreamResponse(h1, self)
        request = self._request(
            method, path, query, upstream_request_headers(headers, self.settings.api_key), body, None
        )
        # Sent once: httpcore itself drops a pooled connection that has turned readable (closed by the server)
        # before writing on it; after the write, the server may have started on the request (docs/upstream-client.md).
        with map_httpx_errors(self.name, self.settings.read_timeout):
            response = await self._transport.handle_async_request(request)
        return UpstreamResponse(response, self)

    async def get_text(self, path: str, *, timeout: float = 2.0) -> tuple[int, str]:
        """A small GET for probes (readiness, the server's own /metrics)."""
        if self._h1 is not None:
            h1 = await self._h1_probe.request(
                "GET",
                self._prefix + path,
                list(self._auth().items()),
                b"",
                read_timeout=timeout,
                connect_timeout=timeout,
            )
            try:
                data = await h1.read()
            finally:
                await h1.aclose()
            return h1.status, data.decode("utf-8", "replace")
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
        if self._h1 is not None:
            await self._h1.aclose()
            await self._h1_probe.aclose()
        await self._transport.aclose()
