"""guard-dispatch: start Hermes kanban workers only into the batch capacity the guard reports.

``main()`` parses arguments; ``run()`` does the work and returns an :class:`ExitCode` (tests call it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import TextIO

from gateway_guard.dispatch import lock, status
from gateway_guard.dispatch.capacity import CapacityClient, CapacityUnavailable
from gateway_guard.dispatch.config import ConfigError, DispatchConfig, load
from gateway_guard.dispatch.decide import Policy, Snapshot, decide, needs_queue
from gateway_guard.dispatch.hermes import Hermes, HermesError, HermesNotFound, resolve_hermes
from gateway_guard.dispatch.tick import Failure, Ticker, format_line


class ExitCode(IntEnum):
    OK = 0
    CONFIG_ERROR = 2
    GUARD_UNAVAILABLE = 3
    HERMES_NOT_FOUND = 4
    HERMES_FAILED = 5
    BOARD_LOCKED = 6


EXIT_CODE_HELP = {
    ExitCode.OK: "every tick ran (or another guard-dispatch holds the lock: nothing to do)",
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
    target: int | None = None
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
        epilog="commands:\n  tick (default)  run --ticks ticks, --interval seconds apart\n"
        "  status          the board's ready/running cards per profile beside the guard's capacity\n\n"
        f"exit codes:\n{codes}\n\nWith --ticks N a failed tick does not stop the later ones; the exit code is "
        "that of the first failed tick.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", choices=["tick", "status"], default="tick")
    parser.add_argument("--config", type=Path, help="TOML config (see config/dispatch.example.toml)")
    parser.add_argument("--guard-url", help="the guard's base URL (default http://127.0.0.1:8090)")
    parser.add_argument("--board", help="Hermes kanban board slug (default: the CLI's current board)")
    parser.add_argument("--hermes", metavar="PATH", help="hermes executable (else $HERMES_BIN, else PATH)")
    parser.add_argument("--target", type=_count, help="batch target: running cards to aim for (overrides "
                        "the config's target and time windows)")
    parser.add_argument("--upstream", help="read one upstream's batch free slots instead of the total")
    parser.add_argument("--lock-file", type=Path, help="default: <board db>.guard-dispatch.lock")
    parser.add_argument("--dry-run", action="store_true", help="compute and print a tick, dispatch nothing")
    parser.add_argument("--ticks", type=_positive, default=1, help="ticks to run (default 1)")
    parser.add_argument("--interval", type=float, default=15.0, help="seconds from one tick's start to the "
                        "next (default 15)")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per tick")
    return parser


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


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
) -> ExitCode:
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
    if options.target is not None:
        changes["policy"] = Policy(schedule=config.policy.schedule.with_default(options.target),
                                   pools=config.policy.pools)
    if options.interval < 0:
        raise ConfigError("--interval", options.interval, "must be >= 0")
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


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
        decision = decide(config.policy, Snapshot(free=free, running=running, ready=ready,
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
