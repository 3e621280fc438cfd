"""SIGHUP held from the first instruction to exit (inspectd.hangup): a reload request or a logrotate at the
wrong moment never turns a starting or stopping daemon into rc 129 (SIGHUP's default action)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from daemon_util import DaemonProcess, camera_toml, daemon_config
from support import ROOT, wait_until


def _catches_sighup(pid: int) -> bool:
    """Whether the process has a handler for SIGHUP now (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            caught = next(line for line in status if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGHUP - 1)))


def _storm(pid: int, stop: threading.Event) -> list[int]:
    """SIGHUP every 20 ms until `stop` or the process is gone; the signals sent, in a list filled meanwhile."""
    sent: list[int] = []

    def run() -> None:
        while not stop.wait(0.02):
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                return
            sent.append(1)

    threading.Thread(target=run, daemon=True).start()
    return sent


def test_a_sighup_storm_from_start_to_exit_never_ends_the_daemon(tmp_path):
    config, urls = daemon_config(tmp_path, camera_toml("cam-1", "synthetic://?fps=5&width=64&height=48"))
    stop = threading.Event()
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        pid = daemon.proc.pid
        # Caught as soon as Python runs inspectd's first line, long before the daemon's own handler.
        wait_until(lambda: _catches_sighup(pid) or daemon.proc.poll() is not None, 30, "SIGHUP caught")
        sent = _storm(pid, stop)
        try:
            daemon.wait_ready(urls["metrics"])
            daemon.wait_log("reload: nothing changed", timeout=60)  # the HUPs are reloads, while it runs too
            rc = daemon.terminate()  # the storm goes on through the whole shutdown
        finally:
            stop.set()
        assert rc == 0, daemon.log()
        assert len(sent) >= 10


def test_a_command_that_is_not_a_service_still_ends_on_sighup():
    """hold() then release(): a HUP that came in between is delivered at release (a closed terminal ends a
    one-off command as it always did)."""
    code = (
        "import os, signal\n"
        "from inspectd import hangup\n"
        "hangup.hold()\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "print('held', flush=True)\n"
        "hangup.release()\n"
        "print('not reached', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGHUP and proc.stdout == "held\n"
