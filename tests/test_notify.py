"""systemd notify protocol: a real unix datagram socket as NOTIFY_SOCKET, a real daemon subprocess."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from daemon_util import DaemonProcess, camera_toml, daemon_config

from inspectd.service.notify import Notifier


class NotifySocket:
    """What systemd would be: a bound AF_UNIX datagram socket collecting KEY=value messages."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096).decode()
            except (socket.timeout, BlockingIOError):
                continue
            for line in data.splitlines():
                self.messages.append((time.monotonic(), line))

    def wait_for(self, prefix: str, timeout: float) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for t, line in self.messages:
                if line.startswith(prefix):
                    return t
            self.pump(0.2)
        raise AssertionError(f"no {prefix!r} within {timeout} s; got {[m for _, m in self.messages][-10:]}")

    def count(self, prefix: str, since: float = 0.0) -> int:
        return sum(1 for t, line in self.messages if t >= since and line.startswith(prefix))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def notify_socket(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_notifier_sends_datagrams(notify_socket):
    n = Notifier({"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "4000000"})
    assert n.enabled and n.watchdog_interval_s == 2.0
    n.ready()
    n.status("2/2 cameras up")
    n.watchdog()
    n.reloading()
    n.stopping()
    notify_socket.pump(0.3)
    lines = [m for _, m in notify_socket.messages]
    assert lines[:3] == ["READY=1", "STATUS=2/2 cameras up", "WATCHDOG=1"]
    assert "RELOADING=1" in lines and any(m.startswith("MONOTONIC_USEC=") for m in lines) and lines[-1] == "STOPPING=1"


def test_notifier_abstract_socket_and_disabled_cases():
    name = f"inspectd-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert server.recv(100) == b"READY=1"
    finally:
        server.close()
    off = Notifier({})
    assert not off.enabled and not off.ready() and off.watchdog_interval_s is None
    other_pid = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other_pid.watchdog_interval_s is None  # the watchdog is meant for another process


@pytest.mark.slow
def test_daemon_ready_status_watchdog_stops_on_hang_and_stopping(tmp_path, notify_socket):
    freeze = tmp_path / "freeze"
    cams = camera_toml("cam-a", "synthetic://?fps=10&width=160&height=128&defect_rate=0.5&seed=1")
    config, urls = daemon_config(tmp_path, cams, daemon={"stuck_after_s": 1.5})
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000",  # ping every 0.5 s
           "INSPECTD_TEST_FREEZE_INFERENCE": str(freeze)}
    with DaemonProcess(config, tmp_path / "daemon.log", env=env) as daemon:
        t_ready = notify_socket.wait_for("READY=1", timeout=120)
        notify_socket.wait_for("STATUS=", timeout=10)
        notify_socket.pump(3.0)
        assert notify_socket.count("WATCHDOG=1", since=t_ready) >= 4, daemon.log()
        status = [m for _, m in notify_socket.messages if m.startswith("STATUS=")][-1]
        assert "1/1 cameras up" in status and "frames/s" in status

        freeze.touch()  # inference hangs from the next batch on
        notify_socket.pump(1.5 + 1.0)  # past stuck_after_s, plus a margin for the batch in flight
        t_hung = time.monotonic()
        notify_socket.pump(3.0)
        assert notify_socket.count("WATCHDOG=1", since=t_hung) == 0, "pings must stop while inference hangs"
        assert "withholding the watchdog ping: inference stuck" in daemon.log()

        freeze.unlink()  # the call returns: progress again, pings resume
        t_back = time.monotonic()
        notify_socket.pump(2.0)
        assert notify_socket.count("WATCHDOG=1", since=t_back) >= 1

        assert daemon.terminate() == 0
        notify_socket.pump(0.5)
        assert notify_socket.count("STOPPING=1") == 1
