"""SIGHUP held from the first instruction of a service process to its exit.

    hangup.hold()               # inspectd/__main__.py, before anything else is imported
    hangup.release()            # cli: a command that is not a service gets the default back (a HUP that
                                # came meanwhile is delivered then: the terminal closed, the command ends)
    if hangup.take(): ...       # the daemon, once its own handler is in: a HUP during start-up is a reload

SIGHUP's default action ends a process, and systemd's `ExecReload` sends it; logrotate or a config tool
may too. Before the daemon's handler is in (imports take a second or more) and after it is removed at
the end of a clean stop, a HUP would turn a reload or a clean stop into rc 129. Held, it is recorded
instead: the daemon takes a HUP that came during start-up as a reload request; one that comes while
it exits is ignored. Hand-written: the standard library has the mechanism (signal.signal), and what
to record is ours.
"""

from __future__ import annotations

__all__ = ["hold", "release", "take", "ignore_to_exit", "SERVICES"]

import os
import signal
import threading

# The commands that run as systemd services (deploy/*.service): they keep SIGHUP held.
SERVICES = frozenset({"run", "bridge", "proxy"})

_lock = threading.Lock()
_received = 0


def _record(signum: int, frame: object) -> None:
    global _received
    with _lock:
        _received += 1


def hold() -> None:
    """From now on a SIGHUP is recorded, not fatal (until someone installs a handler of their own)."""
    signal.signal(signal.SIGHUP, _record)


def take() -> int:
    """The SIGHUPs recorded since the last call (0 if none)."""
    global _received
    with _lock:
        count, _received = _received, 0
    return count


def ignore_to_exit() -> None:
    """SIGHUP ignored from now to the process's end: CPython puts back the default action of every handler
    it installed when the interpreter shuts down (a HUP during that teardown, which takes a moment with
    TensorFlow loaded, would end the process with 129), but leaves an ignored signal ignored."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def release() -> None:
    """The default action back; a SIGHUP recorded meanwhile is delivered now (the process ends as it would
    have)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if take():
        os.kill(os.getpid(), signal.SIGHUP)
