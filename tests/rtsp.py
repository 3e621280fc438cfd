"""A real RTSP camera for tests: GStreamer's RTSP server serving H.264 on 127.0.0.1.

The server runs in its own process (``python tests/rtsp.py --port N ...``), so stopping it
(SIGTERM/SIGKILL) is a clean camera loss, ``freeze()`` (SIGSTOP) is a camera that hangs with its
connections still open, and nothing GLib-related ever runs inside pytest.

>>> with RtspServer(mode="synthetic", seed=3) as cam:      # doctest: +SKIP
...     read_frames(cam.url)                                 # rtsp://127.0.0.1:PORT/cam
...     cam.mask                                             # where the injected defects are
...     cam.restart()                                        # same port, same URL

Modes: ``testsrc`` (videotestsrc's moving ball), ``synthetic`` (one frame rendered by
``inspectd.synth`` with defects, pushed through ``appsrc`` at the set fps, so an end-to-end test
can check that detected regions fall on ``cam.mask``) and ``counter`` (frame n is flat grey at
``counter_frame(n)``, so that ``counter_match`` tells whether a frame received is one sent, whole).
``slices=N`` makes x264 send N slices per frame, as many IP cameras do; ``tcp_only=True`` offers
RTP over the RTSP connection only (so that a TCP proxy sees the media, see tcp_proxy.py);
``alt_size=(w, h)`` lets ``switch_size()`` change the resolution mid-stream (appsrc modes);
``auth=(user, password)`` makes the camera ask for HTTP Basic credentials (``url_with(user, password)``
gives the URL that carries them, percent-encoded).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from support import dies_with_tests, free_port, wait_until  # re-exported: tests import them from here too

__all__ = [
    "RtspServer",
    "COUNTER_LEVELS",
    "counter_frame",
    "counter_match",
    "counter_received",
    "free_port",
    "read_frames",
    "synthetic_frame",
    "h264_encoder",
    "wait_until",
]

MOUNT = "/cam"
MODES = ("testsrc", "synthetic", "counter")
_ROOT = Path(__file__).resolve().parents[1]


def synthetic_frame(seed: int, width: int, height: int):
    """The defect frame the synthetic mode serves: an ``inspectd.synth.Sample`` (grey image + mask)."""
    from inspectd.synth import render

    return render(np.random.default_rng(seed), width, height, defect=True)


# Counter mode: frame n is grey at COUNTER_LEVELS[n % 6] plus a blocky texture of its own (8x8 blocks,
# +-40), so every slice spans several RTP packets as a real picture's would, and a part of a picture
# that a decoder made up (concealing a missing slice from the previous picture or from neighbours)
# does not match the picture sent.
COUNTER_LEVELS = (45, 200, 75, 215, 100, 170)
_BLOCK = 8


def counter_frame(n: int, width: int, height: int) -> np.ndarray:
    """(H, W) uint8: what the server sends as frame n in counter mode."""
    k = n % len(COUNTER_LEVELS)
    blocks = np.random.default_rng(k).integers(-40, 41, (-(-height // _BLOCK), -(-width // _BLOCK)))
    texture = np.kron(blocks, np.ones((_BLOCK, _BLOCK), np.int64))[:height, :width]
    return np.clip(COUNTER_LEVELS[k] + texture, 0, 255).astype(np.uint8)


def read_frames(src, n: int, timeout: float = 10.0) -> list[np.ndarray]:
    """Open a Source, read up to `n` frames within `timeout` s, close it (also on failure)."""
    src.open()
    try:
        out, deadline = [], time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            if (image := src.read(0.2)) is not None:
                out.append(image)
        return out
    finally:
        src.close()


def counter_received(n: int, width: int, height: int) -> np.ndarray:
    """(H, W) float32: what a receiver should get for frame n. The server's full-range grey goes out
    signalled as limited range, so decoders expand it: (y - 16) * 255 / 219 (measured: OpenCV and
    GStreamer alike)."""
    return np.clip((counter_frame(n, width, height).astype(np.float32) - 16) * 255 / 219, 0, 255)


def counter_match(image: np.ndarray, bands: int = 8, tolerance: float = 10.0) -> tuple[int, list[float]]:
    """Which counter frame `image` (H, W, 3) shows, and each horizontal band's mean error against it.

    A whole frame has every band under `tolerance` (H.264 at these settings: about 2-4); a band
    with a slice of another frame, or a made-up one, is 20 or more off.
    """
    grey = image.astype(np.float32).mean(axis=2)
    h, w = grey.shape
    candidates = [counter_received(k, w, h) for k in range(len(COUNTER_LEVELS))]
    best = min(range(len(candidates)), key=lambda k: np.abs(grey - candidates[k]).mean())
    errors = [float(e.mean()) for e in np.array_split(np.abs(grey - candidates[best]), bands, axis=0)]
    return best, errors


def h264_encoder(slices: int = 1) -> str:
    """The encoder part of the launch line: x264 (gst-plugins-ugly) if present, else OpenH264 (bad).

    `slices`: H.264 slices per frame; 0 = x264's sliced threads (what `tune=zerolatency` does by
    itself: one slice per encoder thread).
    """
    from gi.repository import Gst

    if Gst.ElementFactory.find("x264enc"):
        # threads=1: one slice per frame unless asked for more, as most IP cameras send. A keyframe
        # every 5 frames: a client joining the shared stream waits at most that long for a picture.
        threads = "threads=4 sliced-threads=true" if slices == 0 else "threads=1"
        return f"x264enc tune=zerolatency speed-preset=ultrafast key-int-max=5 bframes=0 {threads}" + (
            f" option-string=slices={slices}" if slices > 1 else ""
        )
    if slices != 1:
        raise RuntimeError("slices > 1 needs x264enc (gstreamer1.0-plugins-ugly)")
    if Gst.ElementFactory.find("openh264enc"):
        return "openh264enc gop-size=10"
    raise RuntimeError("no H.264 encoder: install gstreamer1.0-plugins-ugly (x264enc) or -bad (openh264enc)")


class RtspServer:
    """Starts/stops the server process; ``url`` stays the same across ``restart()``."""

    def __init__(
        self,
        mode: str = "testsrc",
        width: int = 160,
        height: int = 120,
        fps: int = 10,
        seed: int = 0,
        port: int | None = None,
        slices: int = 1,
        tcp_only: bool = False,
        alt_size: tuple[int, int] | None = None,
        auth: tuple[str, str] | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        if alt_size is not None and mode == "testsrc":
            raise ValueError("alt_size needs an appsrc mode (synthetic or counter)")
        self.mode, self.width, self.height, self.fps, self.seed = mode, width, height, fps, seed
        self.slices, self.tcp_only, self.alt_size, self.auth = slices, tcp_only, alt_size, auth
        self.size = (width, height)  # what the server sends now (switch_size() toggles it)
        self.port = port or free_port()
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        """The server process (for measuring its CPU), None before start()."""
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{MOUNT}"

    def url_with(self, user: str, password: str) -> str:
        """The URL with credentials in it, percent-encoded as a URL must carry them."""
        from urllib.parse import quote

        return f"rtsp://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}{MOUNT}"

    @property
    def mask(self) -> np.ndarray:
        """(H, W) uint8, 255 where the synthetic mode's frame (at the current size) has a defect."""
        if self.mode != "synthetic":
            raise ValueError("only the synthetic mode has a defect mask")
        return synthetic_frame(self.seed, *self.size).mask

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> RtspServer:
        """Start the server process; return once its port accepts connections."""
        if self.running:
            return self
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--port",
            str(self.port),
            "--mode",
            self.mode,
            "--width",
            str(self.width),
            "--height",
            str(self.height),
            "--fps",
            str(self.fps),
            "--seed",
            str(self.seed),
            "--slices",
            str(self.slices),
        ]
        cmd += ["--tcp-only"] if self.tcp_only else []
        cmd += ["--alt-size", f"{self.alt_size[0]}x{self.alt_size[1]}"] if self.alt_size else []
        cmd += ["--auth", f"{self.auth[0]}\n{self.auth[1]}"] if self.auth else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
        self.size = (self.width, self.height)
        self._proc = subprocess.Popen(
            dies_with_tests(cmd), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_listening(timeout)
        return self

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace").strip()
                raise RuntimeError(f"RTSP server exited with {self._proc.returncode}: {err[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"RTSP server did not listen on port {self.port} within {timeout} s")

    def stop(self, kill: bool = False) -> None:
        """Camera gone: SIGKILL (abrupt) or SIGTERM; waits until the process has exited."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            proc.kill() if kill else proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        proc.stderr.close()

    def restart(self, timeout: float = 15.0) -> RtspServer:
        """Stop and start again on the same port (the camera reboots)."""
        self.stop()
        return self.start(timeout)

    def freeze(self) -> None:
        """SIGSTOP: the camera hangs; its sockets stay open but nothing is sent."""
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._proc.send_signal(signal.SIGCONT)

    def switch_size(self) -> tuple[int, int]:
        """Toggle between (width, height) and alt_size from the next frame on; returns the new size."""
        if self.alt_size is None:
            raise ValueError("this server has no alt_size")
        self.size = tuple(self.alt_size) if self.size == (self.width, self.height) else (self.width, self.height)
        self._proc.send_signal(signal.SIGUSR1)
        return self.size

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(kill=True)


# ------------------------------------------------------------------ the server process itself


def _launch_line(args: argparse.Namespace) -> str:
    caps = f"width={args.width},height={args.height},framerate={args.fps}/1"
    if args.mode == "testsrc":
        src = f"videotestsrc is-live=true pattern=ball ! video/x-raw,{caps}"
    else:
        src = f"appsrc name=src is-live=true format=time caps=video/x-raw,format=GRAY8,{caps}"
    # config-interval=-1: SPS/PPS with every IDR, so a client joining (or re-joining) decodes at once.
    return (
        f"( {src} ! videoconvert ! video/x-raw,format=I420 ! {h264_encoder(args.slices)} ! "
        f"rtph264pay name=pay0 pt=96 config-interval=-1 )"
    )


def _frames(args: argparse.Namespace, width: int, height: int) -> list[bytes]:
    if args.mode == "synthetic":
        return [synthetic_frame(args.seed, width, height).image.tobytes()]
    return [counter_frame(n, width, height).tobytes() for n in range(len(COUNTER_LEVELS))]


def _feed_appsrc(media, args: argparse.Namespace, state: dict) -> None:
    """Push frames at args.fps with running timestamps (need-data, as test-appsrc.c does).

    `state["alt"]` picks the size to send (SIGUSR1 toggles it): a change sets new caps on the appsrc,
    which x264enc and the payloader follow mid-stream (new SPS/PPS), as a reconfigured camera does.
    """
    from gi.repository import Gst

    sizes = [(args.width, args.height)] + ([args.alt_size] if args.alt_size else [])
    frames = {size: _frames(args, *size) for size in sizes}
    appsrc = media.get_element().get_by_name_recurse_up("src")
    duration = Gst.SECOND // args.fps
    sent = {"size": sizes[0], "n": 0}  # per media: each client URL (host:port) gets a media of its own

    def need_data(src, _length):
        size = sizes[state["alt"]]
        if size != sent["size"]:
            src.set_property(
                "caps", Gst.Caps.from_string(f"video/x-raw,format=GRAY8,width={size[0]},height={size[1]},framerate={args.fps}/1")
            )
            sent["size"] = size
        buf = Gst.Buffer.new_wrapped(frames[size][sent["n"] % len(frames[size])])
        buf.pts = buf.dts = sent["n"] * duration
        buf.duration = duration
        sent["n"] += 1
        src.emit("push-buffer", buf)

    appsrc.connect("need-data", need_data)


def _require_basic_auth(server, factory, user: str, password: str) -> None:
    """Only `user` with `password` may play the mount (as gst-rtsp-server's test-auth example does)."""
    from gi.repository import GstRtspServer

    auth = GstRtspServer.RTSPAuth()
    token = GstRtspServer.RTSPToken()
    token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "operator")
    auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
    server.set_auth(auth)
    permissions = GstRtspServer.RTSPPermissions()
    permissions.add_permission_for_role("operator", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS, True)
    permissions.add_permission_for_role("operator", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, True)
    factory.set_permissions(permissions)


def serve(args: argparse.Namespace) -> None:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    gi.require_version("GstRtsp", "1.0")
    from gi.repository import GLib, Gst, GstRtsp, GstRtspServer

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(_launch_line(args))
    factory.set_shared(True)  # several clients (workers) share one encoder
    if args.tcp_only:
        factory.set_protocols(GstRtsp.RTSPLowerTrans.TCP)
    if args.auth:
        _require_basic_auth(server, factory, *args.auth.split("\n", 1))
    state = {"alt": 0}
    if args.mode != "testsrc":
        factory.connect("media-configure", lambda _f, media: _feed_appsrc(media, args, state))

    def toggle_size():
        state["alt"] = 1 - state["alt"] if args.alt_size else 0
        return GLib.SOURCE_CONTINUE

    server.get_mount_points().add_factory(MOUNT, factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{args.port}")
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGUSR1, toggle_size)
    loop.run()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=MODES, default="testsrc")
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--height", type=int, default=120)
    p.add_argument("--fps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slices", type=int, default=1)
    p.add_argument("--tcp-only", action="store_true")
    p.add_argument("--auth", default=None, help="USER, a newline, PASSWORD")
    p.add_argument("--alt-size", type=lambda v: tuple(int(x) for x in v.split("x")), default=None)
    serve(p.parse_args(argv))


if __name__ == "__main__":
    main()
