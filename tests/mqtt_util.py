"""A real Mosquitto broker (Debian's `mosquitto`) for integration tests, and an MQTT consumer that records.

>>> with Mosquitto(tmp_path, users={"bridge": "pw"}) as broker:
...     broker.wait_ready()
...     broker.restart()          # SIGTERM (it saves its persistence file), then the same port again

127.0.0.1 on a free port, authentication on (no anonymous clients), persistence on: a restart keeps
the persistent sessions and their queued QoS 1 messages, as a broker in a plant would.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

from support import dies_with_tests, free_port, wait_until

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")


class Mosquitto:
    def __init__(self, workdir: Path, users: dict[str, str]):
        if MOSQUITTO is None or MOSQUITTO_PASSWD is None:
            raise FileNotFoundError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        passwd = self.workdir / "passwd"
        for i, (user, password) in enumerate(users.items()):
            subprocess.run(
                [MOSQUITTO_PASSWD, "-b", *(["-c"] if i == 0 else []), str(passwd), user, password],
                check=True,
                capture_output=True,
            )
        passwd.chmod(0o600)
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    "allow_anonymous false",
                    f"password_file {passwd}",
                    "persistence true",
                    f"persistence_location {self.workdir}/",
                    "autosave_interval 1",
                    f"log_dest file {self.workdir}/mosquitto.log",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "user root",
                    "max_queued_messages 100000",
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen(
            dies_with_tests([MOSQUITTO, "-c", str(self.conf)]), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        def listening() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited {self.proc.returncode}:\n{self.log()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, timeout, lambda: f"mosquitto listening on {self.port}:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()
        self.wait_ready()

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text() if path.exists() else ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Recorder:
    """A paho consumer (persistent session, QoS 1) that keeps every message it receives, in order."""

    def __init__(self, port: int, user: str, password: str, topic: str = "#", client_id: str = "test-recorder"):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []  # (topic, payload, retained)
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.username_pw_set(user, password)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, _client, _userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def snapshot(self) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
