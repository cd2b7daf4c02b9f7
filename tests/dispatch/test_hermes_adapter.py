"""The Hermes adapter: finding the executable, reading its version, the two meanings of --max."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway_guard.dispatch.hermes import (
    Hermes,
    HermesError,
    HermesNotFound,
    MaxMeaning,
    parse_version,
    resolve_hermes,
)


def executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("text", "number", "meaning"),
    [
        ("Hermes Agent v0.19.0 (2026.7.20)\nInstall directory: /x\n", (0, 19, 0), MaxMeaning.RUNNING_CAP),
        ("Hermes Agent v0.13.0 (2026.1.2)", (0, 13, 0), MaxMeaning.RUNNING_CAP),
        ("Hermes Agent v1.0.3", (1, 0, 3), MaxMeaning.RUNNING_CAP),
        ("Hermes Agent v0.12.9 (2025.12.1)", (0, 12, 9), MaxMeaning.PER_PASS),
        ("hermes 0.11.0", (0, 11, 0), MaxMeaning.PER_PASS),
        ("Hermes Agent (dev build)", None, MaxMeaning.PER_PASS),  # unknown: never over-dispatch
        ("", None, MaxMeaning.PER_PASS),
    ],
)
def test_version_picks_the_max_meaning(text: str, number: tuple[int, int, int] | None, meaning: MaxMeaning) -> None:
    version = parse_version(text)
    assert (version.number, version.meaning) == (number, meaning)


@pytest.mark.parametrize(
    ("meaning", "running", "add", "expected"),
    [
        (MaxMeaning.RUNNING_CAP, 2, 1, 3),  # 0.19.0: --max caps the board's total running cards
        (MaxMeaning.RUNNING_CAP, 0, 3, 3),
        (MaxMeaning.PER_PASS, 2, 1, 1),  # older: --max caps the spawns of this pass
        (MaxMeaning.RUNNING_CAP, 3, 0, 0),  # nothing may start: --max 0 never spawns (it still reclaims)
        (MaxMeaning.PER_PASS, 3, 0, 0),
    ],
)
def test_max_for(meaning: MaxMeaning, running: int, add: int, expected: int) -> None:
    assert meaning.max_for(running, add) == expected


def test_resolve_prefers_the_flag_then_hermes_bin_then_path(tmp_path: Path) -> None:
    flag = executable(tmp_path / "flag" / "hermes")
    env_bin = executable(tmp_path / "envbin" / "hermes")
    on_path = executable(tmp_path / "bin" / "hermes")
    env = {"HERMES_BIN": str(env_bin), "PATH": str(on_path.parent)}
    assert resolve_hermes(str(flag), env) == flag
    assert resolve_hermes(None, env) == env_bin
    assert resolve_hermes(None, {"PATH": str(on_path.parent)}) == on_path


def test_relative_names_become_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = executable(tmp_path / "tools" / "hermes")
    monkeypatch.chdir(tmp_path)
    assert resolve_hermes("tools/hermes", {"PATH": ""}) == exe
    assert resolve_hermes(None, {"PATH": str(exe.parent)}).is_absolute()


def test_not_found_names_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(HermesNotFound) as info:
        resolve_hermes(str(tmp_path / "nope"), {"PATH": "/usr/bin"})
    assert f"--hermes {tmp_path / 'nope'}" in str(info.value)
    with pytest.raises(HermesNotFound, match="HERMES_BIN=/no/such/hermes"):
        resolve_hermes(None, {"HERMES_BIN": "/no/such/hermes", "PATH": "/usr/bin"})
    with pytest.raises(HermesNotFound, match=f"'hermes' on PATH={tmp_path}"):
        resolve_hermes(None, {"PATH": str(tmp_path)})
    not_exec = tmp_path / "hermes"
    not_exec.write_text("")
    with pytest.raises(HermesNotFound, match="not executable"):
        resolve_hermes(str(not_exec), {"PATH": ""})


def test_a_failing_command_reports_its_exit_status_and_stderr(tmp_path: Path) -> None:
    broken = executable(tmp_path / "hermes", "#!/bin/sh\necho 'sqlite3.DatabaseError: file is not a database' >&2\n"
                        "exit 7\n")
    with pytest.raises(HermesError, match=r"`hermes --version` exited 7: sqlite3.DatabaseError"):
        Hermes(broken, env=dict(os.environ)).version()


def test_output_that_is_not_json_is_reported(tmp_path: Path) -> None:
    chatty = executable(tmp_path / "hermes", "#!/bin/sh\necho 'no tasks here'\n")
    with pytest.raises(HermesError, match="printed no JSON: 'no tasks here"):
        Hermes(chatty, env=dict(os.environ)).running()
    warned = executable(tmp_path / "hermes2", "#!/bin/sh\necho 'warning: x'\necho '[{\"id\": \"t1\", "
                        "\"assignee\": \"w\"}]'\n")
    assert Hermes(warned, env=dict(os.environ)).running() == {"w": 1}
