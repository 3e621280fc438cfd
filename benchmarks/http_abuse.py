"""The daemon's HTTP server against connections that never finish their request (slowloris), side by side
with cheroot and waitress, the production WSGI servers one would reach for.

    python benchmarks/http_abuse.py                       # 2000 half-open connections, every server
    python benchmarks/http_abuse.py --connections 500 --server inspectd

Each server runs in a process of its own (`--serve KIND --port P`), serving a small WSGI app: `/`
(a 2 KB page, as /metrics) and `/stream` (an endless multipart response, as the live view's MJPEG).
This process opens one stream, then N connections that send half a request line and headers
(`GET / HTTP/1.1\\r\\nHost: x\\r\\n`) and then one more header line a second (slowloris: a per-read
timeout never fires), and after 5 s of that asks for `/` 20 times with a 5 s timeout.
Reported: how many of those were answered and the slowest, whether the stream kept flowing, the
server's threads and RSS with the connections open. cheroot and waitress are not dependencies of
inspectd: `pip install cheroot waitress` to run their rows.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = b"x" * 2048


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/stream":
        start_response("200 OK", [("Content-Type", "multipart/x-mixed-replace; boundary=frame")])

        def parts():
            while True:
                yield b"--frame\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\ntick\r\n"
                time.sleep(0.2)

        return parts()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(PAGE)))])
    return [PAGE]


def serve(kind: str, port: int) -> None:
    if kind == "inspectd":
        sys.path.insert(0, str(ROOT))
        from inspectd.service.web import WebServer

        server = WebServer(app, "127.0.0.1", port, section="bench", what="bench", name="bench-http")
        server.start()
        threading.Event().wait()
    elif kind == "cheroot":
        from cheroot import wsgi

        wsgi.Server(("127.0.0.1", port), app, numthreads=16, timeout=10).safe_start()
    elif kind == "waitress":
        import waitress

        waitress.serve(
            app,
            host="127.0.0.1",
            port=port,
            threads=16,
            connection_limit=4000,
            channel_timeout=30,
            asyncore_use_poll=True,
            _quiet=True,
        )
    else:
        raise SystemExit(f"unknown server {kind}")


def _proc(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith(field + ":")))


def _get(port: int, timeout: float = 5.0) -> float | None:
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return time.monotonic() - start if data.startswith(b"HTTP/1.") and b" 200 " in data[:20] else None
    except OSError:
        return None


def measure(kind: str, connections: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)], cwd=ROOT)
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 60
        while _get(port, 1.0) is None:
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"{kind}: did not start")
            time.sleep(0.2)
        stream = socket.create_connection(("127.0.0.1", port), timeout=5)
        stream.sendall(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        stream.recv(4096)
        opened = 0
        for _ in range(connections):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
                held.append(sock)
                opened += 1
            except OSError:
                break
        stop = threading.Event()

        def trickle() -> None:  # slowloris: a header line a second on every connection, never the end
            while not stop.wait(1.0):
                for sock in held:
                    try:
                        sock.send(b"X-a: b\r\n")
                    except OSError:
                        pass

        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(5.0)  # five seconds of it, then look at the server
        threads, rss = _proc(server.pid, "Threads"), _proc(server.pid, "VmRSS") // 1024
        times = [_get(port) for _ in range(20)]
        answered = [t for t in times if t is not None]
        try:
            stream.settimeout(3)
            flowing = bool(stream.recv(4096))
        except OSError:
            flowing = False
        stream.close()
        stop.set()
        return {
            "server": kind,
            "opened": opened,
            "answered": len(answered),
            "slowest": max(answered, default=None),
            "stream": flowing,
            "threads": threads,
            "rss_mb": rss,
        }
    finally:
        for sock in held:
            sock.close()
        server.kill()
        server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--server", action="append", choices=["inspectd", "cheroot", "waitress"])
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0
    print("| server | half-open connections | `/` answered (of 20) | slowest | stream kept flowing | threads | RSS |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for kind in args.server or ["inspectd", "cheroot", "waitress"]:
        r = measure(kind, args.connections)
        slowest = f"{r['slowest']:.3f} s" if r["slowest"] is not None else "-"
        print(
            f"| {kind} | {r['opened']} | {r['answered']} | {slowest} | {'yes' if r['stream'] else 'no'} | "
            f"{r['threads']} | {r['rss_mb']} MB |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
