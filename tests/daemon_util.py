"""Running a real `inspectd run` subprocess for integration tests.

free_port and http_get live in support.py (re-exported here, where older tests import them from).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from support import ROOT, dies_with_tests, free_port, http_get, wait_until

__all__ = ["ROOT", "DaemonProcess", "assert_on_defect", "camera_toml", "daemon_config", "free_port", "http_get"]

CELL = 32  # the demo model's CAM cell on a 320 x 240 frame (8 x 10 cells): the slack of "on the defect"


def assert_on_defect(events: list, truth: np.ndarray) -> None:
    """Every defect event's mask is hot on the defect `truth` (H, W; > 0 = defect) and one of its
    regions falls on it, within one CAM cell. The mask must have truth's size."""
    near = cv2.dilate((truth > 0).astype(np.uint8), np.ones((2 * CELL + 1, 2 * CELL + 1), np.uint8)) > 0
    assert events, "no defect events"
    for ev in events:
        assert ev.mask.shape == truth.shape, (ev.mask.shape, truth.shape)
        # The map is hot on the injected defect, and hotter there than on the frame as a whole
        # (its peak is no use: the calibrated map saturates at 255 over an area).
        on_defect = ev.mask[truth > 0].mean()
        assert on_defect >= 128 and on_defect > ev.mask.mean(), (on_defect, ev.mask.mean())
        hits = [
            r
            for r in ev.header["regions"]
            if near[r["bbox"][1] : r["bbox"][1] + r["bbox"][3], r["bbox"][0] : r["bbox"][0] + r["bbox"][2]].any()
        ]
        assert hits, ev.header["regions"]


def camera_toml(cam_id: str, url: str, **extra) -> str:
    lines = ["[[cameras]]", f'id = "{cam_id}"', f'url = "{url}"'] + [f"{k} = {_toml(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def daemon_config(
    tmp_path: Path,
    cameras: str,
    model: str = "builtin:demo",
    models: list[dict] | None = None,
    model_keys: dict | None = None,
    **sections: dict,
) -> tuple[Path, dict]:
    """Write a config with free ports; returns (path, {"metrics": url, "events": endpoint}). `models`: [[models]]
    tables (each a dict of keys) instead of [model] path = `model`; `model_keys`: more [model] keys."""
    metrics_port, events_port = free_port(), free_port()
    publish = {"endpoint": f"tcp://127.0.0.1:{events_port}", "heartbeat_s": 0.5, **sections.pop("publish", {})}
    tables = "".join("[[models]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in m.items()) + "\n" for m in models or [])
    keys = "".join(f"{k} = {_toml(v)}\n" for k, v in (model_keys or {}).items())
    parts = [
        tables or f'[model]\npath = "{model}"\n{keys}',
        f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}\n',
        "[publish]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in publish.items()),
    ]
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


class DaemonProcess:
    """`python -m inspectd run --config PATH` with stderr captured to a file; always stopped."""

    def __init__(
        self, config: Path, log: Path, env: dict | None = None, prefix: tuple[str, ...] = (), python: str = sys.executable
    ):
        """`prefix`: a command the daemon's argv is appended to (e.g. a private mount namespace); it must
        pass SIGTERM on to the daemon and exit with its status. `python`: another install's interpreter."""
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            dies_with_tests([*prefix, python, "-m", "inspectd", "run", "--config", str(config)]),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, metrics_url: str, timeout: float = 120.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                return http_get(metrics_url + "/readyz")[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout, lambda: f"the daemon's /readyz to answer 200:\n{self.log()}", interval=0.2)

    def wait_log(self, needle: str, timeout: float = 30.0, count: int = 1) -> None:
        """Until `needle` occurs `count` times in the daemon's output (it must not exit meanwhile)."""

        def seen() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode} waiting for {needle!r}:\n{self.log()}")
            return self.log().count(needle) >= count

        wait_until(seen, timeout, lambda: f"{count} x {needle!r} in the daemon's log:\n{self.log()}", interval=0.1)

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
