"""systemd notify protocol: a real unix datagram socket as NOTIFY_SOCKET, a real daemon subprocess."""

from __future__ import annotations

import os
import socket
import time

import pytest
from daemon_util import DaemonProcess, camera_toml, daemon_config
from support import wait_until

from inspectd.service.notify import Notifier


def test_notifier_sends_datagrams(notify_socket):
    n = Notifier({"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "4000000"})
    assert n.enabled and n.watchdog_interval_s == 2.0
    n.ready()
    n.status("2/2 cameras up")
    n.watchdog()
    n.reloading()
    n.stopping()
    notify_socket.wait_for("STOPPING=1", timeout=5)  # the last one sent: datagrams arrive in order
    lines = notify_socket.lines()
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
    env = {
        "NOTIFY_SOCKET": str(notify_socket.path),
        "WATCHDOG_USEC": "1000000",  # ping every 0.5 s
        "INSPECTD_TEST_FREEZE_INFERENCE": str(freeze),
    }
    with DaemonProcess(config, tmp_path / "daemon.log", env=env) as daemon:
        t_ready = notify_socket.wait_for("READY=1", timeout=120)
        wait_until(
            lambda: notify_socket.pump() or notify_socket.count("WATCHDOG=1", since=t_ready) >= 4,
            10,
            lambda: f"4 watchdog pings after READY=1 (one every 0.5 s): {notify_socket.lines()}\n{daemon.log()}",
        )
        # STATUS= every 5 s: until one says the camera is up.
        wait_until(
            lambda: notify_socket.pump() or any(m.startswith("STATUS=") and "1/1 cameras up" in m for m in notify_socket.lines()),
            15,
            lambda: f"STATUS=... 1/1 cameras up: {notify_socket.lines()}",
        )
        status = next(m for m in notify_socket.lines() if m.startswith("STATUS=") and "1/1 cameras up" in m)
        assert "frames/s" in status

        freeze.touch()  # inference hangs from the next batch on
        withheld = "withholding the watchdog ping: inference stuck"
        daemon.wait_log(withheld, timeout=15)
        notify_socket.pump()  # what was sent before it withheld the first ping
        t_hung = time.monotonic()
        # It withholds the ping at every check while one is due (every 0.25 s): 12 more, about 3 s of
        # pings due every 0.5 s, and none went out meanwhile.
        daemon.wait_log(withheld, timeout=15, count=daemon.log().count(withheld) + 12)
        notify_socket.pump()
        assert notify_socket.count("WATCHDOG=1", since=t_hung) == 0, "pings must stop while inference hangs"

        freeze.unlink()  # the call returns: progress again, pings resume
        t_back = time.monotonic()
        notify_socket.wait_for("WATCHDOG=1", timeout=10, since=t_back)

        assert daemon.terminate() == 0
        notify_socket.wait_for("STOPPING=1", timeout=5)
        notify_socket.pump()
        assert notify_socket.count("STOPPING=1") == 1
