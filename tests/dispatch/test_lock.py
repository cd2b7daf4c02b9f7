"""flock-based locks, held across real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway_guard.dispatch import lock

HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def hold_in_other_process(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait(10)
    proc.stdout.close()


def test_exclusive_refuses_at_once_while_another_process_holds_it(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dispatch.lock"
    path.parent.mkdir()
    other = hold_in_other_process(path)
    try:
        with pytest.raises(lock.LockBusy, match=str(path)), lock.exclusive(path):
            pass
    finally:
        release(other)
    with lock.exclusive(path):
        assert path.read_text().strip().isdigit()  # our pid, for the next one's message


def test_a_second_holder_in_the_same_process_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    with lock.exclusive(path):
        with pytest.raises(lock.LockBusy) as info, lock.exclusive(path):
            pass
        assert info.value.holder.isdigit()
    with lock.exclusive(path):
        pass


def test_is_held_probes_without_creating(tmp_path: Path) -> None:
    path = tmp_path / "kanban.db.dispatch.lock"
    assert not lock.is_held(path)
    assert not path.exists()
    other = hold_in_other_process(path)
    try:
        assert lock.is_held(path)
    finally:
        release(other)
    assert not lock.is_held(path)
