"""The daemon on real camera sources: a real RTSP server (OpenCV/FFmpeg and GStreamer appsink) and a video file.

The served frames carry synthetic defects at known places; the events' masks and regions must
fall on them (daemon_util.assert_on_defect).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from daemon_util import DaemonProcess, assert_on_defect, camera_toml, daemon_config
from rtsp import RtspServer, synthetic_frame
from support import collect_events, scrape

from inspectd.client import Subscriber

pytestmark = pytest.mark.slow
W, H = 320, 240


def _run(tmp_path, camera: str, topic: str, truth: np.ndarray, n: int = 3):
    config, urls = daemon_config(tmp_path, camera)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    sub = None
    try:
        daemon.wait_ready(urls["metrics"])
        sub = Subscriber(urls["events"], topics=[f"defect.{topic}", f"status.{topic}"])
        events = collect_events(sub, n, "defect", timeout=60, message=daemon.log)
        assert_on_defect(events, truth)
    except BaseException:  # never leave a daemon behind when the checks fail
        daemon.terminate()
        if sub is not None:
            sub.close()
        raise
    return daemon, sub, urls


@pytest.mark.parametrize("backend", ["opencv", "gstreamer"])
def test_rtsp_camera_events_fall_on_defects(tmp_path, backend):
    with RtspServer(mode="synthetic", width=W, height=H, fps=10, seed=0) as server:
        cam = camera_toml(
            "rtsp1", server.url, backend=backend, stall_timeout_s=2, open_timeout_s=2, reconnect_initial_s=0.2, reconnect_max_s=1
        )
        daemon, sub, urls = _run(tmp_path, cam, "rtsp1", server.mask)
        with daemon, sub:
            server.stop(kill=True)  # the camera dies mid-stream
            collect_events(
                sub, lambda evs: any(ev.header["state"] == "down" for ev in evs), "status", timeout=30, message=daemon.log
            )
            assert scrape(urls["metrics"]).value("inspectd_camera_up", camera="rtsp1") == 0.0
            assert daemon.terminate() == 0


def test_video_file_camera(tmp_path):
    sample = synthetic_frame(1, W, H)
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (W, H))
    for _ in range(20):
        writer.write(cv2.cvtColor(sample.image, cv2.COLOR_GRAY2BGR))
    writer.release()
    daemon, sub, _ = _run(tmp_path, camera_toml("file1", str(path)), "file1", sample.mask)
    with daemon, sub:
        assert daemon.terminate() == 0
