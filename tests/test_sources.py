"""Sources on their own: synthetic, folder, video file (OpenCV and GStreamer), pipelines, the kind table."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from support import read_n

from inspectd.config import CameraConfig
from inspectd.imageio import write_png
from inspectd.sources import DecodeError, EndOfStream, SourceError, open_source, redact, source_kind
from inspectd.sources.base import Pacer, query_params
from inspectd.sources.folder import FolderSource
from inspectd.sources.gstreamer import GstSource, pipeline_for
from inspectd.sources.opencv import OpenCVSource
from inspectd.sources.synthetic import SyntheticSource


def cam(url: str | None = None, **kw) -> CameraConfig:
    return CameraConfig(id="cam", url=url, **kw)


class FakeClock:
    """A monotonic clock that only moves when slept on: pacing measured exactly, whatever the machine's load."""

    def __init__(self):
        self.now = 1000.0
        self.slept = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


@pytest.fixture
def fake_clock(monkeypatch) -> FakeClock:
    """Every source built in the test paces on a FakeClock (its Pacer is given the fake clock and sleep)."""
    from inspectd.sources import folder, opencv, synthetic

    clock = FakeClock()
    for module in (folder, opencv, synthetic):
        monkeypatch.setattr(module, "Pacer", lambda fps: Pacer(fps, clock=clock.monotonic, sleep=clock.sleep))
    return clock


# ----------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "url, expected",
    [
        ("rtsp://user:pass@host/stream", "rtsp://user:***@host/stream"),
        ("rtsps://admin:p@ss:w0rd@10.0.0.5:322/ch1?x=1", "rtsps://admin:***@10.0.0.5:322/ch1?x=1"),
        ("rtsp://host/stream", "rtsp://host/stream"),
        ("rtsp://user@host/stream", "rtsp://user@host/stream"),
        ("open rtsp://a:b@h1/x failed; rtsp://c:d@h2/y", "open rtsp://a:***@h1/x failed; rtsp://c:***@h2/y"),
        ("/videos/line1.avi", "/videos/line1.avi"),
    ],
)
def test_redact(url, expected):
    assert redact(url) == expected


def test_query_params_convert_and_reject_unknown():
    assert query_params("synthetic://?fps=2.5&seed=3", {"fps": 1.0, "seed": 0, "x": True}) == {"fps": 2.5, "seed": 3, "x": True}
    with pytest.raises(SourceError, match="unknown parameter.*fsp.*allowed: fps"):
        query_params("dir:///x?fsp=2", {"fps": 5.0})
    with pytest.raises(SourceError, match="seed='x' is not a valid int"):
        query_params("synthetic://?seed=x", {"seed": 0})


def test_pacer_keeps_its_grid_and_never_bursts():
    now = [100.0]
    pacer = Pacer(fps=10, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert pacer.wait(1.0)  # the first frame is due at once
    assert pacer.wait(1.0) and now[0] == pytest.approx(100.1)  # slept until due
    assert not pacer.wait(0.03) and now[0] == pytest.approx(100.13)  # timeout first: not yet
    assert pacer.wait(1.0) and now[0] == pytest.approx(100.2)
    now[0] = 105.0  # consumer was away 5 s: one frame now, the next a full period later
    assert pacer.wait(0.0)
    assert not pacer.wait(0.0)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_frames_are_rgb_of_the_set_size_and_paced(fake_clock):
    src = SyntheticSource(cam("synthetic://?fps=20&width=160&height=120&seed=1"))
    src.open()
    frames = read_n(src, 11)
    assert all(f.shape == (120, 160, 3) and f.dtype == np.uint8 for f in frames)
    assert np.array_equal(frames[0][..., 0], frames[0][..., 2])  # grey replicated
    assert fake_clock.slept == pytest.approx(10 * 0.05)  # the first at once, then 10 periods of 50 ms
    assert src.period_s == pytest.approx(0.05)
    src.close()


def test_synthetic_pacing_waits_in_real_time():
    src = SyntheticSource(cam("synthetic://?fps=20&width=32&height=24&seed=1"))
    src.open()
    start = time.monotonic()
    read_n(src, 5)
    assert time.monotonic() - start >= 4 * 0.05 - 0.01  # it really waits (the fake clock above measures the rate)
    src.close()


def test_synthetic_is_deterministic_for_a_seed_and_exposes_the_mask():
    def first(url, n=3):
        src = SyntheticSource(cam(url))
        src.open()
        frames = read_n(src, n)
        return frames, src

    a, src_a = first("synthetic://?fps=1000&width=64&height=48&seed=7&defect_rate=1")
    b, _ = first("synthetic://?fps=1000&width=64&height=48&seed=7&defect_rate=1")
    c, _ = first("synthetic://?fps=1000&width=64&height=48&seed=8&defect_rate=1")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert src_a.last_mask.shape == (48, 64) and src_a.last_mask.max() == 255
    assert np.array_equal(src_a.last_mask, src_a.sample(2).mask)  # frame k can be rendered again


def test_synthetic_repeat_and_defect_rate():
    src = SyntheticSource(cam("synthetic://?fps=1000&width=64&height=48&seed=2&repeat=1&defect_rate=1"))
    src.open()
    frames = read_n(src, 3)
    assert all(np.array_equal(frames[0], f) for f in frames[1:])
    assert np.array_equal(src.last_mask, src.sample(0).mask) and src.last_mask.any()
    clean = SyntheticSource(cam("synthetic://?fps=1000&width=64&height=48&defect_rate=0"))
    clean.open()
    read_n(clean, 5)
    assert not clean.last_mask.any()


def test_synthetic_rejects_bad_parameters():
    with pytest.raises(SourceError, match="unknown parameter"):
        SyntheticSource(cam("synthetic://?fps=10&colour=red"))
    with pytest.raises(SourceError, match="defect_rate"):
        SyntheticSource(cam("synthetic://?defect_rate=2"))
    with pytest.raises(SourceError, match="fps must be > 0"):
        SyntheticSource(cam("synthetic://?fps=0"))


# ----------------------------------------------------------------------------- folder


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """b.png, a.png, c.jpg (values 20, 10, 30 in the red channel) and a text file to ignore."""
    for name, value in (("b.png", 20), ("a.png", 10), ("c.png", 30)):
        img = np.zeros((24, 32, 3), np.uint8)
        img[..., 0] = value
        write_png(tmp_path / name, img)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def reds(frames) -> list[int]:
    return [int(f[0, 0, 0]) for f in frames]


def test_folder_plays_sorted_and_loops(image_dir):
    src = FolderSource(cam(f"dir://{image_dir}?fps=100"))
    src.open()
    assert reds(read_n(src, 7)) == [10, 20, 30, 10, 20, 30, 10]


def test_folder_without_loop_ends(image_dir):
    src = FolderSource(cam(f"dir://{image_dir}?fps=100", loop=False))
    src.open()
    assert reds(read_n(src, 3)) == [10, 20, 30]
    with pytest.raises(EndOfStream):
        src.read(0.1)


def test_folder_is_paced(image_dir, fake_clock):
    src = FolderSource(cam(f"dir://{image_dir}?fps=10"))
    src.open()
    read_n(src, 4)
    assert fake_clock.slept == pytest.approx(3 * 0.1)


def test_folder_skips_an_unreadable_file(image_dir):
    (image_dir / "b2.png").write_bytes(b"\x89PNG truncated")
    src = FolderSource(cam(f"dir://{image_dir}?fps=100"))
    src.open()
    got = reds(read_n(src, 2))
    with pytest.raises(DecodeError, match="b2.png"):
        read_n(src, 1)
    assert got + reds(read_n(src, 1)) == [10, 20, 30]


def test_folder_missing_or_empty_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="cannot list"):
        FolderSource(cam(f"dir://{tmp_path}/nope")).open()
    with pytest.raises(SourceError, match="no images"):
        FolderSource(cam(f"dir://{tmp_path}")).open()


# ----------------------------------------------------------------------------- video files


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """10 MJPG frames at 20 fps, 160x120; frame i is grey level 20 * (i + 1)."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 20, (160, 120))
    assert writer.isOpened()
    for i in range(10):
        writer.write(np.full((120, 160, 3), 20 * (i + 1), np.uint8))
    writer.release()
    return path


def levels(frames) -> list[int]:
    return [round(float(f.mean()) / 20) for f in frames]


def test_video_file_is_paced_at_its_fps_and_loops(video, fake_clock):
    src = OpenCVSource(cam(str(video)))
    src.open()
    frames = read_n(src, 12)
    assert frames[0].shape == (120, 160, 3) and frames[0].dtype == np.uint8
    assert levels(frames) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]
    # 11 periods of 50 ms (the file's 20 fps), looping included: a camera, not a decoder benchmark.
    assert fake_clock.slept == pytest.approx(11 * 0.05)
    src.close()


def test_video_file_without_loop_ends(video):
    src = OpenCVSource(cam(f"file://{video}", loop=False))
    src.open()
    assert len(read_n(src, 10)) == 10
    with pytest.raises(EndOfStream):
        read_n(src, 1)


def test_missing_video_file_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="no such video file"):
        OpenCVSource(cam(str(tmp_path / "nope.avi"))).open()


def test_video_file_through_gstreamer_loops(video):
    src = GstSource(cam(str(video), backend="gstreamer"))
    src.open()
    try:
        frames = read_n(src, 12)
    finally:
        src.close()
    assert frames[0].shape == (120, 160, 3)
    assert levels(frames[:10]) == list(range(1, 11)) and levels(frames[10:]) == [1, 2]


# ----------------------------------------------------------------------------- GStreamer pipelines


def test_pipeline_without_appsink_gets_one_and_odd_widths_are_unpadded():
    # 162 px * 3 bytes = 486: GStreamer pads RGB rows to 488; the frame must come out 162 wide.
    src = GstSource(
        CameraConfig(id="g", pipeline="videotestsrc is-live=true pattern=white ! video/x-raw,width=162,height=40,framerate=30/1")
    )
    src.open()
    try:
        frame = read_n(src, 2)[-1]
    finally:
        src.close()
    assert frame.shape == (40, 162, 3) and frame.dtype == np.uint8 and frame.min() == 255


@pytest.mark.parametrize(
    "fmt,width", [("BGRx", 30), ("BGR", 30), ("RGB", 30), ("RGB", 32), ("RGBA", 30), ("xRGB", 30), ("ABGR", 30), ("GRAY8", 30)]
)
def test_pipeline_with_its_own_format_is_converted_to_rgb(fmt, width):
    # 30 px wide: 3-byte rows (90 bytes) are padded to 92, so the stride is not the width; 32: RGB unpadded,
    # the buffer's copy itself (read-only: nothing downstream writes into a frame).
    src = GstSource(
        CameraConfig(
            id="g", pipeline=f"videotestsrc pattern=smpte ! video/x-raw,format={fmt},width={width},height=24 ! appsink name=mine"
        )
    )
    src.open()
    try:
        frame = read_n(src, 1)[0]
    finally:
        src.close()
    assert frame.shape == (24, width, 3) and frame.dtype == np.uint8
    assert frame.flags.c_contiguous
    # SMPTE bars, left to right: white-ish, yellow, cyan, green, magenta, red, blue (75 % amplitude).
    bars = [tuple(int(v) for v in frame[2, 2 + width * i // 7]) for i in range(7)]
    if fmt == "GRAY8":
        assert all(r == g == b for r, g, b in bars) and bars[0][0] > bars[-1][0]
    else:
        assert [tuple(v > 128 for v in bar) for bar in bars] == [
            (True, True, True),
            (True, True, False),
            (False, True, True),
            (False, True, False),
            (True, False, True),
            (True, False, False),
            (False, False, True),
        ]


def test_pipeline_errors_are_source_errors():
    with pytest.raises(SourceError, match="no element"):
        GstSource(CameraConfig(id="g", pipeline="nosuchelement ! appsink")).open()
    src = GstSource(CameraConfig(id="g", pipeline="videotestsrc num-buffers=2 ! appsink"))
    src.open()
    try:
        with pytest.raises(SourceError, match="end of stream"):
            read_n(src, 5)
    finally:
        src.close()


def test_missing_pygobject_names_the_extra_and_packages():
    code = (
        "import sys; sys.modules['gi'] = None\n"
        "from inspectd.sources.gstreamer import import_gst\n"
        "try:\n    import_gst()\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.startswith("SourceError") and "inspectd[gstreamer]" in out and "libgirepository1.0-dev" in out


# ----------------------------------------------------------------------------- the kind table


@pytest.mark.parametrize(
    "cfg, kind, cls",
    [
        # auto: GStreamer, whose RTSP elements the test command installs (apt) along with PyGObject (pip)
        (dict(url="rtsp://h/s"), "stream", GstSource),
        (dict(url="rtsp://h/s", backend="opencv"), "stream", OpenCVSource),
        (dict(url="rtsps://h/s"), "stream", OpenCVSource),  # auto: FFmpeg accepts self-signed certificates
        (dict(url="rtsps://u:p@h/s", backend="gstreamer"), "stream", GstSource),
        (dict(url="/videos/a.mp4"), "file", OpenCVSource),
        (dict(url="file:///videos/a.mp4", backend="gstreamer"), "file", GstSource),
        (dict(url="v4l2:///dev/video0"), "device", OpenCVSource),
        (dict(url="dir:///data/imgs?fps=2"), "folder", FolderSource),
        (dict(url="synthetic://?fps=10"), "synthetic", SyntheticSource),
        (dict(pipeline="videotestsrc ! appsink"), "pipeline", GstSource),
    ],
)
def test_open_source_table(cfg, kind, cls):
    c = CameraConfig(id="c", **cfg)
    assert source_kind(c) == kind
    assert type(open_source(c)) is cls


def test_auto_reads_rtsp_with_opencv_when_gstreamer_is_missing():
    code = (
        "import logging, sys; sys.modules['gi'] = None; logging.basicConfig(level=logging.INFO)\n"
        "from inspectd.config import CameraConfig\n"
        "from inspectd.sources import open_source\n"
        "for _ in range(2):\n"
        "    print(type(open_source(CameraConfig(id='c', url='rtsp://h/s'))).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["OpenCVSource", "OpenCVSource"], out.stderr
    said = [line for line in out.stderr.splitlines() if "read with OpenCV" in line]
    assert len(said) == 1 and "inspectd[gstreamer]" in said[0]  # once per process, with the reason


def test_auto_reads_rtsp_with_opencv_when_an_element_is_missing(monkeypatch, caplog):
    from inspectd.sources import gstreamer, registry

    monkeypatch.setitem(gstreamer.RTSP_ELEMENTS, "inspectd_no_such_element", "gstreamer1.0-imaginary")
    registry._decide_stream_backend.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="inspectd.sources"):
            assert type(open_source(CameraConfig(id="c", url="rtsp://h/s"))) is OpenCVSource
        assert "inspectd_no_such_element (gstreamer1.0-imaginary)" in caplog.text
    finally:
        registry._decide_stream_backend.cache_clear()  # the next test decides again, with every element


def test_gstreamer_rtsp_pipeline_uses_tcp_and_the_open_timeout():
    launch, is_file = pipeline_for(CameraConfig(id="c", url="rtsp://u:p@h/s", open_timeout_s=2.5))
    assert not is_file and launch.startswith(
        'rtspsrc location="rtsp://u:p@h/s" latency=0 protocols=tcp tcp-timeout=2500000 ! decodebin'
    )


def test_open_source_plain_directory_is_a_folder(image_dir):
    assert type(open_source(cam(str(image_dir)))) is FolderSource


def test_open_source_rejects_unknown_kinds():
    with pytest.raises(SourceError, match="unsupported URL scheme 'ftp'"):
        open_source(cam("ftp://u:secret@h/x"))
    with pytest.raises(SourceError, match="backend 'opencv' cannot read a pipeline"):
        open_source(CameraConfig(id="c", pipeline="videotestsrc ! appsink", backend="opencv"))
    with pytest.raises(SourceError) as err:
        open_source(cam("ftp://u:secret@h/x"))
    assert "secret" not in str(err.value)


# ----------------------------------------------------------------------------- skipping (fps_limit)


class _CountingCapture:
    """Wraps an open cv2.VideoCapture (a C type: its methods cannot be patched) to count retrieve() calls."""

    def __init__(self, cap):
        self.cap, self.retrieved = cap, 0

    def retrieve(self, *args):
        self.retrieved += 1
        return self.cap.retrieve(*args)

    def __getattr__(self, name):
        return getattr(self.cap, name)


def _read_skipping(src, skip: bool):
    """The first non-None result of read() with skip_before far ahead (skip) or never (not skip)."""
    skip_before = time.monotonic() + 3600 if skip else float("-inf")
    for _ in range(50):
        if (out := src.read(0.2, skip_before)) is not None:
            return out
    raise AssertionError("no frame within 10 s")


@pytest.mark.parametrize("kind", ["synthetic", "folder", "opencv file", "gstreamer pipeline"])
def test_a_frame_before_skip_before_is_skipped_without_conversion(kind, image_dir, video, monkeypatch):
    """A frame over fps_limit comes back SKIPPED, and the source does not make it a picture; the next frame
    read normally is the one after it (a skipped frame is consumed, not kept for later)."""
    from inspectd.sources import folder, gstreamer, synthetic
    from inspectd.sources.base import SKIPPED

    calls = {"n": 0}

    def counting(module, name):
        real = getattr(module, name)

        def spy(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    if kind == "synthetic":
        counting(synthetic, "render")
        src = SyntheticSource(cam("synthetic://?fps=50&width=32&height=24&seed=3"))
    elif kind == "folder":
        counting(folder, "read_rgb")
        src = FolderSource(cam(f"dir://{image_dir}?fps=50"))
    elif kind == "opencv file":
        src = OpenCVSource(cam(str(video)))
    else:
        counting(gstreamer, "_to_rgb")
        src = GstSource(
            CameraConfig(id="g", pipeline="videotestsrc is-live=true ! video/x-raw,width=32,height=24,framerate=50/1")
        )
    src.open()
    try:
        if kind == "opencv file":
            src._cap = _CountingCapture(src._cap)
        assert _read_skipping(src, skip=True) is SKIPPED
        assert _read_skipping(src, skip=True) is SKIPPED
        converted = src._cap.retrieved if kind == "opencv file" else calls["n"]
        assert converted == 0, f"{kind}: {converted} conversion(s) for skipped frames"
        frame = _read_skipping(src, skip=False)
        converted = src._cap.retrieved if kind == "opencv file" else calls["n"]
    finally:
        src.close()
    assert isinstance(frame, np.ndarray) and frame.ndim == 3 and converted == 1
    if kind == "synthetic":  # frame 2: the two skipped ones were consumed
        assert np.array_equal(frame[..., 0], SyntheticSource(cam("synthetic://?seed=3&width=32&height=24")).sample(2).image)
    if kind == "opencv file":
        assert levels([frame]) == [3]
    if kind == "folder":  # a.png and b.png skipped, unread
        assert reds([frame]) == [30]


def test_tensorflow_imported_after_a_gstreamer_camera_does_not_crash():
    """GStreamer initialised before TensorFlow's import crashed the process (SIGSEGV): import_gst imports
    TensorFlow first. In a fresh interpreter, as a tool that opens a camera before loading a model would."""
    code = (
        "from inspectd.sources.gstreamer import import_gst\nimport_gst()\n"
        "import keras, tensorflow\nprint('alive', tensorflow.__version__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "alive" in done.stdout, (done.returncode, done.stderr[-2000:])
