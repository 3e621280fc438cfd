"""Native thread names, so that `top -H`, `ps -L` and /proc/PID/task/*/comm show what each thread is.

Python (before 3.14) leaves every thread named after the interpreter; `name_this_thread("live-render")` gives the
calling thread its name at the OS level too (Linux: prctl PR_SET_NAME, 15 characters). Elsewhere, or if it
fails, nothing happens: a name is a convenience, never a reason to stop.
"""

from __future__ import annotations

__all__ = ["name_this_thread"]

import ctypes
import ctypes.util
import sys

_PR_SET_NAME = 15
_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        _libc = None


def name_this_thread(name: str) -> None:
    """Set the calling thread's OS-level name (at most 15 bytes are kept)."""
    if _libc is None:
        return
    try:
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode("utf-8", "replace")[:15]), 0, 0, 0)
    except (AttributeError, OSError, ValueError):
        pass
