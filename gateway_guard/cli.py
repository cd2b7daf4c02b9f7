"""``gateway-guard``: run the guard. Parse arguments in ``main()``, do the work in ``run()``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import uvicorn

from gateway_guard.app.edge import EdgeLimits, edge_protocol
from gateway_guard.app.factory import build_app
from gateway_guard.app.read_limit import ReadLimit
from gateway_guard.errors import ConfigError
from gateway_guard.settings import Settings, load_settings
from gateway_guard.telemetry import JsonLogFormatter

log = logging.getLogger("gateway_guard")


class ExitCode(IntEnum):
    OK = 0
    CONFIG_ERROR = 2
    STARTUP_FAILURE = 3


DESCRIPTION = """\
An admission-controlled, OpenAI-compatible reverse proxy for self-hosted LLM servers (llama.cpp, vLLM,
Ollama). Point every Hermes profile's base URL at it: at most --max-inflight requests reach the upstream at
once, interactive requests go before batch ones, batch requests are held in a queue (not rejected), and
GET /guard/capacity tells guard-dispatch how much room there is.

quick start:
  gateway-guard --simulate                                  # in front of the built-in simulated GPU
  gateway-guard --upstream http://127.0.0.1:8080 --max-inflight 4
  gateway-guard --config config/guard.example.toml

reload: kill -HUP <pid>, or POST /guard/reload with the admin token, re-reads the config (limits, lanes,
profiles, keys) without dropping a request; an invalid file is refused and the old config stays.
environment: GUARD__SECTION__KEY overrides a config key (GUARD__UPSTREAMS__GPU__MAX_INFLIGHT=8),
GUARD_ADMIN_TOKEN sets server.admin_token.
exit codes: 0 ok, 2 configuration error (the message names the key), 3 start-up failure (port in use, ...).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway-guard", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", metavar="FILE", help="TOML config file (see config/guard.example.toml)")
    p.add_argument("--upstream", metavar="URL", help="the upstream server's base URL (without /v1)")
    p.add_argument("--max-inflight", type=int, metavar="N", help="cap on requests in flight at the upstream")
    p.add_argument("--host", help="address to bind (default 127.0.0.1: only this machine)")
    p.add_argument("--port", type=int, help="port to listen on (default 8090)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-json", action="store_true", default=None, help="one JSON object per log line")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N processes on one socket; only with [cluster] in the config (the cap shared through Redis)",
    )
    sim = p.add_argument_group("built-in simulated upstream")
    sim.add_argument("--simulate", action="store_true", help="start the simulated GPU server and guard it")
    sim.add_argument("--sim-port", type=int, default=0, help="its port on 127.0.0.1 (default: a free one)")
    sim.add_argument("--sim-slots", type=int, default=4, help="its parallel slots (default 4)")
    sim.add_argument("--sim-mode", choices=["generate", "scripted", "zero"], default="generate")
    return p


def settings_from_args(args: argparse.Namespace, sim_url: str | None = None) -> Settings:
    overrides: dict[str, Any] = {}
    for key, value in (("server.host", args.host), ("server.port", args.port), ("server.log_level", args.log_level)):
        if value is not None:
            overrides[key] = value
    if args.log_json:
        overrides["server.log_json"] = True
    upstream = sim_url or args.upstream
    if upstream is not None:
        overrides["upstreams.default.url"] = upstream
    if args.max_inflight is not None:
        overrides["upstreams.default.max_inflight"] = args.max_inflight
    elif upstream is not None and args.config is None:
        overrides["upstreams.default.max_inflight"] = args.sim_slots if sim_url else 4
    return load_settings(args.config, overrides=overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLogFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the access log already says what was forwarded


async def serve(
    settings: Settings,
    sim: uvicorn.Config | None = None,
    reload_from: Callable[[], Settings] | None = None,
    sock: socket.socket | None = None,
) -> None:
    app = build_app(settings, reload_from=reload_from)
    app.state.reloader.install_sighup()  # kill -HUP <pid>: re-read the config, keep every request
    server = settings.server
    config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=30,
        # the edge: header size/count/time, body size/time, connections and idle ones bounded (app/edge.py)
        http=edge_protocol(
            EdgeLimits.from_settings(server),
            bodies=app.state.body_budget,  # a declared body that cannot fit: 429 before a byte of it is read
            read_limit=ReadLimit(lambda: app.state.guard.settings.server),  # live: a reload may change it
        ),
        ws="none",
        timeout_keep_alive=server.keep_alive_timeout,  # type: ignore[arg-type]  # a float works (call_later)
    )
    servers = [uvicorn.Server(config)]
    if sim is not None:
        servers.insert(0, uvicorn.Server(sim))
    log.info("gateway-guard listening on http://%s:%d", settings.server.host, settings.server.port)
    shared = None if sock is None else [sock]  # --workers: the socket the parent bound, shared by all
    await asyncio.gather(*(s.serve(sockets=shared if s.config is config else None) for s in servers))
    if not all(s.started for s in servers):
        raise OSError("a server did not start (is the port in use?)")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (a faster event loop; it is a dependency on Linux), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(args: argparse.Namespace) -> ExitCode:
    sim_config: uvicorn.Config | None = None
    sim_url = None
    if args.simulate:
        from gateway_guard.sim import SimConfig, build_sim_app

        port = args.sim_port or free_port()
        sim_url = f"http://127.0.0.1:{port}"
        sim_app = build_sim_app(SimConfig(slots=args.sim_slots, mode=args.sim_mode))
        sim_config = uvicorn.Config(sim_app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    try:
        settings = settings_from_args(args, sim_url)
    except ConfigError as exc:
        print(f"gateway-guard: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    configure_logging(settings.server.log_level, settings.server.log_json)
    if args.workers != 1:
        return run_workers(args, settings)
    if sim_url:
        log.info("simulated upstream (%s mode, %d slots) on %s", args.sim_mode, args.sim_slots, sim_url)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(settings, sim_config, reload_from=lambda: settings_from_args(args, sim_url)))
    except ConfigError as exc:  # e.g. an OTEL_* variable asking for an exporter the guard does not ship
        print(f"gateway-guard: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    except OSError as exc:
        log.error("start-up failed: %s", exc)
        return ExitCode.STARTUP_FAILURE
    except KeyboardInterrupt:
        pass
    return ExitCode.OK


def run_workers(args: argparse.Namespace, settings: Settings) -> ExitCode:
    """``--workers N``: N processes serving one listening socket, each with its own gates, which is safe only
    when the gates share their cap through Redis (``[cluster]``); SIGTERM / SIGINT / SIGHUP go to every worker."""
    if args.workers < 1 or args.simulate or settings.cluster is None:
        why = (
            "must be >= 1" if args.workers < 1
            else "cannot be combined with --simulate" if args.simulate
            else "needs a [cluster] section (redis_url): without a shared gate, N processes would each let the "
            "whole cap through. See docs/cluster.md"
        )  # fmt: skip
        print(f"gateway-guard: --workers {args.workers} {why}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    try:
        sock = socket.create_server((settings.server.host, settings.server.port), backlog=2048, reuse_port=False)
    except OSError as exc:
        log.error("start-up failed: %s", exc)
        return ExitCode.STARTUP_FAILURE
    sock.set_inheritable(True)
    children: list[int] = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:  # a worker: its own loop, gates and Redis connections, on the shared socket
            code = ExitCode.OK
            try:
                with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                    runner.run(serve(settings, reload_from=lambda: settings_from_args(args), sock=sock))
            except KeyboardInterrupt:
                pass
            except Exception as exc:
                log.error("worker %d failed: %s", os.getpid(), exc)
                code = ExitCode.STARTUP_FAILURE
            os._exit(code)
        children.append(pid)
    sock.close()
    log.info("gateway-guard: %d workers (%s) on http://%s:%d", len(children), children, settings.server.host,
             settings.server.port)  # fmt: skip

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    stopped = (0, -signal.SIGTERM, -signal.SIGINT)
    return ExitCode.OK if all(code in stopped for code in codes) else ExitCode.STARTUP_FAILURE


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(build_parser().parse_args(argv)))
