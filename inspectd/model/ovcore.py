"""The process's one OpenVINO Core (the daemon's runtimes and `inspectd export --int8` share it)."""

from __future__ import annotations

__all__ = ["import_openvino", "openvino_core"]

import sys
import threading

_core_lock = threading.Lock()
_core = None


def import_openvino():
    """`openvino`, with its telemetry kept out of the process. OpenVINO's converter (and NNCF) send usage events to
    Google Analytics unless a consent file in the user's home says no, from a `multiprocessing` child forked off
    the daemon's threads: on a line PC with no route out, that child deadlocked on a lock copied mid-use, ignored
    the SIGTERM meant to end it (it inherits the daemon's handler), and outlived the daemon. Both fall back to
    sending nothing when `openvino_telemetry` cannot be imported; None in sys.modules makes it so."""
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
    import openvino

    return openvino


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
            _core = import_openvino().Core()
        return _core
