"""Serve an ASGI app with uvicorn inside the test's own event loop, on a real 127.0.0.1 socket.

The socket is bound and listening before uvicorn starts, so the URL works at once (connections wait in the
backlog): no polling for readiness. Use for what ``httpx.ASGITransport`` cannot show, such as chunks arriving
one by one or a client that disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn


@contextlib.asynccontextmanager
async def serve_in_process(app: Any, port: int = 0) -> AsyncIterator[str]:
    """``port``: a given one (an upstream that comes back where it was), else a free one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", lifespan="off", ws="none", access_log=False, timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
