"""The command line without Hermes: argument errors, config errors, the documented exit codes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gateway_guard.dispatch.cli import EXIT_CODE_HELP, ExitCode, Options, _configure, build_parser, main, run


def test_help_documents_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for code in ExitCode:
        assert f"{code.value}  {code.name}" in text
        assert EXIT_CODE_HELP[code] in text
    assert "status" in text and "--ticks" in text


def test_exit_codes_are_stable() -> None:
    assert {c.name: c.value for c in ExitCode} == {
        "OK": 0, "CONFIG_ERROR": 2, "GUARD_UNAVAILABLE": 3, "HERMES_NOT_FOUND": 4, "HERMES_FAILED": 5,
        "BOARD_LOCKED": 6,
    }


@pytest.mark.parametrize("argv", [["--ticks", "0"], ["--target", "-1"], ["frobnicate"], ["--interval", "x"]])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == ExitCode.CONFIG_ERROR
    assert "guard-dispatch: error:" in capsys.readouterr().err


def test_options_mirror_the_parser() -> None:
    args = build_parser().parse_args(["status", "--board", "b", "--target", "3", "--ticks", "4"])
    assert (args.command, args.board, args.target, args.ticks) == ("status", "b", 3, 4)


def test_config_errors_exit_2_naming_key_and_value(tmp_path: Path) -> None:
    bad = tmp_path / "dispatch.toml"
    bad.write_text('[[window]]\nstart = "25:00"\nend = "08:00"\ntarget = 1\n')
    err = io.StringIO()
    code = run(Options(config=bad), env={"PATH": ""}, out=io.StringIO(), err=err)
    assert code is ExitCode.CONFIG_ERROR
    assert f"config {bad}: window[1].start = '25:00'" in err.getvalue()


def test_negative_interval_is_a_config_error() -> None:
    err = io.StringIO()
    assert run(Options(interval=-1), env={"PATH": ""}, out=io.StringIO(), err=err) is ExitCode.CONFIG_ERROR
    assert "--interval = -1" in err.getvalue()


def test_run_and_auto_target_arguments() -> None:
    args = build_parser().parse_args(["run", "--target", "auto", "--max-running", "5", "--no-reserve"])
    assert (args.command, args.target, args.max_running, args.no_reserve) == ("run", "auto", 5, True)
    err = io.StringIO()
    code = run(Options(command="run", target=2, max_running=4), env={"PATH": ""}, out=io.StringIO(), err=err)
    assert code is ExitCode.CONFIG_ERROR and "--max-running = 4: only applies with --target auto" in err.getvalue()
    args = build_parser().parse_args(["run", "--target", "auto", "--queue-per-slot", "0.5"])
    assert args.queue_per_slot == 0.5
    assert _configure(Options(command="run", target="auto", queue_per_slot=3)).policy.queue_per_slot == 3
    assert _configure(Options(command="run", target="auto")).policy.queue_per_slot == 2
    err = io.StringIO()
    code = run(Options(command="run", target=2, queue_per_slot=3), env={"PATH": ""}, out=io.StringIO(), err=err)
    assert code is ExitCode.CONFIG_ERROR and "--queue-per-slot = 3: only applies with --target auto" in err.getvalue()
