"""The systemd notify protocol (sd_notify(3)): datagrams of `KEY=value` lines to $NOTIFY_SOCKET.

A dozen lines over a unix datagram socket, written by hand rather than adding a dependency:
the protocol is tiny and stable, and the daemon must also run where systemd is absent (then
every call is a no-op).
"""

from __future__ import annotations

__all__ = ["Notifier"]

import logging
import os
import socket
import time

log = logging.getLogger("inspectd.service.notify")


class Notifier:
    """Sends READY/STATUS/WATCHDOG/RELOADING/STOPPING when started by systemd with Type=notify.

    >>> n = Notifier()          # reads NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID
    >>> n.ready(); n.status("2/2 cameras up, 7.9 fps")
    """

    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace.
        self._address = "\0" + path[1:] if path.startswith("@") else path
        usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        pid = env.get("WATCHDOG_PID")
        mine = pid is None or pid == str(os.getpid())
        # Ping at half the timeout, as sd_watchdog_enabled(3) recommends.
        self.watchdog_interval_s: float | None = usec / 2e6 if usec > 0 and mine else None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self._address else None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
            return True
        except OSError as exc:  # systemd gone or socket full: never fatal for the daemon
            log.warning("sd_notify failed: %s", exc)
            return False

    def ready(self) -> bool:
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload to this message.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
