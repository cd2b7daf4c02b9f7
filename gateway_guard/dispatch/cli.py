"""guard-dispatch: start Hermes kanban workers only into the batch capacity the guard reports.

``main()`` parses arguments; ``run()`` does the work and returns an :class:`ExitCode` (tests call it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import TextIO

from gateway_guard.dispatch import lock, status
from gateway_guard.dispatch.board import BoardReader, SchemaUnknown, crash_grace_s
from gateway_guard.dispatch.capacity import CapacityClient, CapacityUnavailable
from gateway_guard.dispatch.config import DEFAULT_MAX_RUNNING, ConfigError, DispatchConfig, load
from gateway_guard.dispatch.decide import Policy, Snapshot, decide, needs_queue
from gateway_guard.dispatch.hermes import Board, Hermes, HermesError, HermesNotFound, MaxMeaning, resolve_hermes
from gateway_guard.dispatch.reserve import Reserver
from gateway_guard.dispatch.run import Runner
from gateway_guard.dispatch.tick import Failure, Ticker, format_line


class ExitCode(IntEnum):
    OK = 0
    CONFIG_ERROR = 2
    GUARD_UNAVAILABLE = 3
    HERMES_NOT_FOUND = 4
    HERMES_FAILED = 5
    BOARD_LOCKED = 6


EXIT_CODE_HELP = {
    ExitCode.OK: "every tick ran, run stopped on SIGTERM/SIGINT (or another guard-dispatch holds the lock)",
    ExitCode.CONFIG_ERROR: "bad arguments or config file",
    ExitCode.GUARD_UNAVAILABLE: "the guard gave no capacity: nothing was dispatched (fail closed)",
    ExitCode.HERMES_NOT_FOUND: "no hermes executable (tried --hermes, else HERMES_BIN, else PATH)",
    ExitCode.HERMES_FAILED: "a hermes command failed (its stderr is in the log)",
    ExitCode.BOARD_LOCKED: "another dispatcher held the board's dispatch lock: not dispatched, not retried",
}

_FAILURE_CODES = {
    Failure.GUARD_UNAVAILABLE: ExitCode.GUARD_UNAVAILABLE,
    Failure.HERMES_FAILED: ExitCode.HERMES_FAILED,
    Failure.BOARD_LOCKED: ExitCode.BOARD_LOCKED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    command: str = "tick"
    config: Path | None = None
    guard_url: str | None = None
    board: str | None = None
    hermes: str | None = None
    target: int | str | None = None
    max_running: int | None = None
    queue_per_slot: float | None = None
    no_reserve: bool = False
    seconds: float | None = None
    lock_file: Path | None = None
    upstream: str | None = None
    dry_run: bool = False
    ticks: int = 1
    interval: float = 15.0
    log_json: bool = False


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {c.value}  {c.name:<18} {EXIT_CODE_HELP[c]}" for c in ExitCode)
    parser = argparse.ArgumentParser(
        prog="guard-dispatch",
        description="Dispatch Hermes kanban cards only into the batch capacity the guard reports: each tick "
        "reads GET <guard>/guard/capacity, counts running cards (hermes kanban list --json) and runs "
        "hermes kanban dispatch --max M so that at most min(free, target - running) more start.",
        epilog="commands:\n  tick (default)  run --ticks ticks, --interval seconds apart (for cron)\n"
        "  run             stay in the foreground and dispatch as capacity frees and cards finish (watches\n"
        "                  GET <guard>/guard/events and the board's SQLite file); stops on SIGTERM/SIGINT\n"
        "  status          the board's ready/running cards per profile beside the guard's capacity\n\n"
        f"exit codes:\n{codes}\n\nWith --ticks N a failed tick does not stop the later ones; the exit code is "
        "that of the first failed tick.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", choices=["tick", "run", "status"], default="tick")
    parser.add_argument("--config", type=Path, help="TOML config (see config/dispatch.example.toml)")
    parser.add_argument("--guard-url", help="the guard's base URL (default http://127.0.0.1:8090)")
    parser.add_argument("--board", help="Hermes kanban board slug (default: the CLI's current board)")
    parser.add_argument("--hermes", metavar="PATH", help="hermes executable (else $HERMES_BIN, else PATH)")
    parser.add_argument("--target", type=_target, help="batch target: running cards to aim for, or 'auto' "
                        "(start cards until the guard's free batch slots are taken and --queue-per-slot requests "
                        "per slot wait, counting starting workers, up to --max-running); overrides the config's target "
                        "and time windows")
    parser.add_argument("--max-running", type=_count, help="with --target auto: most cards running at once "
                        "(the host's RAM bound; default 8)")
    parser.add_argument("--queue-per-slot", type=_share, help="with --target auto: batch requests to keep waiting "
                        "at the guard per batch slot, so that no slot idles while a new worker starts (default 2)")
    parser.add_argument("--no-reserve", action="store_true", help="run: book no guard slots for new workers")
    parser.add_argument("--seconds", type=float, help="run: stop after this many seconds")
    parser.add_argument("--upstream", help="read one upstream's batch free slots instead of the total")
    parser.add_argument("--lock-file", type=Path, help="default: <board db>.guard-dispatch.lock")
    parser.add_argument("--dry-run", action="store_true", help="compute and print a tick, dispatch nothing")
    parser.add_argument("--ticks", type=_positive, default=1, help="ticks to run (default 1)")
    parser.add_argument("--interval", type=float, default=15.0, help="seconds from one tick's start to the "
                        "next (default 15)")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per tick")
    return parser


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1000, got {value:g}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _target(text: str) -> int | str:
    return "auto" if text == "auto" else _count(text)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = Options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Options)})
    return int(run(options))


def _now() -> datetime:
    return datetime.now(UTC)


def run(
    options: Options, *, env: Mapping[str, str] | None = None, out: TextIO | None = None,
    err: TextIO | None = None, clock: Callable[[], datetime] = _now, sleep: Callable[[float], None] = time.sleep,
    until: Callable[[], bool] | None = None,
) -> ExitCode:
    """``until``: for ``run``, stop once it returns True (checked every 0.1 s; tests use it)."""
    env = dict(os.environ if env is None else env)
    out = out or sys.stdout
    err = err or sys.stderr

    def fail(code: ExitCode, message: str) -> ExitCode:
        print(f"guard-dispatch: {message}", file=err, flush=True)
        return code

    try:
        config = _configure(options)
    except ConfigError as exc:
        return fail(ExitCode.CONFIG_ERROR, str(exc))
    try:
        hermes = Hermes(resolve_hermes(config.hermes, env), board=config.board, env=env,
                        timeout_s=config.hermes_timeout_s)
        version = hermes.version()
        board = hermes.board()
    except HermesNotFound as exc:
        return fail(ExitCode.HERMES_NOT_FOUND, str(exc))
    except HermesError as exc:
        return fail(ExitCode.HERMES_FAILED, str(exc))
    meaning = config.max_meaning or version.meaning
    if options.command == "run":
        return _run_forever(options, config, hermes, version.label, meaning, board, env, clock, out, until)
    with CapacityClient(config.guard_url, timeout_s=config.guard_timeout_s) as capacity:
        if options.command == "status":
            return _status(options, config, hermes, version.label, str(meaning), board.slug, str(board.db_path),
                           capacity, clock, out, fail)
        ticker = Ticker(hermes=hermes, board=board, meaning=meaning, capacity=capacity, policy=config.policy,
                        upstream=config.upstream, clock=clock, dry_run=options.dry_run)
        start = {
            "event": "start", "hermes": str(hermes.path), "version": version.label, "max_meaning": str(meaning),
            "max_means": "board running cap: --max running+add" if meaning == "running_cap"
            else "spawns per pass: --max add", "board": board.slug, "guard": capacity.url,
            "ticks": options.ticks, "dry_run": options.dry_run,
            "startup_hermes_ms": round(sum(c.seconds for c in hermes.calls) * 1000, 1),
        }
        if options.dry_run:
            print(format_line(start, as_json=config.log_json), file=out, flush=True)
            return _ticks(ticker, options, config.log_json, out, sleep)
        lock_path = config.lock_file or board.db_path.with_name(board.db_path.name + ".guard-dispatch.lock")
        try:
            with lock.exclusive(lock_path):
                print(format_line(start, as_json=config.log_json), file=out, flush=True)
                return _ticks(ticker, options, config.log_json, out, sleep)
        except lock.LockBusy as exc:
            print(f"guard-dispatch: another guard-dispatch is running ({exc}); exiting", file=out, flush=True)
            return ExitCode.OK


def _configure(options: Options) -> DispatchConfig:
    config = load(options.config) if options.config else DispatchConfig()
    changes: dict[str, object] = {
        name: value for name in ("guard_url", "board", "hermes", "lock_file", "upstream")
        if (value := getattr(options, name)) is not None
    }
    if options.log_json:
        changes["log_json"] = True
    if options.no_reserve:
        changes["reserve"] = False
    auto_only = {"--max-running": options.max_running, "--queue-per-slot": options.queue_per_slot}
    if options.target == "auto" or (options.target is None and any(v is not None for v in auto_only.values())):
        if options.target is None and not config.policy.auto:
            flag, value = next((k, v) for k, v in auto_only.items() if v is not None)
            raise ConfigError(flag, value, "only applies with --target auto")
        bound = options.max_running if options.max_running is not None else (
            config.policy.schedule.default_target if config.policy.auto else DEFAULT_MAX_RUNNING)
        queue = options.queue_per_slot if options.queue_per_slot is not None else config.policy.queue_per_slot
        changes["policy"] = Policy(schedule=config.policy.schedule.with_default(bound), pools=config.policy.pools,
                                   auto=True, queue_per_slot=queue)
    elif isinstance(options.target, int):
        for flag, value in auto_only.items():
            if value is not None:
                raise ConfigError(flag, value, "only applies with --target auto")
        changes["policy"] = Policy(schedule=config.policy.schedule.with_default(options.target),
                                   pools=config.policy.pools)
    if options.interval < 0:
        raise ConfigError("--interval", options.interval, "must be >= 0")
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


def _run_forever(
    options: Options, config: DispatchConfig, hermes: Hermes, version: str, meaning: MaxMeaning, board: Board,
    env: Mapping[str, str], clock: Callable[[], datetime], out: TextIO, until: Callable[[], bool] | None,
) -> ExitCode:
    lock_path = config.lock_file or board.db_path.with_name(board.db_path.name + ".guard-dispatch.lock")
    try:
        with lock.exclusive(lock_path):
            reader, reader_error = None, ""
            try:
                reader = BoardReader(board.db_path)
            except SchemaUnknown as exc:
                reader_error = str(exc)
            try:
                return asyncio.run(_serve(options, config, hermes, version, meaning, board, env, clock, out, until,
                                          reader, reader_error))
            finally:
                if reader is not None:
                    reader.close()
    except lock.LockBusy as exc:
        print(f"guard-dispatch: another guard-dispatch is running ({exc}); exiting", file=out, flush=True)
        return ExitCode.OK


async def _serve(
    options: Options, config: DispatchConfig, hermes: Hermes, version: str, meaning: MaxMeaning, board: Board,
    env: Mapping[str, str], clock: Callable[[], datetime], out: TextIO, until: Callable[[], bool] | None,
    reader: BoardReader | None, reader_error: str,
) -> ExitCode:
    token = env.get(config.admin_token_env, "")
    reserver = None
    if config.reserve and token:
        reserver = Reserver(config.guard_url, token=token, ttl_s=config.reservation_ttl_s, upstream=config.upstream,
                            timeout_s=config.guard_timeout_s)
    runner = Runner(
        hermes=hermes, board=board, meaning=meaning, policy=config.policy, guard_url=config.guard_url,
        upstream=config.upstream, reader=reader, reserver=reserver, grace_s=crash_grace_s(env), clock=clock,
        out=out, log_json=config.log_json, guard_timeout_s=config.guard_timeout_s,
    )
    target = config.policy.schedule.default_target
    runner.log({
        "event": "start", "mode": "run", "hermes": str(hermes.path), "version": version, "max_meaning": str(meaning),
        "board": board.slug, "guard": config.guard_url, "board_read": "sqlite" if reader else "cli",
        "target": (f"auto(max_running={target},queue_per_slot={config.policy.queue_per_slot:g})" if config.policy.auto
                   else target),
        "reserve": "on" if reserver else ("off: no admin token in $" + config.admin_token_env if config.reserve
                                           else "off"),
        **({"board_read_error": reader_error} if reader_error else {}),
    })
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (RuntimeError, ValueError):  # not the main thread
            pass
    watchers = []
    if options.seconds is not None:
        watchers.append(loop.call_later(options.seconds, stop.set))

    async def poll_until() -> None:
        while True:
            if until is None or until():
                stop.set()
                return
            await asyncio.sleep(0.1)

    poller = asyncio.create_task(poll_until()) if until is not None else None
    try:
        await runner.run(stop)
    finally:
        for handle in watchers:
            handle.cancel()
        if poller is not None:
            poller.cancel()
        for sig in handled:
            loop.remove_signal_handler(sig)
    s = runner.stats
    runner.log({"event": "stop", "board": board.slug, "steps": s.steps, "dispatches": s.dispatches,
                "spawned": s.spawned, "hermes_calls": s.hermes_calls, "failures": s.failures})
    return ExitCode.OK


def _ticks(ticker: Ticker, options: Options, as_json: bool, out: TextIO, sleep: Callable[[float], None]) -> ExitCode:
    code = ExitCode.OK
    for n in range(1, options.ticks + 1):
        started = time.monotonic()
        report = ticker.tick(f"{n}/{options.ticks}")
        print(report.line(as_json=as_json), file=out, flush=True)
        if report.failure is not None and code is ExitCode.OK:
            code = _FAILURE_CODES[report.failure]
        if n < options.ticks:
            sleep(max(0.0, options.interval - (time.monotonic() - started)))
    return code


def _status(
    options: Options, config: DispatchConfig, hermes: Hermes, version: str, meaning: str, board: str, db: str,
    capacity: CapacityClient, clock: Callable[[], datetime], out: TextIO,
    fail: Callable[[ExitCode, str], ExitCode],
) -> ExitCode:
    try:
        counts = hermes.stats()
    except HermesError as exc:
        return fail(ExitCode.HERMES_FAILED, str(exc))
    cap, cap_error, decision = None, "", None
    try:
        cap = capacity.fetch()
        free, profile_free = cap.batch_free(config.upstream), cap.profile_free(config.upstream)
        running = {p: c["running"] for p, c in counts.items() if c.get("running")}
        ready = hermes.ready() if needs_queue(config.policy, profile_free) else None
        decision = decide(config.policy.without_queue(), Snapshot(free=free, running=running, ready=ready,
                                                  profile_free=profile_free), clock())
    except (CapacityUnavailable, ValueError) as exc:
        cap_error = str(exc)
    except HermesError as exc:
        return fail(ExitCode.HERMES_FAILED, str(exc))
    print(status.render(
        board=board, db_path=db, hermes=str(hermes.path), version=version, meaning=meaning,
        guard_url=config.guard_url, counts=counts, capacity=cap, capacity_error=cap_error, policy=config.policy,
        upstream=config.upstream, decision=decision, now=clock(),
    ), file=out, flush=True)
    return ExitCode.OK if decision is not None else ExitCode.GUARD_UNAVAILABLE


if __name__ == "__main__":
    raise SystemExit(main())
