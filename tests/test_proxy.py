"""`inspectd proxy`: many daemons' events through one ZeroMQ XSUB/XPUB proxy, untouched, CURVE on both sides.

In-process publishers (real sockets on 127.0.0.1) for the details; three real daemons and the proxy as
a process (`inspectd proxy --config`) for the whole.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import run_cli
from daemon_util import DaemonProcess, camera_toml, daemon_config
from prometheus_client import CollectorRegistry
from support import ROOT, dies_with_tests, free_port, make_inspection, wait_until

from inspectd.bridges.config import load_bridge_settings
from inspectd.bridges.proxy import Proxy
from inspectd.client import AccessError, Subscriber
from inspectd.config import PublishConfig
from inspectd.errors import ConfigError, ExitCode
from inspectd.metrics import Metrics
from inspectd.outputs.publish import Publisher
from inspectd.security import ClientKeys, ServerKeys, generate_keys

MODEL = {"name": "test", "sha256": "0" * 64}


@pytest.fixture()
def keyring(tmp_path: Path) -> Path:
    """keys/daemonN (server pairs), keys/proxy (server pair), keys/bridge + keys/consumer (client pairs),
    keys/daemon-clients (allows the proxy's client key), keys/proxy-clients (allows the consumer)."""
    k = tmp_path / "keys"
    for name in ("daemon0", "daemon1", "daemon2", "proxy", "bridge", "consumer", "stranger"):
        generate_keys(k, name)
    for folder, name in (("daemon-clients", "bridge"), ("proxy-clients", "consumer")):
        (k / folder).mkdir()
        (k / folder / f"{name}.key").write_bytes((k / f"{name}.key").read_bytes())
    return k


def _bridges_toml(tmp_path: Path, daemons: list[str], keyring: Path | None, proxy_port: int) -> Path:
    lines = []
    for i, endpoint in enumerate(daemons):
        lines += ["[[daemons]]", f'endpoint = "{endpoint}"']
        if keyring:
            lines.append(f'server_key = "{keyring}/daemon{i}.key"')
    if keyring:
        lines += ["[client]", f'key = "{keyring}/bridge.key_secret"']
    lines += ["[proxy]", f'endpoint = "tcp://127.0.0.1:{proxy_port}"']
    if keyring:
        lines += [f'curve_secret_key = "{keyring}/proxy.key_secret"', f'curve_clients = "{keyring}/proxy-clients"']
    path = tmp_path / "bridges.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_three_publishers_through_the_proxy_with_curve_on_both_sides(tmp_path, keyring):
    pubs = [
        Publisher(
            PublishConfig(endpoint="tcp://127.0.0.1:0", heartbeat_s=0.2),
            Metrics(CollectorRegistry()),
            run_id=f"run{i}",
            model=MODEL,
            stats=lambda i=i: {"cameras": {f"line{i}-top": "up"}},
            keys=ServerKeys.load(keyring / f"daemon{i}.key_secret", keyring / "daemon-clients"),
        )
        for i in range(3)
    ]  # heartbeats name their daemon's camera, as a daemon's do
    for pub in pubs:
        pub.start()
    proxy = Proxy(load_bridge_settings(_bridges_toml(tmp_path, [p.endpoint for p in pubs], keyring, free_port())))
    proxy.start()
    try:
        consumer = ClientKeys.load(keyring / "consumer.key_secret", keyring / "proxy.key")
        with Subscriber(proxy.endpoint, ["defect.", "heartbeat"], curve=consumer) as sub:
            heard: list = []
            wait_until(lambda: _heard_all(sub, 3, heard), 20, "heartbeats of all three daemons through the proxy")
            for seq in range(1, 41):
                for i, pub in enumerate(pubs):
                    pub.publish_inspection(make_inspection(camera=f"line{i}-top", seq=seq), MODEL)
            got = []
            wait_until(lambda: _collect(sub, got, heard) >= 120, 30, lambda: f"120 defect events, got {len(got)}")
        per_camera = Counter(ev.camera for ev in got)
        assert per_camera == {"line0-top": 40, "line1-top": 40, "line2-top": 40}, per_camera
        for i in range(3):  # untouched: each daemon's own run_id and seq 1..40, in order, no gap, no restart
            mine = [ev for ev in got if ev.camera == f"line{i}-top"]
            assert {ev.header["run_id"] for ev in mine} == {f"run{i}"}
            assert [ev.header["seq"] for ev in mine] == list(range(1, 41))
        assert not any(ev.gap or ev.restarted for ev in got + heard) and sub.gaps == {}  # heartbeats interleaved too
        assert len({ev.header["run_id"] for ev in heard}) == 3
        assert all(ev.mask is not None for ev in got)
        stranger = ClientKeys.load(keyring / "stranger.key_secret", keyring / "proxy.key")
        with Subscriber(proxy.endpoint, ["defect."], curve=stranger) as sub:
            with pytest.raises(AccessError, match="refused our CURVE key"):
                sub.recv(timeout_s=5)
    finally:
        proxy.stop()
        for pub in pubs:
            pub.stop()


def _heard_all(sub: Subscriber, n: int, heartbeats: list) -> bool:
    """Receive what is there (heartbeats kept); True once `n` runs were heard."""
    _collect(sub, [], heartbeats)
    return len({ev.header["run_id"] for ev in heartbeats}) >= n


def _collect(sub: Subscriber, into: list, heartbeats: list | None = None) -> int:
    """Defect events into `into` (heartbeats into `heartbeats`); -> how many defect events so far."""
    while (ev := sub.recv(timeout_s=0.05)) is not None:
        if ev.kind.value == "defect":
            into.append(ev)
        elif heartbeats is not None and ev.kind.value == "heartbeat":
            heartbeats.append(ev)
    return len(into)


def test_plain_and_curve_daemons_cannot_share_a_proxy(tmp_path, keyring):
    path = tmp_path / "bridges.toml"
    path.write_text(
        f'[[daemons]]\nendpoint = "tcp://127.0.0.1:1"\nserver_key = "{keyring}/daemon0.key"\n'
        f'[[daemons]]\nendpoint = "tcp://127.0.0.1:2"\n[client]\nkey = "{keyring}/bridge.key_secret"\n'
    )
    with pytest.raises(ConfigError, match="every \\[\\[daemons\\]\\] has a server_key"):
        Proxy(load_bridge_settings(path)).start()


def test_bridge_config_errors_name_the_key(tmp_path):
    path = tmp_path / "bridges.toml"
    path.write_text('[[daemons]]\nendpoint = "tcp://linepc3:5556"\n[proxy]\nendpiont = "tcp://127.0.0.1:5560"\n')
    with pytest.raises(ConfigError, match="proxy.endpiont: unknown key; did you mean proxy.endpoint"):
        load_bridge_settings(path)
    path.write_text("[proxy]\n")
    with pytest.raises(ConfigError, match="daemons: .*no \\[\\[daemons\\]\\]"):
        load_bridge_settings(path)
    path.write_text('[[daemons]]\nendpoint = "tcp://linepc3:5556"\nserver_key = "k.key"\n')
    with pytest.raises(ConfigError, match="set \\[client\\] key"):
        load_bridge_settings(path)
    os.chmod(path, 0o666)
    path.write_text('[[daemons]]\nendpoint = "tcp://linepc3:5556"\n')
    with pytest.raises(ConfigError, match="writable by group or others"):
        load_bridge_settings(path)
    os.chmod(path, 0o644)
    assert load_bridge_settings(path).daemons[0].endpoint == "tcp://linepc3:5556"


@pytest.mark.slow
def test_three_daemons_and_one_proxy_process_every_defect_event_no_gap(tmp_path, keyring):
    """Three real daemons (CURVE, a server key each) -> `inspectd proxy` (a process, CURVE both sides) -> one
    subscriber: every camera's defect events arrive, each daemon's seqs consecutive, at 4 defects/s per line."""
    daemons, endpoints = [], []
    try:
        for i in range(3):
            folder = tmp_path / f"d{i}"
            folder.mkdir()
            cams = camera_toml(f"line{i}-top", f"synthetic://?fps=4&width=160&height=128&defect_rate=1&seed={i}")
            config, urls = daemon_config(
                folder,
                cams,
                publish={
                    "curve_secret_key": str(keyring / f"daemon{i}.key_secret"),
                    "curve_clients": str(keyring / "daemon-clients"),
                },
            )
            daemons.append((DaemonProcess(config, folder / "daemon.log"), urls))
            endpoints.append(urls["events"])
        for daemon, urls in daemons:
            daemon.wait_ready(urls["metrics"])
        proxy_port = free_port()
        config = _bridges_toml(tmp_path, endpoints, keyring, proxy_port)
        log = open(tmp_path / "proxy.log", "w")
        proxy = subprocess.Popen(
            dies_with_tests([sys.executable, "-m", "inspectd", "proxy", "--config", str(config)]),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            consumer = ClientKeys.load(keyring / "consumer.key_secret", keyring / "proxy.key")
            got: list = []
            beats: list = []
            with Subscriber(f"tcp://127.0.0.1:{proxy_port}", ["defect.", "heartbeat"], curve=consumer) as sub:
                wait_until(
                    lambda: (
                        min(Counter(ev.camera for ev in got).get(f"line{i}-top", 0) for i in range(3)) >= 12
                        if _collect(sub, got, beats)
                        else False
                    ),
                    90,
                    lambda: (
                        f"12 defect events per line through the proxy: {Counter(ev.camera for ev in got)}, "
                        f"proxy log:\n{(tmp_path / 'proxy.log').read_text()}"
                    ),
                )
            for i in range(3):
                mine = [ev.header["seq"] for ev in got if ev.camera == f"line{i}-top"]
                assert mine == list(range(mine[0], mine[0] + len(mine))), (i, mine)  # consecutive: no gap
            assert not any(ev.gap or ev.restarted for ev in got + beats) and sub.gaps == {}
            assert len({ev.header["run_id"] for ev in got}) == 3 == len({ev.header["run_id"] for ev in beats})
            proxy.send_signal(signal.SIGTERM)
            assert proxy.wait(15) == 0
        finally:
            if proxy.poll() is None:
                proxy.kill()
            log.close()
    finally:
        for daemon, _ in daemons:
            daemon.terminate()


def test_proxy_cli_config_error_is_one_line_and_78(tmp_path):
    path = tmp_path / "bridges.toml"
    path.write_text('[[daemons]]\nendpoint = "udp://x"\n')
    r = run_cli("proxy", "--config", path)
    assert r.returncode == ExitCode.CONFIG and r.stderr.count("\n") == 1 and "daemons.0.endpoint" in r.stderr, r.stderr


def test_the_shipped_bridges_example_is_valid():
    settings = load_bridge_settings(ROOT / "deploy" / "bridges.example.toml")
    assert settings.daemons[0].endpoint == "tcp://127.0.0.1:5556" and settings.mqtt.qos == 1
    assert settings.opcua.security == "none" and settings.proxy.endpoint == "tcp://127.0.0.1:5560"
