"""A loopback TCP proxy between an RTSP camera and its client, with the network faults a test orders.

    proxy = TcpProxy(upstream_port).start()     # rtsp://127.0.0.1:{proxy.port}/cam reaches the camera
    proxy.cut()          # the connections open now go silent both ways, with no FIN and no RST
    proxy.stall()        # their media stops; RTSP requests and replies still pass (the session stays up)
    proxy.corrupt(20)    # the payload of the next 20 RTP packets gets bytes flipped
    proxy.blackhole(True)   # new connections are accepted and never answered (until blackhole(False))
    proxy.slices_per_frame()   # H.264 slices seen per RTP timestamp (what the camera really sends)

Faults hit the connections open when they are ordered; a client that reconnects gets a healthy one
(the camera or the path to it came back), except under `blackhole`. The server must offer RTSP over
TCP only (`RtspServer(tcp_only=True)`): RTP over UDP would bypass the proxy.

Server-to-client bytes are split into RTSP messages and interleaved binary frames (RFC 2326
10.12: '$', channel, 16-bit length, data) so that faults can hit the media and spare the session.
Hand-written because no library proxies RTSP interleaving with fault injection; it is small, and
runs in one thread of the test process with a selector.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = ["TcpProxy"]

log = logging.getLogger("tests.tcp_proxy")
RTP_HEADER = 12  # without CSRCs or an extension
_READ = 65536


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    upstream: socket.socket
    mode: str = "pass"  # pass | cut | stall | hole
    pending: bytearray = field(default_factory=bytearray)  # server -> client bytes not yet split into units


class TcpProxy:
    """127.0.0.1:port -> 127.0.0.1:upstream_port, in a thread of its own; see the module docstring."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._blackhole = False
        self._corrupt_left = 0
        self.accepted = 0  # connections accepted so far
        self.rtp_dropped = 0  # RTP/RTCP frames swallowed by stall()
        self.rtsp_while_stalled = 0  # RTSP messages passed to the client on a stalled connection
        self.rtp_corrupted = 0
        self.send_failures = 0  # connections closed because a send did not complete within 2 s
        self.error: BaseException | None = None  # what ended the proxy thread, if anything did
        self._slices: OrderedDict[bytes, int] = OrderedDict()  # RTP timestamp -> H.264 slices (last 1000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)

    def url(self, path: str = "/cam") -> str:
        return f"rtsp://127.0.0.1:{self.port}{path}"

    # ------------------------------------------------------------------ what a test orders

    def start(self) -> TcpProxy:
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._thread.start()
        return self

    def cut(self) -> int:
        """Half-open: the connections open now forward nothing more, either way, and are never closed."""
        return self._set_mode("cut")

    def stall(self) -> int:
        """The connections open now stop forwarding media; RTSP messages still go both ways."""
        return self._set_mode("stall")

    def corrupt(self, packets: int) -> None:
        """Flip bytes inside the payload of the next `packets` RTP packets (headers left intact)."""
        with self._lock:
            self._corrupt_left = packets

    def blackhole(self, on: bool) -> None:
        """While on, new connections are accepted and then neither forwarded nor closed."""
        with self._lock:
            self._blackhole = on

    def slices_per_frame(self) -> list[int]:
        """How many H.264 slices (NAL types 1 and 5) each of the last frames carried, by RTP timestamp."""
        with self._lock:
            return list(self._slices.values())

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(pair.mode == "pass" for pair in self._pairs)

    def check(self) -> None:
        """AssertionError if the proxy thread died or gave up on a connection (a test fault, not the daemon's)."""
        assert self.error is None, f"the test proxy failed: {self.error!r}"
        assert self._thread.is_alive(), "the test proxy thread has ended"
        assert self.send_failures == 0, f"the test proxy dropped {self.send_failures} connection(s) on a stuck send"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for pair in self._pairs:
                pair.client.close()
                pair.upstream.close()
            self._pairs.clear()
        self._listener.close()
        self._sel.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _set_mode(self, mode: str) -> int:
        with self._lock:
            hit = [pair for pair in self._pairs if pair.mode == "pass"]
            for pair in hit:
                pair.mode = mode
            return len(hit)

    # ------------------------------------------------------------------ the proxy thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for key, _ in self._sel.select(timeout=0.1):
                    if key.data is None:
                        self._accept()
                    else:
                        pair, upstream_side = key.data
                        self._pump(pair, upstream_side)
        except BaseException as exc:  # kept for check(): a dead proxy must not pass for a dead camera
            self.error = exc
            log.exception("test proxy thread failed")

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        with self._lock:
            hole = self._blackhole
        try:
            upstream = client if hole else socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
        except OSError:  # the camera is down: refuse as it would
            client.close()
            return
        pair = _Pair(client, upstream, "hole" if hole else "pass")
        with self._lock:
            self._pairs.append(pair)
            self.accepted += 1
        client.setblocking(False)
        self._sel.register(client, selectors.EVENT_READ, (pair, False))
        if not hole:
            upstream.setblocking(False)
            self._sel.register(upstream, selectors.EVENT_READ, (pair, True))

    def _pump(self, pair: _Pair, upstream_side: bool) -> None:
        src = pair.upstream if upstream_side else pair.client
        try:
            data = src.recv(_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # an end closed: close both, as a real path would pass the FIN/RST on
            self._drop(pair)
            return
        if pair.mode in ("cut", "hole"):
            return  # read and forgotten: the other end hears nothing, not even a close
        if not upstream_side:
            self._send(pair, pair.upstream, data)
            return
        pair.pending += data
        for unit in self._units(pair):
            if unit[:1] == b"$":
                if pair.mode == "stall":
                    self.rtp_dropped += 1
                    continue
                self._count_slices(unit)
                unit = self._maybe_corrupt(unit)
            elif pair.mode == "stall":
                self.rtsp_while_stalled += 1
            if not self._send(pair, pair.client, unit):
                return

    @staticmethod
    def _units(pair: _Pair):
        """Whole RTSP messages and interleaved frames from the front of pair.pending."""
        buf = pair.pending
        while buf:
            if buf[:1] == b"$":
                if len(buf) < 4:
                    return
                end = 4 + struct.unpack("!H", buf[2:4])[0]
            else:
                head = buf.find(b"\r\n\r\n")
                if head < 0:
                    return
                end = head + 4 + _content_length(bytes(buf[:head]))
            if len(buf) < end:
                return
            unit = bytes(buf[:end])
            del buf[:end]
            yield unit

    def _count_slices(self, unit: bytes) -> None:
        """Count the slice NAL units that start in this RTP packet (RFC 6184: single NAL, STAP-A, FU-A)."""
        if unit[1] % 2 or len(unit) < 4 + RTP_HEADER + 2:
            return
        rtp = unit[4:]
        payload = rtp[_rtp_header_length(rtp) :]
        if not payload:
            return
        kind = payload[0] & 0x1F
        if kind == 24:  # STAP-A: 16-bit size + NAL, repeated
            types, i = [], 1
            while i + 2 < len(payload):
                size = struct.unpack("!H", payload[i : i + 2])[0]
                types.append(payload[i + 2] & 0x1F)
                i += 2 + size
        elif kind == 28:  # FU-A: a slice starts in the fragment with the S bit
            types = [payload[1] & 0x1F] if payload[1] & 0x80 else []
        else:
            types = [kind]
        starts = sum(t in (1, 5) for t in types)
        if starts:
            with self._lock:
                ts = rtp[4:8]
                self._slices[ts] = self._slices.get(ts, 0) + starts
                while len(self._slices) > 1000:
                    self._slices.popitem(last=False)

    def _maybe_corrupt(self, unit: bytes) -> bytes:
        # Past the interleave header, the RTP header (with its CSRCs and extension) and two payload
        # bytes (NAL/FU headers): the depayloader still accepts the packet and the decoder gets garbage.
        start = 4 + _rtp_header_length(unit[4:]) + 2
        with self._lock:
            if self._corrupt_left <= 0 or unit[1] % 2 or start >= len(unit):  # odd channels: RTCP, left alone
                return unit
            self._corrupt_left -= 1
            self.rtp_corrupted += 1
        body = bytearray(unit)
        for i in range(start, len(body), 7):
            body[i] ^= 0xFF
        return bytes(body)

    def _send(self, pair: _Pair, sock: socket.socket, data: bytes) -> bool:
        """Send all of `data`; a send stuck for 2 s closes the connection (a half-sent unit would garble
        the framing) and is counted in send_failures. Loopback at test rates never comes near that, so
        a blocking send is simpler than write buffering."""
        sock.setblocking(True)
        sock.settimeout(2)
        try:
            sock.sendall(data)
            return True
        except OSError:
            self.send_failures += 1
            self._drop(pair)
            return False
        finally:
            with contextlib.suppress(OSError):
                sock.setblocking(False)

    def _drop(self, pair: _Pair) -> None:
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)
        for sock in {pair.client, pair.upstream}:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            sock.close()


def _rtp_header_length(rtp: bytes | bytearray) -> int:
    """12 bytes, plus 4 per CSRC, plus the header extension if the X bit is set (RFC 3550 5.1, 5.3.1)."""
    if len(rtp) < RTP_HEADER:
        return len(rtp)
    length = RTP_HEADER + 4 * (rtp[0] & 0x0F)
    if rtp[0] & 0x10 and len(rtp) >= length + 4:
        length += 4 + 4 * struct.unpack("!H", rtp[length + 2 : length + 4])[0]
    return length


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip() or 0)
    return 0
