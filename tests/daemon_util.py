"""Running a real `inspectd run` subprocess for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def camera_toml(cam_id: str, url: str, **extra) -> str:
    lines = ["[[cameras]]", f'id = "{cam_id}"', f'url = "{url}"'] + [f"{k} = {_toml(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def daemon_config(tmp_path: Path, cameras: str, model: str = "builtin:demo", **sections: dict) -> tuple[Path, dict]:
    """Write a config with free ports; returns (path, {"metrics": url, "events": endpoint})."""
    metrics_port, events_port = free_port(), free_port()
    publish = {"endpoint": f"tcp://127.0.0.1:{events_port}", "heartbeat_s": 0.5, **sections.pop("publish", {})}
    parts = [f'[model]\npath = "{model}"\n', f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}\n',
             "[publish]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in publish.items())]
    for name, values in sections.items():
        parts.append(f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items()))
    path = tmp_path / "inspectd.toml"
    path.write_text("\n".join(parts) + "\n" + cameras)
    return path, {"metrics": f"http://127.0.0.1:{metrics_port}", "events": publish["endpoint"]}


def _toml(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class DaemonProcess:
    """`python -m inspectd run --config PATH` with stderr captured to a file; always stopped."""

    def __init__(self, config: Path, log: Path, env: dict | None = None):
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "inspectd", "run", "--config", str(config)],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, metrics_url: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                if http_get(metrics_url + "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"daemon not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()
