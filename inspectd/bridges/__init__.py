"""Separate processes that carry the daemons' events elsewhere: a ZeroMQ proxy, MQTT, OPC UA."""

from __future__ import annotations

__all__ = ["stop_on_signals"]

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` (the process's loop ends cleanly) while inside; old handlers restored."""
    old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
