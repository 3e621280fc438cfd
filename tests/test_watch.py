"""`inspectd watch` and the client against hostile messages: skipped and counted, never a crash, no PNG bomb decoded."""

from __future__ import annotations

import json
import os
import queue
import struct
import subprocess
import sys
import threading
import time
import zlib

import cv2
import numpy as np
import pytest
import zmq
from support import ROOT, dies_with_tests

from inspectd import client
from inspectd.client import MAX_IMAGE_PIXELS, Subscriber, decode_event, image_size
from inspectd.outputs.wire import SCHEMA, WireFormatError, encode_message

RUN = "c" * 32


def png(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of zeros, built by hand so that a large one costs no large array here."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def defect_body(width: int = 64, height: int = 48, **override) -> dict:
    body = {
        "camera": "cam1",
        "frame_seq": 7,
        "captured_at": "2026-11-26T13:40:00.123456Z",
        "score": 0.9,
        "threshold": 0.5,
        "is_defect": True,
        "model": {"name": "m", "sha256": "ab" * 32},
        "regions": [{"bbox": [1, 2, 3, 4], "area_px": 12, "peak": 0.9, "mean": 0.8}],
        "frame": {"width": width, "height": height},
        "attachments": [{"kind": "mask", "encoding": "png", "width": width, "height": height}],
    }
    return {**body, **override}


def defect(seq: int, mask: bytes, **override) -> list[bytes]:
    return encode_message("defect.cam1", RUN, seq, defect_body(**override), [mask])


def without(parts: list[bytes], *keys: str) -> list[bytes]:
    header = json.loads(parts[1])
    for key in keys:
        header.pop(key)
    return [parts[0], json.dumps(header).encode(), *parts[2:]]


MALFORMED = {
    "status without camera": encode_message("status.cam1", RUN, 1, {"state": "up", "detail": ""}),
    "heartbeat without published_at": without(
        encode_message("heartbeat", RUN, 2, {"fps": 1.0, "cameras": {}, "uptime_s": 1.0}), "published_at"
    ),
    "heartbeat with a list of cameras": encode_message("heartbeat", RUN, 3, {"fps": 1.0, "cameras": [1], "uptime_s": 1.0}),
    "score as a string": defect(1, png(64, 48), score="high"),
    "published_at not a time": [
        b"status.cam1",
        json.dumps(
            {
                "schema": SCHEMA,
                "run_id": RUN,
                "topic": "status.cam1",
                "seq": 2,
                "published_at": "yesterday",
                "camera": "cam1",
                "state": "up",
                "attachments": [],
            }
        ).encode(),
    ],
    "a region without bbox": defect(2, png(64, 48), regions=[{"area_px": 3, "peak": 1.0, "mean": 1.0}]),
    "an attachment entry that is a string": defect(3, png(64, 48), attachments=["mask"]),
    "a PNG larger than declared": defect(4, png(4000, 3000)),
    "a declared size over the maximum": defect(5, png(8, 8), width=100_000, height=100_000),
    "header not JSON": [b"defect.cam1", b"{not json"],
}


# -- decode_event on its own -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_decode_event_refuses(name, monkeypatch):
    decoded: list[int] = []
    real = cv2.imdecode
    monkeypatch.setattr(client.cv2, "imdecode", lambda data, flags: decoded.append(len(data)) or real(data, flags))
    with pytest.raises(WireFormatError):
        decode_event(MALFORMED[name])
    assert decoded == []  # refused before any image was decoded


def test_a_png_bomb_is_refused_from_its_ihdr(monkeypatch):
    bomb = png(5000, 5000)  # 25 MB of pixels in a few kB
    assert len(bomb) < 100_000 and image_size(bomb, "png") == (5000, 5000)
    monkeypatch.setattr(client.cv2, "imdecode", lambda *a: pytest.fail("a PNG bomb reached cv2.imdecode"))
    with pytest.raises(WireFormatError, match="5000x5000, the header declares 64x48"):
        decode_event(defect(1, bomb))
    assert decode_event(defect(1, bomb), decode=False).raw["mask"] == bomb  # not decoded: nothing to fear


def test_image_size_reads_png_and_jpeg_headers():
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for encoding, ext in (("png", ".png"), ("jpeg", ".jpg")):
        ok, buf = cv2.imencode(ext, image)
        assert ok and image_size(buf.tobytes(), encoding) == (53, 37)
    with pytest.raises(WireFormatError, match="not a JPEG"):
        image_size(png(4, 4), "jpeg")
    with pytest.raises(WireFormatError, match="not a PNG"):
        image_size(b"\xff\xd8\xff\xe0", "png")


def test_a_jpeg_frame_larger_than_declared_is_refused():
    big = cv2.imencode(".jpg", np.zeros((480, 640, 3), np.uint8))[1].tobytes()
    attachments = [
        {"kind": "mask", "encoding": "png", "width": 64, "height": 48},
        {"kind": "frame", "encoding": "jpeg", "width": 64, "height": 48},
    ]
    parts = encode_message("defect.cam1", RUN, 1, defect_body(attachments=attachments), [png(64, 48), big])
    with pytest.raises(WireFormatError, match="frame attachment is 640x480"):
        decode_event(parts)


def test_a_good_message_still_decodes():
    ev = decode_event(defect(1, png(64, 48)))
    assert ev.mask.shape == (48, 64) and ev.header["camera"] == "cam1"
    assert MAX_IMAGE_PIXELS >= 7680 * 4320


# -- `python -m inspectd watch` against a hand-driven PUB socket -------------------------------------


class Lines:
    """A subprocess' stdout and stderr, read line by line on threads."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.queues = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.seen: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.readers = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self.queues]
        for reader in self.readers:
            reader.start()

    def _read(self, name: str) -> None:
        for line in getattr(self.proc, name):
            self.queues[name].put(line.rstrip("\n"))

    def wait_for(self, needle: str, stream: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.queues[stream].get(timeout=left)
            except queue.Empty:
                break
            self.seen[stream].append(line)
            if needle in line:
                return True
        return False

    def finish(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout)  # EOF once the process is gone
        for name, lines in self.queues.items():
            while not lines.empty():
                self.seen[name].append(lines.get())
        return rc


@pytest.fixture
def pub_socket():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.bind("tcp://127.0.0.1:*")
    yield sock
    sock.close(0)
    ctx.term()


@pytest.fixture
def start_watch():
    started: list[subprocess.Popen] = []

    def start(*args: str) -> Lines:
        proc = subprocess.Popen(
            dies_with_tests([sys.executable, "-m", "inspectd", "watch", *args]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        started.append(proc)
        return Lines(proc)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def connect(pub: zmq.Socket, watch: Lines, timeout: float = 20.0) -> None:
    """Slow joiner: heartbeats until watch says it is connected."""
    deadline = time.monotonic() + timeout
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        pub.send_multipart(encode_message("heartbeat", RUN, seq, {"fps": 1.0, "cameras": {}, "uptime_s": 1.0}))
        if watch.wait_for(f"connected to run {RUN}", "stdout", timeout=0.1):
            return
        assert watch.proc.poll() is None, f"watch exited early: {watch.seen}"
    raise AssertionError(f"watch did not connect within {timeout} s: {watch.seen}")


@pytest.mark.parametrize("save", [False, True], ids=["print", "save"])
def test_watch_skips_and_counts_malformed_messages(pub_socket, start_watch, tmp_path, save):
    endpoint = pub_socket.getsockopt_string(zmq.LAST_ENDPOINT)
    watch = start_watch(endpoint, "--count", "1", "--timeout", "20", *(["--save", str(tmp_path / "out")] if save else []))
    connect(pub_socket, watch)
    hostile = dict(MALFORMED)
    if not save:  # without --save nothing is decoded: oversized images are no danger and pass
        hostile.pop("a PNG larger than declared")
        hostile.pop("a declared size over the maximum")
    for parts in hostile.values():
        pub_socket.send_multipart(parts)
    pub_socket.send_multipart(defect(99, png(64, 48)))  # then a good one: printed, and --count 1 ends watch
    rc = watch.finish(timeout=20)
    out, err = watch.seen["stdout"], watch.seen["stderr"]
    assert rc == 0, err
    assert not any("Traceback" in line for line in err), err
    events = [line for line in out if "defect.cam1" in line]
    assert len(events) == 1 and "frame 7  DEFECT score 0.900" in events[0], out
    notices = [line for line in err if "skipped a malformed message" in line]
    assert len(notices) == len(hostile), err
    assert err[-1] == f"inspectd watch: {len(hostile)} malformed message(s) skipped"
    if save:
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cam1_7_mask.png"]


def test_subscriber_reports_malformed_to_its_callback(pub_socket):
    endpoint = pub_socket.getsockopt_string(zmq.LAST_ENDPOINT)
    reasons: list[tuple[str, str]] = []
    with Subscriber(endpoint, [""], on_malformed=lambda ep, why: reasons.append((ep, why))) as sub:
        deadline = time.monotonic() + 10
        while sub.recv(timeout_s=0.05) is None:  # slow joiner
            assert time.monotonic() < deadline, "subscriber never connected"
            pub_socket.send_multipart(encode_message("heartbeat", RUN, 1, {"fps": None, "cameras": {}, "uptime_s": 0.0}))
        pub_socket.send_multipart(MALFORMED["status without camera"])
        pub_socket.send_multipart(encode_message("status.cam1", RUN, 5, {"camera": "cam1", "state": "up"}))
        ev = sub.recv(timeout_s=5.0)
        while ev is not None and ev.topic == "heartbeat":
            ev = sub.recv(timeout_s=5.0)
    assert ev is not None and ev.topic == "status.cam1"
    assert sub.malformed == 1 and reasons == [(endpoint, "topic 'status.cam1': header field 'camera' missing or not a valid str")]


def test_a_part_verdict_decodes_and_watch_describes_it():
    """part.<camera> (part mode): its header is checked like the other kinds, and watch prints one line for it."""
    from inspectd.frames import PartResult, Verdict
    from inspectd.outputs.wire import part_body
    from inspectd.watch import describe

    result = PartResult("gate", "A-1043", 42, Verdict.NOT_INSPECTED, "reject", "deadline", 1.7e9, 1.7e9 + 1.0, 1.0001)
    parts = encode_message("part.gate", RUN, 7, part_body(result, {"name": "demo", "sha256": "ab"}))
    event = decode_event([bytes(p) for p in parts])
    line = describe(event)
    assert "part A-1043" in line and "NOT_INSPECTED (deadline) -> reject" in line and "1000 ms after capture" in line
    header = json.loads(parts[1])
    del header["verdict"]
    with pytest.raises(WireFormatError, match="'verdict' missing"):
        decode_event([parts[0], json.dumps(header).encode()])
