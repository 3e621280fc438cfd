"""The test harness itself: what it starts does not outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, SETPRIV, wait_until

_PARENT = """
import subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from support import dies_with_tests
child = subprocess.Popen(dies_with_tests(["sleep", "300"]))
print(child.pid, flush=True)
time.sleep(300)
"""


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: here nobody may reap an orphan)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


@pytest.mark.skipif(SETPRIV is None, reason="util-linux's setpriv is missing")
def test_a_process_started_by_a_killed_test_run_stops():
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(ROOT / "tests")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        # setpriv sets the death signal and then execs: once the child runs `sleep`, it is set (killing the parent
        # before that would race setpriv on a loaded machine).
        wait_until(lambda: _command(child) == "sleep", 10, f"child {child} to exec sleep")
        parent.send_signal(signal.SIGKILL)  # as a timeout kills pytest: no teardown runs
        parent.wait()
        wait_until(lambda: _gone(child), 10, f"the orphaned child {child} to get SIGTERM")
    finally:
        if not _gone(child):
            os.kill(child, signal.SIGKILL)
