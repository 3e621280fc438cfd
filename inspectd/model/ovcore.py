"""The process's one OpenVINO Core (the daemon's runtimes and `inspectd export --int8` share it)."""

from __future__ import annotations

__all__ = ["openvino_core"]

import threading

_core_lock = threading.Lock()
_core = None


def openvino_core():
    """The process's one `openvino.Core`, made at first use and kept until exit.

    One, not one per model: each Core loads its own CPU plugin, and the plugin installs an alternate signal
    stack (mmap'ed, for AMX state) in the thread that creates it, restoring the previous one when it is
    destroyed. Two plugins made and destroyed out of order in one thread (auto measuring both hints, a
    reload) left that thread's alternate stack pointing at unmapped memory, and the next SIGTERM killed the
    daemon with SIGSEGV instead of a clean stop (OpenVINO 2026.4; tests/test_runtimes.py reproduces it)."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino as ov

            _core = ov.Core()
        return _core
