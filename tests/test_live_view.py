"""The live view's parts in-process: the render thread (only while watched, at most max_fps), the recent-defect
logs (memory ring, archive), the HTTP app on a real server (MJPEG parsed by a plain client, auth, Host check,
collection), and [ui] configuration. The daemon and a real browser: test_live_view_browser.py."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from support import wait_until

from inspectd.config import Settings, UiConfig
from inspectd.errors import ConfigError
from inspectd.frames import Frame
from inspectd.imageio import encode_png
from inspectd.outputs.archive import Archive, message_entry
from inspectd.outputs.live import KEEPALIVE_S, LiveView, Seen
from inspectd.outputs.recent import ArchiveDefects, MemoryDefects
from inspectd.outputs.ui import BOUNDARY, UiApp, _loopback_host, collect_frame
from inspectd.outputs.wire import encode_message, unsent_header
from inspectd.pipeline.postprocess import InspectOptions
from inspectd.security import hash_password
from inspectd.service.web import WebServer, web_security

OPTS = InspectOptions(threshold=0.5)


def _frame(camera: str, seq: int, width: int = 160, height: int = 120) -> Frame:
    image = np.full((height, width, 3), (seq * 37) % 256, np.uint8)
    cv2.circle(image, (width // 2, height // 2), 10, (255, 0, 0), -1)
    return Frame(camera, seq, time.time(), time.monotonic(), image)


def _logits(hot: bool) -> np.ndarray:
    cam = np.full((6, 8), -4.0, np.float32)
    if hot:
        cam[2:4, 3:5] = 6.0
    return cam


class Feeder:
    """Offers a new result of each camera every `period` s, as the inference thread would."""

    def __init__(self, live: LiveView, cameras=("cam-a", "cam-b"), period: float = 0.02):
        self.live, self.cameras, self.period = live, cameras, period
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        seq = 0
        while not self.stop.wait(self.period):
            seq += 1
            for cam in self.cameras:
                self.live.offer(_frame(cam, seq), 0.9 if seq % 2 else 0.1, _logits(seq % 2 == 1), OPTS)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.fixture()
def live():
    view = LiveView(max_fps=4, width=120).start()
    for camera in ("cam-a", "cam-b"):
        view.add(camera)
    yield view
    view.stop()


# -- the render thread ----------------------------------------------------------------------------------


def test_nothing_is_drawn_while_nobody_watches(live):
    def offered() -> int:
        seen = live.latest("cam-a")
        return seen.frame.seq if seen is not None else 0

    with Feeder(live):
        wait_until(lambda: offered() > 20, 10, "offers")
        assert live.renders == 0  # 20+ results of two cameras offered, none drawn
        stream = live.stream("cam-a")
        first = next(stream)  # a placeholder, or the first picture
        wait_until(lambda: live.renders >= 2, 5, "a picture of the watched camera")
        stream.close()
        assert first[:2] == b"\xff\xd8" and live.viewers() == 0
        drawn, since = live.renders, offered()
        wait_until(lambda: offered() >= since + 20, 10, "20 more results offered")
    # After the viewer left, nothing more was drawn (one render may have been under way as it left).
    assert live.renders <= drawn + 1


def test_a_stream_gets_each_new_picture_once_at_most_max_fps(live):
    with Feeder(live, period=0.01):  # 100 results a second
        stream = live.stream("cam-a")
        next(stream)
        start, pictures = time.monotonic(), []
        while time.monotonic() - start < 3.0:
            pictures.append(next(stream))
        stream.close()
    rate = len(pictures) / 3.0
    # At most max_fps; at least one a second even on a loaded machine (the render thread runs at nice 10).
    assert 1.0 <= rate <= live.max_fps + 0.5, rate
    decoded = cv2.imdecode(np.frombuffer(pictures[-1], np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape[1] == 120  # scaled to [ui] width


def test_pictures_slow_down_while_inspection_is_saturated():
    saturated = threading.Event()
    view = LiveView(max_fps=8, width=120, saturated=saturated.is_set).start()
    view.add("cam-a")
    try:
        with Feeder(view, cameras=("cam-a",), period=0.01):
            stream = view.stream("cam-a")
            next(stream)
            counts = {}
            for state in (False, True):
                saturated.set() if state else saturated.clear()
                next(stream)  # the period changes after the picture being waited for
                start, n = time.monotonic(), 0
                while time.monotonic() - start < 3.0:
                    next(stream)
                    n += 1
                counts[state] = n / (time.monotonic() - start)
            stream.close()
    finally:
        view.stop()
    assert counts[True] <= 1.5 and counts[False] >= 2 * counts[True], counts


def test_a_quiet_camera_repeats_its_last_picture_as_a_keepalive(live):
    live.offer(_frame("cam-a", 1), 0.9, _logits(True), OPTS)
    stream = live.stream("cam-a")
    next(stream)  # the generator starts watching at its first picture (a placeholder, or the one drawn)
    wait_until(lambda: live.renders == 1, 5, "the one picture")
    a = next(stream) if live.renders == 1 else None
    t0 = time.monotonic()
    b = next(stream)
    stream.close()
    assert time.monotonic() - t0 >= KEEPALIVE_S * 0.9 and a == b
    assert live.renders == 1  # the same picture sent again, not drawn again


def test_a_removed_camera_ends_its_streams_and_late_results_are_ignored(live):
    live.offer(_frame("cam-a", 1), 0.9, _logits(True), OPTS)
    stream = live.stream("cam-a")
    next(stream)
    ended = threading.Event()
    threading.Thread(target=lambda: (list(stream), ended.set()), daemon=True).start()
    live.forget("cam-a")
    wait_until(ended.is_set, 5, "the stream of the removed camera to end")
    assert live.latest("cam-a") is None and live.viewers() == 0
    live.offer(_frame("cam-a", 2), 0.9, _logits(True), OPTS)  # its last frame, out of the model after removal
    assert live.latest("cam-a") is None and live.shown("cam-a") is None


def test_very_negative_logits_are_drawn_blue_not_red():
    """The map's colours come from a lookup on clipped logits: -20 (a confident 'ok') must be as blue as -8."""
    from inspectd.outputs.live import render

    frame = Frame("cam-a", 1, time.time(), time.monotonic(), np.full((120, 160, 3), 128, np.uint8))
    pictures = {}
    for logit in (-20.0, -8.0, 8.0, 20.0):
        jpeg = render(Seen(frame, 0.1, np.full((6, 8), logit, np.float32), OPTS), 160, "probability")
        pictures[logit] = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[60:100, 20:100].mean(axis=(0, 1))
    for cold in (-20.0, -8.0):  # BGR: blue over red
        assert pictures[cold][0] > pictures[cold][2] + 30, pictures
    for hot in (8.0, 20.0):
        assert pictures[hot][2] > pictures[hot][0] + 30, pictures


def test_live_regions_skip_components_smaller_than_min_region_px():
    from inspectd.outputs.live import render

    frame = Frame("cam-a", 1, time.time(), time.monotonic(), np.full((120, 160, 3), 128, np.uint8))
    cam = np.full((6, 8), -6.0, np.float32)
    cam[1, 1] = 6.0  # one hot CAM cell: about 20 x 20 pixels above the threshold at 160 x 120
    pictures = {}
    for min_px in (1, 5000):
        jpeg = render(Seen(frame, 0.9, cam, InspectOptions(threshold=0.5, min_region_px=min_px)), 160)
        pictures[min_px] = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).astype(int)
    # The same picture but for the hot cell's contour and box, drawn only when the region is big enough.
    changed = np.abs(pictures[1] - pictures[5000]).sum(axis=2) > 150
    assert changed[15:50, 10:50].sum() > 40 and changed[50:, 60:].sum() == 0


# -- recent defects ------------------------------------------------------------------------------------


def _defect_message(camera: str, seq: int, frame_seq: int, captured_at: float, mask: np.ndarray, **extra) -> list[bytes]:
    body = {
        "camera": camera,
        "frame_seq": frame_seq,
        "captured_at": "2026-11-27T10:00:00.000000Z",
        "score": 0.9,
        "threshold": 0.5,
        "is_defect": True,
        "regions": [{"bbox": [10, 10, 20, 20], "area_px": 400, "peak": 1.0, "mean": 0.9}],
        "frame": {"width": 160, "height": 120},
        "attachments": [{"kind": "mask", "encoding": "png", "width": 160, "height": 120}],
    }
    from inspectd.outputs.wire import rfc3339

    body["captured_at"] = rfc3339(captured_at)
    body.update(extra)
    return encode_message(f"defect.{camera}", "run1", seq, body, [encode_png(mask)])


def test_the_memory_ring_keeps_the_newest_within_its_limits():
    ring = MemoryDefects(limit=3, max_bytes=10_000_000, prefix="run1")
    mask = np.zeros((120, 160), np.uint8)
    for i in range(5):
        parts = _defect_message("cam-a" if i % 2 else "cam-b", i + 1, i + 1, time.time(), mask)
        ring.add(parts[1], parts[2:], _frame("cam-a", i).image)
    assert [r.header["seq"] for r in ring.recent()] == [5, 4, 3]
    assert [r.header["seq"] for r in ring.recent("cam-a")] == [4]
    assert ring.get(ring.recent()[0].id).files["mask.png"] == parts[2]
    # Ids carry the run: a restarted daemon's events never take the ids (and cached pictures) of the last run's.
    assert ring.recent()[0].id == "run1-5" and MemoryDefects(prefix="run2").prefix != ring.prefix
    small = MemoryDefects(limit=100, max_bytes=1_000_000)
    big = np.zeros((480, 640, 3), np.uint8)  # 0.9 MB each: only the newest fits, and it is always kept
    for i in range(3):
        parts = _defect_message("cam-a", i + 1, i + 1, time.time(), mask)
        small.add(parts[1], parts[2:], big)
    assert [r.header["seq"] for r in small.recent()] == [3]


def test_an_unsent_defect_is_listed_with_seq_null():
    ring = MemoryDefects()
    header = unsent_header("defect.cam-a", "run1", {"camera": "cam-a", "frame_seq": 7, "captured_at": "x", "attachments": []})
    ring.add(header, [], None)
    (record,) = ring.recent()
    assert record.summary()["seq"] is None and record.summary()["frame_seq"] == 7


def test_the_archive_lists_its_newest_defects_not_its_ok_samples(tmp_path):
    archive = Archive(tmp_path / "archive").start()
    try:
        mask = np.zeros((120, 160), np.uint8)
        now = time.time()
        for i in range(6):
            parts = _defect_message("cam-a" if i < 4 else "cam/b", i + 1, i + 1, now + i, mask)
            archive.submit(
                message_entry(parts[1], parts[2:], (("frame.jpg", cv2.imencode(".jpg", _frame("x", 1).image)[1].tobytes()),))
            )
        ok = unsent_header(
            "result.cam-a",
            "run1",
            {"camera": "cam-a", "frame_seq": 99, "captured_at": "2099-01-01T00:00:00.000000Z", "attachments": []},
        )
        archive.submit(message_entry(ok, []))  # the newest entry of all, an ok sample: never listed
        wait_until(lambda: len(archive.index) == 7, 10, "entries written")
    finally:
        archive.stop()
    log = ArchiveDefects(archive)
    assert [r.header["frame_seq"] for r in log.recent(limit=3)] == [6, 5, 4]
    assert [r.header["frame_seq"] for r in log.recent("cam-a")] == [4, 3, 2, 1]
    assert [r.header["frame_seq"] for r in log.recent("cam/b")] == [6, 5]
    record = log.get(log.recent(limit=1)[0].id)
    assert set(record.files) == {"mask.png", "frame.jpg"} and record.header["seq"] == 6
    for bad in ("../../etc/passwd", "cam-a/../../x", "/etc", "cam-a", ""):
        assert log.get(bad) is None


def test_the_archive_index_keeps_defects_apart_from_ok_samples_through_retention(tmp_path):
    from inspectd.outputs.archive import RetentionIndex

    index = RetentionIndex()
    for i in range(10_000):  # mostly sampled ok frames: a listing must not look at them
        camera = "cam-a" if i % 2 else "cam-b"
        topic = f"defect.{camera}" if i % 1000 == 999 else f"result.{camera}"
        index.add(float(i), tmp_path / camera / "2026-11-27" / f"e{i}", 10, None, topic)
    assert [int(p.name[1:]) for _, p in index.newest_defects(3)] == [9999, 8999, 7999]
    assert [int(p.name[1:]) for _, p in index.newest_defects(20, "cam-a")] == list(range(9999, 0, -1000))
    assert index.newest_defects(5, "cam-b") == [] and index.newest_defects(5, "nope") == []
    index.expire(max_bytes=0, max_age_s=5000.5, now=10_000.0)  # entries before t = 4999.5 go
    assert [int(p.name[1:]) for _, p in index.newest_defects(20)] == [9999, 8999, 7999, 6999, 5999]


# -- the HTTP app on a real server ---------------------------------------------------------------------------


class View:
    def __init__(self, live: LiveView, tmp_path: Path, users: dict | None = None, collect: bool = True):
        self.ring = MemoryDefects()
        self.cameras = ["cam-a", "cam-b"]
        cfg = UiConfig(enabled=True, port=0, basic_auth_users=users or {})
        web = web_security(cfg, "ui")
        self.collect_dir = tmp_path / "collected"
        self.app = UiApp(live, self.ring, self.state, self.collect_dir if collect else None, auth=bool(users))
        self.server = WebServer(self.app, "127.0.0.1", 0, web, section="ui", what="the live view", name="ui-http")
        self.server.start()

    def state(self) -> dict:
        return {
            "cameras": [
                {"id": c, "state": "up", "detail": "", "inspected": 10, "dropped": 1, "reconnects": 0} for c in self.cameras
            ]
        }

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()


@pytest.fixture()
def view(live, tmp_path):
    v = View(live, tmp_path)
    yield v
    v.server.stop()


def read_mjpeg(response: http.client.HTTPResponse, seconds: float) -> list[bytes]:
    """Parse multipart/x-mixed-replace as a plain client would: boundary line, headers, Content-Length bytes."""
    pictures, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = response.fp.readline()
        if not line:
            break
        if line.strip() == b"":
            continue
        assert line.rstrip(b"\r\n") == f"--{BOUNDARY}".encode(), line
        headers = {}
        for header in iter(response.fp.readline, b"\r\n"):
            name, _, value = header.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        assert headers["content-type"] == "image/jpeg"
        data = response.fp.read(int(headers["content-length"]))
        assert response.fp.read(2) == b"\r\n"
        pictures.append(data)
    return pictures


def test_mjpeg_endpoint_boundaries_decodable_frames_and_rate_cap(view, live):
    with Feeder(live, period=0.01):
        conn = http.client.HTTPConnection("127.0.0.1", view.server.port, timeout=10)
        conn.request("GET", "/stream?camera=cam-a")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == f"multipart/x-mixed-replace; boundary={BOUNDARY}"
        pictures = read_mjpeg(response, 4.0)
        response.close()  # the response holds the socket open, not the connection
        conn.close()
    assert 4 <= len(pictures) <= 4 * live.max_fps + 2, len(pictures)
    for data in pictures:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[1] in (120, 320)  # a picture, or the first placeholder
    assert len(set(pictures[1:])) >= len(pictures[1:]) - 1  # new pictures, not one repeated
    wait_until(lambda: live.viewers() == 0, 15, "the stream's viewer gone after the client closed")


def test_unknown_camera_unknown_page_wrong_method(view):
    assert view.request("GET", "/stream?camera=nope")[0] == 404
    assert view.request("GET", "/snapshot?camera=nope")[0] == 404
    assert view.request("GET", "/etc/passwd")[0] == 404
    status, headers, _ = view.request("GET", "/api/collect")
    assert status == 405 and headers["Allow"] == "POST"
    status, headers, _ = view.request("DELETE", "/")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert view.request("GET", "/api/defect?id=../../x")[0] == 404
    status, headers, body = view.request("GET", "/favicon.ico")
    assert status == 204 and body == b""


def test_head_answers_headers_only_and_opens_no_stream(view, live):
    status, headers, body = view.request("HEAD", "/")
    assert status == 200 and int(headers["Content-Length"]) > 100 and body == b""
    status, headers, body = view.request("HEAD", "/stream?camera=cam-a")
    assert status == 200 and headers["Content-Type"].startswith("multipart/x-mixed-replace") and body == b""
    assert live.viewers() == 0


def test_a_snapshot_is_one_picture_and_keeps_the_camera_drawn_for_a_while(view, live):
    with Feeder(live):
        status, headers, first = view.request("GET", "/snapshot?camera=cam-b")  # the placeholder, and a lease
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        wait_until(lambda: live.renders > 0, 5, "cam-b drawn for its snapshot viewer")
        status, _, picture = view.request("GET", "/snapshot?camera=cam-b")
    image = cv2.imdecode(np.frombuffer(picture, np.uint8), cv2.IMREAD_COLOR)
    assert status == 200 and picture != first and image.shape[1] == 120


def test_the_page_and_its_security_headers(view):
    status, headers, body = view.request("GET", "/")
    assert status == 200 and b"/static/live.js" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
    status, headers, body = view.request("GET", "/static/live.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript") and b"textContent" in body
    status, _, body = view.request("GET", "/api/state")
    state = json.loads(body)
    assert [c["id"] for c in state["cameras"]] == ["cam-a", "cam-b"] and state["collect"] is True


def test_a_foreign_host_name_is_refused_without_auth(view):
    """DNS rebinding: a page of evil.example resolving its name to 127.0.0.1 must not read the view."""
    assert view.request("GET", "/api/state", headers={"Host": "evil.example"})[0] == 403
    assert view.request("GET", "/api/state", headers={"Host": f"localhost:{view.server.port}"})[0] == 200
    assert view.request("GET", "/api/state", headers={"Host": "[::1]:8080"})[0] == 200


@pytest.mark.parametrize(
    "host, ok",
    [
        ("127.0.0.1:8080", True),
        ("localhost", True),
        ("127.1.2.3", True),
        ("[::1]:80", True),
        ("LOCALHOST:1", True),
        ("evil.example", False),
        ("10.0.0.5:8080", False),
        ("", False),
        ("127.0.0.1.evil.example", False),
    ],
)
def test_loopback_host_header(host, ok):
    assert _loopback_host(host) is ok


def test_basic_auth_in_front_of_every_path(live, tmp_path):
    users = {"operator": hash_password("s3cret", rounds=4)}
    v = View(live, tmp_path, users=users)
    try:
        for path in ("/", "/api/state", "/stream?camera=cam-a", "/defect/frame?id=m1"):
            assert v.request("GET", path)[0] == 401
        token = base64.b64encode(b"operator:s3cret").decode()
        # With auth any Host is allowed (the view is meant to be reached by name then).
        assert v.request("GET", "/api/state", headers={"Authorization": f"Basic {token}", "Host": "line3-pc"})[0] == 200
        wrong = base64.b64encode(b"operator:nope").decode()
        assert v.request("GET", "/api/state", headers={"Authorization": f"Basic {wrong}"})[0] == 401
    finally:
        v.server.stop()


def test_recent_defects_over_http(view):
    mask = np.zeros((120, 160), np.uint8)
    mask[10:30, 10:30] = 255
    for i in range(3):
        parts = _defect_message("cam-a", i + 1, i + 1, time.time(), mask)
        view.ring.add(parts[1], parts[2:], _frame("cam-a", i + 1).image)
    status, _, body = view.request("GET", "/api/defects?camera=cam-a&limit=2")
    listed = json.loads(body)["defects"]
    assert status == 200 and [d["seq"] for d in listed] == [3, 2]
    record_id = listed[0]["id"]
    status, _, header = view.request("GET", f"/api/defect?id={record_id}")
    assert json.loads(header)["schema"] == "inspectd.event/1" and json.loads(header)["seq"] == 3
    for name, shape in (("frame", (120, 160, 3)), ("overlay", (120, 160, 3)), ("mask", (120, 160))):
        status, headers, data = view.request("GET", f"/defect/{name}?id={record_id}")
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert status == 200 and image.shape == shape, (name, status, headers)
    assert view.request("GET", f"/defect/thumb?id={record_id}")[0] == 200
    assert view.request("GET", "/defect/frame?id=m-999")[0] == 404


def test_a_defect_overlay_in_either_map(view):
    """[ui] map is relative (the default): /api/state says so, and a defect's overlay shows its map relative to the
    event's mask threshold; `map=probability` gives the calibrated map, one click away in the detail view. The patch
    at probability 0.78 is under the event's mask threshold 0.9: orange-red as a probability, blue-green (outside
    the mask) as a relative map."""
    assert json.loads(view.request("GET", "/api/state")[2])["map"] == "relative"
    mask = np.zeros((120, 160), np.uint8)
    mask[20:100, 20:140] = 200
    parts = _defect_message("cam-a", 1, 1, time.time(), mask, mask_threshold=0.9)
    view.ring.add(parts[1], parts[2:], np.full((120, 160, 3), 128, np.uint8))
    record_id = view.ring.recent()[0].id
    pictures = {}
    for query in ("", "&map=relative", "&map=probability"):
        status, _, data = view.request("GET", f"/defect/overlay?id={record_id}{query}")
        assert status == 200, query
        pictures[query] = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[50:70, 50:110].mean(axis=(0, 1))
    blue, red = 0, 2  # BGR
    assert pictures["&map=probability"][red] > pictures["&map=probability"][blue] + 40, pictures
    for relative in ("", "&map=relative"):
        assert pictures[relative][blue] > pictures[relative][red] + 20, pictures
    assert view.request("GET", f"/defect/overlay?id={record_id}&map=jet")[0] == 400


# -- collection ---------------------------------------------------------------------------------------


def _collect(view, camera: str, label: str, header: bool = True):
    headers = {"Content-Type": "application/json", **({"X-Inspectd-Collect": "1"} if header else {})}
    return view.request("POST", "/api/collect", json.dumps({"camera": camera, "label": label}).encode(), headers)


def test_collection_saves_the_frame_on_screen(view, live):
    assert _collect(view, "cam-a", "ok")[0] == 409  # nothing inspected yet
    frame = _frame("cam-a", 41)
    live.offer(frame, 0.2, _logits(False), OPTS)
    stream = live.stream("cam-a")  # a viewer: frame 41 is drawn, and is what the operator sees...
    next(stream)
    wait_until(lambda: live.renders == 1, 5, "frame 41 drawn")
    stream.close()  # the viewer leaves, picture 41 stays on its screen...
    live.offer(_frame("cam-a", 42), 0.2, _logits(False), OPTS)  # ...and a newer frame, never drawn, arrives
    status, _, body = _collect(view, "cam-a", "ok")
    saved = view.collect_dir / json.loads(body)["saved"]
    assert status == 200 and saved.parent.name == "ok" and saved.name.endswith("_41.png")
    assert np.array_equal(cv2.cvtColor(cv2.imread(str(saved)), cv2.COLOR_BGR2RGB), frame.image)  # lossless
    assert [p.name for p in (view.collect_dir / "ok").iterdir()] == [saved.name]  # no temporary left


@pytest.mark.parametrize(
    "camera, label, header, status",
    [
        ("cam-a", "ok", False, 403),  # no custom header: a form or a page of another site
        ("cam-a", "maybe", True, 400),
        ("nope", "ok", True, 404),
        ("../../etc", "defect", True, 404),
    ],
)
def test_collection_refuses(view, live, camera, label, header, status):
    live.offer(_frame("cam-a", 1), 0.2, _logits(False), OPTS)
    assert _collect(view, camera, label, header)[0] == status
    assert not view.collect_dir.exists()


def test_a_collect_body_shorter_than_its_length_is_a_quick_400_not_a_traceback(view, live, caplog):
    """A client announces 100 bytes, sends 10 and waits: it used to hold a thread 10 s and log an ERROR
    traceback. The read gives up after 2 s and the client gets one line; nothing is saved or logged as an error."""
    import socket

    live.offer(_frame("cam-a", 1), 0.2, _logits(False), OPTS)
    with socket.create_connection(("127.0.0.1", view.server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/collect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Inspectd-Collect: 1\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"camera":'
        )
        start = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
        took = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), answer
    assert took < 8, took  # generous: the read's limit is 2 s, the old behaviour 10 s
    assert not view.collect_dir.exists()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def _collect_defect(view, record_id: str, header: bool = True):
    headers = {"Content-Type": "application/json", **({"X-Inspectd-Collect": "1"} if header else {})}
    return view.request("POST", "/api/collect-defect", json.dumps({"id": record_id}).encode(), headers)


def test_a_recent_defect_is_saved_with_its_regions_as_the_mask(view):
    """The operator accepts a defect's region: its frame lands in defect/ and the published regions in masks/
    under the same name, which `inspectd train` reads as a defect with a mask (mask supervision)."""
    from inspectd.toolkit.dataset import scan

    regions = np.zeros((120, 160), np.uint8)
    regions[30:50, 40:90] = 255
    frame = _frame("cam-a", 7).image
    specs = [{"kind": kind, "encoding": "png", "width": 160, "height": 120} for kind in ("mask", "regions")]
    parts = _defect_message("cam-a", 3, 7, time.time(), np.full((120, 160), 200, np.uint8), attachments=specs)
    view.ring.add(parts[1], [*parts[2:], encode_png(regions)], frame)
    record = view.ring.recent()[0]
    assert "regions.png" in record.files
    status, _, body = _collect_defect(view, record.id)
    assert status == 200, body
    saved = json.loads(body)
    image = cv2.cvtColor(cv2.imread(str(view.collect_dir / saved["saved"])), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(str(view.collect_dir / saved["mask"]), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(image, frame) and np.array_equal(mask, regions)
    (ok := view.collect_dir / "ok").mkdir()
    cv2.imwrite(str(ok / "good.png"), frame)
    (item,) = [it for it in scan(view.collect_dir).items if it.label == 1]
    assert item.mask == view.collect_dir / saved["mask"]
    assert not [p for p in view.collect_dir.rglob(".*")]  # no temporary left


def _painted(mask: np.ndarray, data_url: bool = True) -> str:
    """A mask as the page sends its canvas: painted pixels opaque red, the rest transparent black (RGBA PNG)."""
    import base64

    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask > 0] = (0, 0, 255, 255)  # BGRA for OpenCV: red
    text = base64.b64encode(cv2.imencode(".png", rgba)[1].tobytes()).decode()
    return "data:image/png;base64," + text if data_url else text


def _save_painted(view, record_id: str, mask) -> tuple:
    body = json.dumps({"id": record_id, "mask": mask}).encode()
    return view.request("POST", "/api/collect-defect", body, {"Content-Type": "application/json", "X-Inspectd-Collect": "1"})


def _recent_defect(view, seq: int, regions: bool = True):
    frame = _frame("cam-a", seq).image
    kinds = ("mask", "regions") if regions else ("mask",)
    specs = [{"kind": kind, "encoding": "png", "width": 160, "height": 120} for kind in kinds]
    parts = _defect_message("cam-a", seq, seq, time.time(), np.full((120, 160), 200, np.uint8), attachments=specs)
    published = np.zeros((120, 160), np.uint8)
    published[30:50, 40:90] = 255
    view.ring.add(parts[1], [*parts[2:], *([encode_png(published)] if regions else [])], frame)
    return view.ring.recent()[0], frame


@pytest.mark.parametrize("data_url", [True, False])
def test_a_painted_mask_is_saved_instead_of_the_regions(view, data_url):
    """The operator paints the mask in the detail view (the page's canvas, sent as a PNG): it is saved as the
    defect's mask, 255 where painted and 0 elsewhere, whatever the published regions were; also for an event
    with no regions at all (a defect the model found but did not outline)."""
    for seq, regions in ((11, True), (12, False)):
        record, frame = _recent_defect(view, seq, regions)
        painted = np.zeros((120, 160), np.uint8)
        painted[70:100, 10:30] = 1  # elsewhere than the published regions
        status, _, body = _save_painted(view, record.id, _painted(painted, data_url))
        assert status == 200, body
        saved = json.loads(body)
        mask = cv2.imread(str(view.collect_dir / saved["mask"]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask, np.where(painted > 0, 255, 0).astype(np.uint8))
        image = cv2.cvtColor(cv2.imread(str(view.collect_dir / saved["saved"])), cv2.COLOR_BGR2RGB)
        assert np.array_equal(image, frame)


def _png_declaring(width: int, height: int) -> str:
    """A PNG's signature and header chunk declaring width x height, and nothing else."""
    import base64
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk).decode()


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (lambda: _painted(np.zeros((120, 160), np.uint8)), "the painted mask is empty: paint the defect, or save the regions"),
        (lambda: _painted(np.ones((60, 80), np.uint8)), "the painted mask is 80x60; the frame is 160x120"),
        (lambda: "data:image/jpeg;base64,AAAA", "mask: a PNG expected (data:image/png;base64,...)"),
        (lambda: "not base64!", "mask: not base64"),
        (lambda: "aGVsbG8=", "mask: not a PNG image"),
        (lambda: 7, "mask: a base64 PNG expected"),
        (lambda: _png_declaring(100_000, 100_000), "mask: 100000x100000 is larger than any frame the daemon keeps"),
    ],
)
def test_a_bad_painted_mask_is_a_400_that_saves_nothing(view, mask, message):
    record, _ = _recent_defect(view, 13)
    status, _, body = _save_painted(view, record.id, mask())
    assert (status, body.decode().strip()) == (400, message)
    assert not view.collect_dir.exists()


def _announce(view, path: str, length: int, body: bytes = b"") -> tuple[int, str]:
    """A POST that announces `length` bytes and sends only `body` (the headers, then the answer is read)."""
    conn = http.client.HTTPConnection("127.0.0.1", view.server.port, timeout=10)
    conn.putrequest("POST", path)
    for name, value in (("Content-Type", "application/json"), ("X-Inspectd-Collect", "1"), ("Content-Length", str(length))):
        conn.putheader(name, value)
    conn.endheaders(body or None)
    response = conn.getresponse()
    return response.status, response.read().decode().strip()


def test_a_body_over_the_limit_is_refused_before_it_is_read(view):
    """A painted mask may take 8 MiB, any other collection request 4096 bytes; beyond, 413 at once, from the
    announced length (nothing of the body is read)."""
    assert _announce(view, "/api/collect-defect", 9_000_000) == (413, "the body is 9000000 bytes; at most 8388608")
    assert _announce(view, "/api/collect", 5000) == (413, "the body is 5000 bytes; at most 4096")
    record, _ = _recent_defect(view, 14)
    small = json.dumps({"id": record.id}).encode()  # under both limits: saved with its regions
    assert _announce(view, "/api/collect-defect", len(small), small)[0] == 200
    assert len(list((view.collect_dir / "masks").iterdir())) == 1


def test_a_defect_without_regions_or_frame_is_not_saved(view):
    parts = _defect_message("cam-a", 4, 8, time.time(), np.zeros((120, 160), np.uint8))
    view.ring.add(parts[1], parts[2:], _frame("cam-a", 8).image)  # no regions attachment
    record = view.ring.recent()[0]
    status, _, body = _collect_defect(view, record.id)
    assert status == 409 and b"no regions attachment" in body
    assert _collect_defect(view, "run1-999")[0] == 404
    assert _collect_defect(view, record.id, header=False)[0] == 403
    assert view.request("POST", "/api/collect-defect", b"[1]", {"X-Inspectd-Collect": "1"})[0] == 400
    assert not view.collect_dir.exists()


def test_collection_is_absent_unless_configured(live, tmp_path):
    v = View(live, tmp_path, collect=False)
    try:
        live.offer(_frame("cam-a", 1), 0.2, _logits(False), OPTS)
        assert _collect(v, "cam-a", "ok")[0] == 404
        assert json.loads(v.request("GET", "/api/state")[2])["collect"] is False
    finally:
        v.server.stop()


def test_collected_file_names_are_safe(tmp_path):
    path = collect_frame(tmp_path, Seen(_frame("a/../../b", 3), 0.1, _logits(False), OPTS), "defect")
    assert path.parent == tmp_path / "defect" and "/" not in path.name and ".." not in path.name


# -- configuration --------------------------------------------------------------------------------------


def test_ui_off_loopback_needs_users():
    with pytest.raises(ValueError, match="ui.host '0.0.0.0' is reachable from the network"):
        UiConfig(enabled=True, host="0.0.0.0")
    UiConfig(enabled=False, host="0.0.0.0")  # off: nothing is bound
    UiConfig(enabled=True, host="0.0.0.0", basic_auth_users={"op": hash_password("x", rounds=4)})


def test_ui_section_loads_from_toml_with_relative_collect_dir(tmp_path):
    from inspectd.config import load_settings

    path = tmp_path / "c.toml"
    path.write_text('[ui]\nenabled = true\ncollect_dir = "dataset"\nmax_fps = 2\n[[cameras]]\nid = "a"\nurl = "synthetic://"\n')
    settings = load_settings(path)
    assert settings.ui.collect_dir == str(tmp_path / "dataset") and settings.ui.max_fps == 2
    path.write_text('[ui]\nenabled = true\nhost = "0.0.0.0"\n[[cameras]]\nid = "a"\nurl = "synthetic://"\n')
    with pytest.raises(ConfigError, match="ui.basic_auth_users"):
        load_settings(path)
    assert Settings().ui.enabled is False


def test_a_ui_port_in_use_names_ui_port(live):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError) as exc:
            WebServer(lambda e, r: [], "127.0.0.1", port, None, section="ui", what="the live view")
    assert str(exc.value) == f"ui.port: cannot bind 127.0.0.1:{port} for the live view: Address already in use"


def test_the_render_thread_has_its_name_at_the_os_level(live):
    """top -H, ps -L and /proc show `live-render` (the benchmark counts the view's CPU by these names)."""
    comm = Path(f"/proc/self/task/{live._thread.native_id}/comm")
    wait_until(lambda: comm.read_text().strip() == "live-render", 5, lambda: f"the name, not {comm.read_text()!r}")
