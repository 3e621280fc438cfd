"""The fault proxy itself (tcp_proxy.py), against a plain TCP server: each fault does what its name says.

test_network_faults.py relies on these behaviours; checking them here means a fault test that passes
did face the fault it names.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from support import wait_until
from tcp_proxy import TcpProxy, _rtp_header_length

RTSP_REPLY = b"RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Length: 3\r\n\r\nabc"
RTP = b"$\x00\x00\x10" + bytes(range(16))  # channel 0 (RTP), 16 bytes: 12 header + 4 payload
RTCP = b"$\x01\x00\x04" + b"rtcp"


class Upstream:
    """A TCP server that sends what the test gives it to its (single) client and records what it gets."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conn: socket.socket | None = None
        self.accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        try:
            self.conn, _ = self.server.accept()
        except OSError:  # closed before anyone connected (the blackhole test)
            return
        self.conn.settimeout(5)
        self.accepted.set()

    def close(self):
        if self.conn is not None:
            self.conn.close()
        self.server.close()


@pytest.fixture()
def path():
    upstream = Upstream()
    with TcpProxy(upstream.port) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        assert upstream.accepted.wait(5)
        wait_until(lambda: proxy.open_connections == 1, 5, "the proxy to hold the connection")
        yield upstream, proxy, client
        client.close()
        proxy.check()
    upstream.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"closed after {len(out)} of {n} bytes"
        out += chunk
    return out


def silent(sock: socket.socket, seconds: float = 0.5) -> bool:
    """Nothing arrives, not even an end of stream, for `seconds`."""
    sock.settimeout(seconds)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)
    return False


def test_passes_both_ways_whole_units(path):
    upstream, _, client = path
    request = b"OPTIONS rtsp://x/cam RTSP/1.0\r\nCSeq: 1\r\n\r\n"
    client.sendall(request)
    assert recv_exactly(upstream.conn, len(request)) == request
    upstream.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for chunk in (RTSP_REPLY[:10], RTSP_REPLY[10:] + RTP[:3], RTP[3:] + RTCP):  # units split across reads
        upstream.conn.sendall(chunk)
        time.sleep(0.05)  # pacing the sender (not a wait for a result): the proxy reads each chunk apart
    assert recv_exactly(client, len(RTSP_REPLY + RTP + RTCP)) == RTSP_REPLY + RTP + RTCP


def test_cut_is_half_open(path):
    upstream, proxy, client = path
    assert proxy.cut() == 1
    upstream.conn.sendall(RTSP_REPLY + RTP)
    client.sendall(b"GET_PARAMETER rtsp://x/cam RTSP/1.0\r\nCSeq: 3\r\n\r\n")
    assert silent(client) and silent(upstream.conn)  # no data, and no FIN or RST either way


def test_stall_drops_media_and_keeps_the_session(path):
    upstream, proxy, client = path
    proxy.stall()
    upstream.conn.sendall(RTP + RTSP_REPLY + RTCP + RTP)
    assert recv_exactly(client, len(RTSP_REPLY)) == RTSP_REPLY and silent(client)
    assert proxy.rtp_dropped == 3 and proxy.rtsp_while_stalled == 1


def test_corrupt_flips_rtp_payload_only(path):
    upstream, proxy, client = path
    proxy.corrupt(1)
    upstream.conn.sendall(RTP + RTCP + RTP)
    got = recv_exactly(client, len(RTP + RTCP + RTP))
    first, rtcp, second = got[: len(RTP)], got[len(RTP) : len(RTP + RTCP)], got[len(RTP + RTCP) :]
    assert first[: 4 + 12 + 2] == RTP[:18] and first[18:] != RTP[18:]  # framing, RTP header, NAL header kept
    assert rtcp == RTCP and second == RTP and proxy.rtp_corrupted == 1


def test_blackhole_accepts_and_never_answers():
    upstream = Upstream()
    with TcpProxy(upstream.port) as proxy:
        proxy.blackhole(True)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            client.sendall(b"OPTIONS rtsp://x/cam RTSP/1.0\r\nCSeq: 1\r\n\r\n")
            assert silent(client) and not upstream.accepted.is_set()
            proxy.blackhole(False)
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5):
                assert upstream.accepted.wait(5)  # a new connection gets through again
        proxy.check()
    upstream.close()


@pytest.mark.parametrize(
    "first, rest, length",
    [
        (0x80, b"", 12),  # V=2, no CSRC, no extension
        (0x82, b"", 20),  # 2 CSRCs
        (0x90, struct.pack("!HH", 0xBEDE, 2) + bytes(8), 24),  # extension of 2 words
    ],
)
def test_rtp_header_length(first, rest, length):
    header = bytes([first]) + bytes(11) + bytes(4 * (first & 0x0F)) + rest
    assert _rtp_header_length(header + b"payload") == length
