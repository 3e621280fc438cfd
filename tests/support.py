"""Shared test support: waiting on conditions, free ports, /metrics parsing, event collection, fakes.

Every wait in the suite is a condition with a deadline: `wait_until(predicate, timeout, message)`
polls and, when the deadline passes, fails with a message that says what it waited for. Nothing
here sleeps a fixed time and then asserts.

Fixtures live in conftest.py; the daemon subprocess in daemon_util.py; the RTSP camera in rtsp.py;
a real Prometheus server in prometheus_util.py. All of them take these helpers from here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from inspectd.client import Event, Subscriber
    from inspectd.frames import Inspection

ROOT = Path(__file__).resolve().parents[1]

Message = str | Callable[[], str]


# util-linux's setpriv sets the parent-death signal and execs the command (same pid, no extra process).
SETPRIV = shutil.which("setpriv")


def dies_with_tests(argv: list[str]) -> list[str]:
    """`argv` run so that the kernel sends it SIGTERM when the test process dies: a pytest killed by a
    timeout or ^C skips its fixtures' teardown, and a daemon, broker or camera it started would be left
    running with its ports and the CPU. Normal teardown still stops each process itself."""
    return [SETPRIV, "--pdeathsig", "TERM", "--", *argv] if SETPRIV else list(argv)


def _say(message: Message) -> str:
    return message() if callable(message) else message


# ------------------------------------------------------------------------------------------ waiting


def wait_until(predicate: Callable[[], Any], timeout: float, message: Message = "", interval: float = 0.02) -> float:
    """Poll `predicate` until it returns something true; return the seconds that took.

    After `timeout` s: AssertionError "timed out after T s waiting for MESSAGE". `message` may be a
    callable (e.g. a daemon's log), evaluated only on failure.
    """
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            what = _say(message) or getattr(predicate, "__name__", "a condition")
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


def finishes_within(fn: Callable[[], Any], timeout: float, message: Message = "") -> Any:
    """Run `fn()` on a daemon thread; return its result, or fail if it has not returned within `timeout` s.

    For "never blocks" / "returns promptly" behaviour: a call that hangs fails the test with the message
    (the thread is left behind, as a daemon thread) instead of hanging the suite.
    """
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised on the test's thread
            result["error"] = exc

    thread = threading.Thread(target=call, name="finishes_within", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"still running after {timeout} s: {_say(message) or getattr(fn, '__name__', 'a call')}")
    if "error" in result:
        raise result["error"]
    return result.get("value")


# ------------------------------------------------------------------------------------------ network


_GIVEN: set[int] = set()


def _ephemeral_ports() -> range:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, below the kernel's ephemeral range: a port
    handed out for a server that binds later must not be taken meanwhile as the source port of some
    client's connection (a bridge retrying its connect while its daemon starts: "Address already in use")."""
    import random

    ephemeral = _ephemeral_ports()
    for _ in range(200):
        port = random.randint(20000, 32000)
        if port in ephemeral or port in _GIVEN:  # not twice in one process: two servers of one test bind later
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _GIVEN.add(port)
            return port
    with socket.socket() as s:  # an unusual port range: what the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LateRelay:
    """127.0.0.1:port -> 127.0.0.1:upstream_port, listening only from `open()` on: a client that connects
    earlier is refused and retries (ZeroMQ every 100 ms), so whatever the upstream sends before `open()`
    never reaches it, deterministically. Bytes are copied both ways, two threads per connection; a plain
    relay has no faults to inject (for those, tcp_proxy.TcpProxy, which speaks RTSP)."""

    def __init__(self, upstream_port: int):
        self.upstream_port, self.port = upstream_port, free_port()  # reserved now, bound at open()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:  # the upstream is down (a daemon stopped): as it would be, the client is closed
                client.close()
                continue
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in [*([self._listener] if self._listener else []), *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> LateRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body) of a GET; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ------------------------------------------------------------------------------------------ /metrics


@dataclass(frozen=True)
class MetricSample:
    name: str
    labels: dict[str, str]
    value: float


class MetricsText:
    """A Prometheus text exposition parsed with prometheus_client's own parser.

    >>> m = scrape(urls["metrics"])
    >>> m.value("inspectd_camera_up", camera="cam-a")     # exact label set; None when absent
    >>> m.find("inspectd_model_info", name="demo-b")       # samples whose labels include these
    """

    def __init__(self, text: str):
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.samples = [
            MetricSample(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def find(self, name: str, **labels: str) -> list[MetricSample]:
        """Samples named `name` whose labels include `labels` (as strings)."""
        want = {k: str(v) for k, v in labels.items()}
        return [s for s in self.samples if s.name == name and want.items() <= s.labels.items()]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the sample with exactly these labels, or None."""
        want = {k: str(v) for k, v in labels.items()}
        found = [s.value for s in self.samples if s.name == name and s.labels == want]
        assert len(found) <= 1, f"{name}{want}: {len(found)} samples"
        return found[0] if found else None

    def __contains__(self, name: str) -> bool:
        return any(s.name == name for s in self.samples)


def scrape(metrics_url: str) -> MetricsText:
    """GET METRICS_URL/metrics (the base URL, as daemon_config returns it) and parse it."""
    status, text = http_get(metrics_url.rstrip("/") + "/metrics")
    assert status == 200, f"/metrics answered {status}: {text[:200]}"
    return MetricsText(text)


def metric_value(metrics_url: str, name: str, **labels: str) -> float | None:
    """One sample of a live /metrics endpoint (exact labels), or None."""
    return scrape(metrics_url).value(name, **labels)


# ------------------------------------------------------------------------------------------ events


def read_n(src, n: int, timeout: float = 5.0) -> list[np.ndarray]:
    """n frames from an open camera source (None results are waited through)."""
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {len(out)} of {n} frames within {timeout} s"
        img = src.read(0.2)
        if img is not None:
            out.append(img)
    return out


def collect_events(
    sub: Subscriber,
    until: int | Callable[[list[Event]], bool],
    kinds: Iterable[str] = ("defect",),
    timeout: float = 30.0,
    message: Message = "",
) -> list[Event]:
    """Receive events of `kinds` ("defect", "status", ...) until `until` holds, and return them.

    `until` is a count (that many events) or a predicate on the list collected so far. Fails after
    `timeout` s, saying what it waited for and what it got; `message` (a string, or a callable such as
    `daemon.log`) is appended.
    """
    kinds = {kinds} if isinstance(kinds, str) else set(kinds)
    done = (lambda evs: len(evs) >= until) if isinstance(until, int) else until
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while not done(events):
        left = deadline - time.monotonic()
        if left <= 0:
            got = [f"{ev.topic}#{ev.header.get('seq')}" for ev in events][-20:]
            want = f"{until} event(s)" if isinstance(until, int) else getattr(until, "__doc__", None) or "the condition"
            extra = _say(message)
            raise AssertionError(
                f"timed out after {timeout} s collecting {'/'.join(sorted(kinds))} events until "
                f"{want}; got {len(events)}: {got}" + (f"\n{extra}" if extra else "")
            )
        ev = sub.recv(timeout_s=min(left, 0.5))
        if ev is not None and ev.kind.value in kinds:
            events.append(ev)
    return events


def next_event(sub: Subscriber, kind: str, timeout: float = 5.0, message: Message = "") -> Event:
    """The next event of `kind` (other kinds are skipped)."""
    return collect_events(sub, 1, kinds=(kind,), timeout=timeout, message=message)[0]


def wait_connected(sub: Subscriber, timeout: float = 5.0) -> Event:
    """Slow joiner: nothing published before the subscription is in place arrives; a heartbeat proves it is.

    The subscriber must subscribe to "heartbeat"."""
    return next_event(sub, "heartbeat", timeout, "a heartbeat (subscriber connected)")


# ------------------------------------------------------------------------------------------ systemd


class NotifySocket:
    """What systemd would be: a bound AF_UNIX datagram socket collecting KEY=value messages.

    `messages` holds (monotonic time received, line); `pump` reads what has arrived.
    """

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []

    def pump(self, seconds: float = 0.0) -> None:
        """Read for `seconds` (0: only what is already there)."""
        end = time.monotonic() + seconds
        while True:
            try:
                data = self.sock.recv(4096).decode()
            except (socket.timeout, BlockingIOError):
                if time.monotonic() >= end:
                    return
                continue
            for line in data.splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self) -> list[str]:
        return [m for _, m in self.messages]

    def wait_for(self, prefix: str, timeout: float, since: float = 0.0) -> float:
        """The receive time of the first message starting with `prefix` received at or after `since`."""

        def seen() -> float | None:
            self.pump()
            return next((t for t, line in self.messages if t >= since and line.startswith(prefix)), None)

        wait_until(lambda: seen() is not None, timeout, lambda: f"{prefix!r} on NOTIFY_SOCKET; got {self.lines()[-10:]}")
        return seen()

    def count(self, prefix: str, since: float = 0.0) -> int:
        return sum(1 for t, line in self.messages if t >= since and line.startswith(prefix))

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------------------------------ inspections

TEST_MODEL = {"name": "tiny", "sha256": "ab" * 32}


def make_inspection(
    camera: str = "cam1",
    seq: int = 1,
    defect: bool = True,
    attach_frame: bool = False,
    size: tuple[int, int] = (64, 48),
    color: tuple[int, int, int] | None = None,
    archive_frame: str = "",
    ok_every: int = 0,
    captured_at: float | None = None,
) -> Inspection:
    """A real post-processed inspection: one hot square in the CAM -> one region, a mask PNG, maybe a JPEG.

    The frame is noise, or one RGB `color`; `archive_frame` ("jpeg"/"png") as with the archive on."""
    from inspectd.frames import Frame
    from inspectd.pipeline.postprocess import InspectOptions, inspect

    w, h = size
    if color is None:
        image = np.random.default_rng(seq).integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        image = np.full((h, w, 3), color, np.uint8)
    frame = Frame(camera, seq, time.time() - 0.05 if captured_at is None else captured_at, time.monotonic(), image)
    logits = np.full((h // 8, w // 8), -6.0, np.float32)
    logits[2:4, 3:5] = 6.0
    opts = InspectOptions(
        threshold=0.5,
        attach_frame=attach_frame,
        results=True,  # mask: probability >= 0.5
        archive_frame=archive_frame,
        archive_ok_every=ok_every,
    )
    return inspect(frame, 0.9 if defect else 0.1, logits, opts)


class CameraHarness:
    """A real CameraWorker plus everything it reports: frames, state changes, metrics (a private registry)."""

    def __init__(self, cfg, **worker_kw):
        from prometheus_client import CollectorRegistry

        from inspectd.metrics import Metrics
        from inspectd.sources.camera import CameraWorker

        self.registry = CollectorRegistry()
        self.frames: list = []
        self.states: list = []
        self.worker = CameraWorker(
            cfg,
            self.frames.append,
            Metrics(self.registry),
            on_state=lambda cam, st, detail: self.states.append((st, detail)),
            **worker_kw,
        )
        self.cam = cfg.id

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(f"inspectd_{name}", {"camera": self.cam, **labels}) or 0.0

    def __enter__(self):
        self.worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.worker.stop()
        assert self.worker.join(2.0), "capture thread did not end"


# ------------------------------------------------------------------------------------------ namespaces


def unshare_unavailable() -> str | None:
    """Why a private mount namespace (unshare --mount, as root) cannot be used here, or None."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare(1)"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, timeout=30)
    return None if proc.returncode == 0 else f"unshare --mount is not permitted here: {proc.stderr.decode().strip()}"


def self_signed_cert(folder: Path, name: str = "metrics") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost (its own CA) and its key (mode 0600), by openssl."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=inspectd-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    os.chmod(key, 0o600)
    return cert, key


def assert_runtime_matches_tensorflow(model_path: Path, folder: Path, runtime: str, n: int = 8) -> None:
    """ONNX Runtime or OpenVINO give TensorFlow's scores (1e-4) and maps (1e-3) for a model on the first `n` images
    of a dataset folder (the tolerance of test_runtimes.py), and the maps are not constant (any runtime would
    match a constant)."""
    from inspectd.imageio import read_rgb
    from inspectd.model.deployable import load_model
    from inspectd.pipeline.engine import InferenceEngine
    from inspectd.toolkit.dataset import scan

    model = load_model(model_path)
    frames = [read_rgb(it.path) for it in scan(folder).items[:n]]
    ref_scores, ref_cams = InferenceEngine(model, (n,), "cpu", runtime="tensorflow").infer(frames)
    engine = InferenceEngine(model, (n,), "cpu", runtime=runtime)
    scores, cams = engine.infer(frames)
    assert engine.runtime == runtime and cams.shape == ref_cams.shape
    assert np.abs(scores - ref_scores).max() <= 1e-4 and np.abs(cams - ref_cams).max() <= 1e-3
    assert np.ptp(ref_cams) > 0.1
