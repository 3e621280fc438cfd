"""CURVE on the daemon's sockets (real ZeroMQ on 127.0.0.1), key files and their modes, loopback detection,
password hashes, the config-file checks, and two real daemons (plain text on the network; CURVE with `watch`)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from conftest import run_cli
from daemon_util import DaemonProcess, camera_toml, daemon_config
from prometheus_client import CollectorRegistry
from support import ROOT, free_port, http_get, make_inspection, metric_value, wait_until

from inspectd.client import AccessError, ReplayClient, ReplayError, Subscriber
from inspectd.config import PublishConfig, ReplayConfig, load_settings
from inspectd.errors import ConfigError, ExitCode, UsageError
from inspectd.metrics import Metrics
from inspectd.outputs.publish import Publisher
from inspectd.outputs.replay import ReplayServer, Ring
from inspectd.security import (
    ClientKeys,
    PasswordCheck,
    ServerKeys,
    generate_keys,
    hash_password,
    is_loopback_endpoint,
    private_file,
)

MODEL = {"name": "test", "sha256": "0" * 64}


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    """A server pair, an allowed client ("good", its .key in clients/) and an unknown one ("stranger")."""
    generate_keys(tmp_path, "server")
    generate_keys(tmp_path / "clients", "good")
    generate_keys(tmp_path, "stranger")
    (tmp_path / "clients" / "good.key_secret").rename(tmp_path / "good.key_secret")  # the allow-list holds public keys
    return {
        "server_secret": tmp_path / "server.key_secret",
        "server_public": tmp_path / "server.key",
        "clients": tmp_path / "clients",
        "good": tmp_path / "good.key_secret",
        "stranger": tmp_path / "stranger.key_secret",
    }


def _refused(metrics: Metrics, socket_name: str, reason: str) -> float:
    return (
        metrics.registry.get_sample_value("inspectd_handshakes_refused_total", {"socket": socket_name, "reason": reason}) or 0.0
    )


def _publisher(keys: dict[str, Path] | None) -> Publisher:
    server_keys = ServerKeys.load(keys["server_secret"], keys["clients"]) if keys else None
    pub = Publisher(
        PublishConfig(endpoint="tcp://127.0.0.1:0", heartbeat_s=0.1),
        Metrics(CollectorRegistry()),
        run_id="r1",
        model=MODEL,
        keys=server_keys,
    )
    pub.start()
    return pub


def _defects(sub: Subscriber, pub: Publisher, seconds: float) -> int:
    """Publish a defect every 20 ms for `seconds`; the defect events `sub` received."""
    got = 0
    end = time.monotonic() + seconds
    seq = 0
    while time.monotonic() < end:
        seq += 1
        pub.publish_inspection(make_inspection(seq=seq), MODEL)
        event = sub.recv(timeout_s=0.02)
        got += event is not None and event.kind.value == "defect"
    return got


def test_an_allowed_key_receives_events_an_unknown_one_or_plain_text_nothing_and_refusals_are_counted(keys):
    pub = _publisher(keys)

    def refused() -> dict[str, float]:
        return {r: _refused(pub.metrics, "events", r) for r in ("auth", "protocol", "other")}

    try:
        good = ClientKeys.load(keys["good"], keys["server_public"])
        stranger = ClientKeys.load(keys["stranger"], keys["server_public"])
        with Subscriber(pub.endpoint, ["defect."], curve=good) as ok_sub:
            assert _defects(ok_sub, pub, 1.5) > 10
        assert sum(refused().values()) == 0
        with Subscriber(pub.endpoint, ["defect."], curve=stranger) as bad_sub:
            with pytest.raises(AccessError, match="refused our CURVE key"):  # and nothing else
                bad_sub.recv(timeout_s=2.0)
        wait_until(lambda: refused()["auth"] >= 1, 5, lambda: f"the unknown key's refusal counted: {refused()}")
        before = refused()
        with Subscriber(pub.endpoint, ["defect."]) as plain_sub:
            with pytest.raises(AccessError, match="we do not"):
                plain_sub.recv(timeout_s=2.0)
        # The server sees a plain-text client as a protocol error, or without detail when the client hung up first.
        wait_until(
            lambda: refused()["protocol"] + refused()["other"] > before["protocol"] + before["other"],
            5,
            lambda: f"the plain-text client's refusal counted: {refused()}",
        )
    finally:
        pub.stop()


def test_a_client_holding_the_wrong_server_key_receives_nothing(keys, tmp_path, caplog):
    generate_keys(tmp_path / "other", "server")
    pub = _publisher(keys)
    try:
        wrong = ClientKeys.load(keys["good"], tmp_path / "other" / "server.key")
        with Subscriber(pub.endpoint, ["defect."], curve=wrong) as sub:
            with caplog.at_level(logging.WARNING, logger="inspectd.client"):
                assert _defects(sub, pub, 4.0) == 0  # ambiguous on the wire (a cut connection looks the same)
            assert "is the server key the daemon's? (still trying)" in caplog.text  # so a warning, not an error
        assert sum(_refused(pub.metrics, "events", r) for r in ("auth", "protocol", "other")) >= 1
    finally:
        pub.stop()


def test_plain_text_only_when_configured(keys):
    """No keys configured: a plain subscriber receives, and a CURVE client cannot talk to it."""
    pub = _publisher(None)
    try:
        with Subscriber(pub.endpoint, ["defect."]) as sub:
            assert _defects(sub, pub, 1.0) > 5
        with Subscriber(pub.endpoint, ["defect."], curve=ClientKeys.load(keys["good"], keys["server_public"])) as sub:
            with pytest.raises(AccessError, match="daemon uses plain text"):
                _defects(sub, pub, 15.0)  # raises as soon as the handshake fails; 15 s: a deadline on a loaded machine
        assert sum(_refused(pub.metrics, "events", r) for r in ("auth", "protocol", "other")) == 0  # no monitor
    finally:
        pub.stop()


def test_a_refused_subscriber_says_so_and_a_key_added_to_the_allow_list_works_without_a_restart(keys, tmp_path):
    """ZeroMQ never retries a refused key: the subscriber raises AccessError; once its public key is in the
    folder, its next connection gets in (the daemon is not restarted)."""
    pub = _publisher(keys)
    try:
        later = ClientKeys.load(keys["stranger"], keys["server_public"])
        with Subscriber(pub.endpoint, ["defect."], curve=later) as sub:
            with pytest.raises(AccessError, match="refused our CURVE key.*curve_clients"):
                _defects(sub, pub, 2.0)
        (tmp_path / "stranger.key").rename(keys["clients"] / "stranger.key")
        with Subscriber(pub.endpoint, ["defect."], curve=later) as sub:
            assert _defects(sub, pub, 1.0) > 5
        with Subscriber(pub.endpoint, ["defect."]) as sub:
            with pytest.raises(AccessError, match="we do not"):
                # Up to 10 s: a plaintext client is told "protocol" on most attempts, but an attempt the server
                # closes first reads as "other" (not fatal), and ZeroMQ backs off between attempts.
                _defects(sub, pub, 10.0)
    finally:
        pub.stop()


def test_replay_takes_the_same_keys(keys):
    metrics = Metrics(CollectorRegistry())
    ring = Ring(100, 1 << 20)
    ring.add("defect.cam1", 1, [b"defect.cam1", b"{}"])
    server = ReplayServer(
        ReplayConfig(endpoint="tcp://127.0.0.1:0"),
        "r1",
        ring,
        None,
        metrics,
        lambda t: 1,
        ServerKeys.load(keys["server_secret"], keys["clients"]),
    ).start()
    ctx = zmq.Context()
    try:
        good = ReplayClient(ctx, server.endpoint, 5.0, curve=ClientKeys.load(keys["good"], keys["server_public"]))
        messages, end = good.fetch("r1", "defect.cam1", 0)
        assert end["status"] == "complete" and [m[0] for m in messages] == [b"defect.cam1"]
        good.close()
        stranger = ReplayClient(ctx, server.endpoint, 1.0, curve=ClientKeys.load(keys["stranger"], keys["server_public"]))
        with pytest.raises(ReplayError, match="no answer"):
            stranger.fetch("r1", "defect.cam1", 0)
        plain = ReplayClient(ctx, server.endpoint, 1.0)
        with pytest.raises(ReplayError, match="no answer"):
            plain.fetch("r1", "defect.cam1", 0)
        # The plain client: a protocol error, or no detail when it hung up first (as on the events socket).
        wait_until(
            lambda: (
                _refused(metrics, "replay", "auth") >= 1
                and _refused(metrics, "replay", "protocol") + _refused(metrics, "replay", "other") >= 1
            ),
            5,
            "both refusals counted on the replay socket",
        )
    finally:
        server.stop()
        ctx.term()


# -- key files ------------------------------------------------------------------------------------------


def test_generate_writes_a_private_secret_and_a_public_key_and_never_replaces_one(tmp_path):
    public, secret = generate_keys(tmp_path / "k", "server")
    assert (public.stat().st_mode & 0o777, secret.stat().st_mode & 0o777) == (0o644, 0o600)
    assert b"secret-key" not in public.read_bytes() and b"secret-key" in secret.read_bytes()
    before = secret.read_bytes()
    with pytest.raises(UsageError, match="--force"):
        generate_keys(tmp_path / "k", "server")
    assert secret.read_bytes() == before
    generate_keys(tmp_path / "k", "server", force=True)
    assert secret.read_bytes() != before and secret.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_secret_key_others_can_read_is_refused(keys, mode):
    os.chmod(keys["server_secret"], mode)
    with pytest.raises(ConfigError, match=f"mode {mode:04o}.*chmod 600"):
        ServerKeys.load(keys["server_secret"], keys["clients"])
    os.chmod(keys["good"], mode)
    with pytest.raises(ConfigError, match="--client-key"):
        ClientKeys.load(keys["good"], keys["server_public"])


def test_a_public_key_file_is_not_a_secret_key(keys):
    os.chmod(keys["server_public"], 0o600)
    with pytest.raises(ConfigError, match="holds no secret-key"):
        ServerKeys.load(keys["server_public"], keys["clients"])


def test_an_allow_list_that_is_not_a_folder_is_a_config_error(keys, tmp_path):
    with pytest.raises(ConfigError, match="publish.curve_clients.*cannot read the client keys"):
        ServerKeys.load(keys["server_secret"], tmp_path / "missing")


def test_private_file_names_the_key_for_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="metrics.tls_key_file '.*nope': no such file"):
        private_file(tmp_path / "nope", "metrics.tls_key_file")


def test_keys_cli_exit_codes(tmp_path):
    def cli(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "inspectd", "keys", *argv], capture_output=True, text=True, input=stdin, cwd=ROOT, timeout=60
        )

    made = cli("generate", str(tmp_path), "--name", "line3")
    assert made.returncode == 0 and (tmp_path / "line3.key_secret").stat().st_mode & 0o777 == 0o600
    again = cli("generate", str(tmp_path), "--name", "line3")
    assert again.returncode == ExitCode.USAGE and again.stderr.count("\n") == 1 and "exists" in again.stderr
    nobody = cli("generate", str(tmp_path), "--name", "x", "--owner", "no-such-user-here")
    assert nobody.returncode == ExitCode.USAGE and "no such user" in nobody.stderr
    hashed = cli("hash-password", "--rounds", "10", stdin="s3cret\n")
    assert hashed.returncode == 0
    check = PasswordCheck({"prom": hashed.stdout.strip()})
    assert check.check("prom", "s3cret") and not check.check("prom", "s3cret!") and not check.check("other", "s3cret")


def test_password_check_remembers_a_pass_but_never_a_wrong_password():
    check = PasswordCheck({"prom": hash_password("right", rounds=10)})
    assert check.check("prom", "right") and check.check("prom", "right")
    assert not check.check("prom", "wrong") and not check.check("prom", "wrong")
    assert not check.check("prom", "") and not check.check("", "right")


# -- where a socket can be reached from ------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint, loopback",
    [
        ("tcp://127.0.0.1:5556", True),
        ("tcp://127.0.0.2:5556", True),
        ("tcp://localhost:5556", True),
        ("tcp://lo:5556", True),
        ("ipc:///run/inspectd/events", True),
        ("tcp://[::1]:5556", True),
        ("tcp://0.0.0.0:5556", False),
        ("tcp://*:5556", False),
        ("tcp://10.0.3.5:5556", False),
        ("tcp://eth0:5556", False),
    ],
)
def test_is_loopback_endpoint(endpoint, loopback):
    assert is_loopback_endpoint(endpoint) is loopback


# -- the config's own checks --------------------------------------------------------------------------------


def _config(tmp_path: Path, text: str, mode: int = 0o644) -> Path:
    path = tmp_path / "inspectd.toml"
    path.write_text(text + '\n[[cameras]]\nid = "c"\nurl = "synthetic://?fps=5"\n')
    os.chmod(path, mode)
    return path


def test_curve_settings_go_together_and_relative_paths_follow_the_config(keys, tmp_path):
    with pytest.raises(ConfigError, match="curve_secret_key and publish.curve_clients together"):
        load_settings(_config(tmp_path, '[publish]\ncurve_secret_key = "server.key_secret"'))
    s = load_settings(_config(tmp_path, '[publish]\ncurve_secret_key = "server.key_secret"\ncurve_clients = "clients"'))
    assert s.publish.curve_secret_key == str(keys["server_secret"]) and s.publish.curve_clients == str(keys["clients"])


def test_metrics_tls_and_users_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="tls_cert_file and metrics.tls_key_file together"):
        load_settings(_config(tmp_path, '[metrics]\ntls_cert_file = "c.pem"'))
    with pytest.raises(ConfigError, match="user 'prom': not a bcrypt hash"):
        load_settings(_config(tmp_path, '[metrics.basic_auth_users]\nprom = "plaintext"'))
    hashed = hash_password("pw", rounds=10)
    s = load_settings(_config(tmp_path, f'[metrics.basic_auth_users]\nprom = "{hashed}"'))
    assert s.metrics.basic_auth_users == {"prom": hashed}


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_a_config_others_can_write_is_refused(tmp_path, mode):
    with pytest.raises(ConfigError, match=f"writable by group or others \\(mode {mode:04o}\\)"):
        load_settings(_config(tmp_path, "", mode))


def test_a_config_with_a_camera_password_must_not_be_world_readable(tmp_path):
    path = tmp_path / "inspectd.toml"
    path.write_text('[[cameras]]\nid = "c"\nurl = "rtsp://inspect:secret@10.0.3.21/stream"\n')
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="holds passwords and is readable by everyone"):
        load_settings(path)
    os.chmod(path, 0o640)
    assert load_settings(path).cameras[0].id == "c"
    assert load_settings(_config(tmp_path, "", 0o644)).cameras[0].id == "c"  # no password: may be readable


# -- the daemon ---------------------------------------------------------------------------------------------

_DEFECTS = camera_toml("cam-a", "synthetic://?fps=8&width=160&height=128&defect_rate=1&seed=3")


@pytest.mark.slow
def test_a_daemon_open_to_the_network_in_plain_text_warns_and_says_so_on_healthz(tmp_path):
    port = free_port()
    config, urls = daemon_config(tmp_path, _DEFECTS, publish={"endpoint": f"tcp://0.0.0.0:{port}"})
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(urls["metrics"])
        status, body = http_get(urls["metrics"] + "/healthz")
        assert status == 200 and f"events on tcp://0.0.0.0:{port} in plain text, open to the network" in body, body
        assert "WARNING" in daemon.log() and "in plain text, open to the network" in daemon.log()


@pytest.mark.slow
def test_a_curve_daemon_serves_an_allowed_watch_and_refuses_a_stranger_with_exit_77(tmp_path, keys):
    port, replay_port = free_port(), free_port()
    config, urls = daemon_config(
        tmp_path,
        _DEFECTS,
        publish={
            "endpoint": f"tcp://0.0.0.0:{port}",
            "curve_secret_key": str(keys["server_secret"]),
            "curve_clients": str(keys["clients"]),
        },
        replay={"endpoint": f"tcp://0.0.0.0:{replay_port}"},
    )
    endpoint = f"tcp://127.0.0.1:{port}"
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(urls["metrics"])
        assert "open to the network" not in http_get(urls["metrics"] + "/healthz")[1]
        ok = run_cli(
            "watch",
            endpoint,
            "--replay",
            f"tcp://127.0.0.1:{replay_port}",
            "--json",
            "--count",
            "2",
            "--timeout",
            "30",
            "--client-key",
            keys["good"],
            "--server-key",
            keys["server_public"],
            timeout=60,
        )
        headers = [json.loads(line) for line in ok.stdout.splitlines()]
        assert ok.returncode == 0 and [h["topic"] for h in headers] == ["defect.cam-a"] * 2, ok.stderr
        refused = run_cli(
            "watch",
            endpoint,
            "--timeout",
            "30",
            "--client-key",
            keys["stranger"],
            "--server-key",
            keys["server_public"],
            timeout=60,
        )
        assert refused.returncode == ExitCode.NO_PERMISSION, refused.stderr
        assert refused.stderr.count("\n") == 1 and "refused our CURVE key" in refused.stderr, refused.stderr
        # Plain text against CURVE: refused for sure (77) when the client sees the mechanism mismatch; when the
        # daemon hangs up first, the client cannot tell that from a cut connection: a warning, then --timeout.
        plain = run_cli("watch", endpoint, "--timeout", "8", timeout=60)
        assert (plain.returncode == ExitCode.NO_PERMISSION and "we do not" in plain.stderr) or (
            plain.returncode == 1 and "does the daemon use CURVE (--client-key/--server-key)?" in plain.stderr
        ), plain
        wait_until(
            lambda: (
                (metric_value(urls["metrics"], "inspectd_handshakes_refused_total", socket="events", reason="auth") or 0) >= 1
            ),
            10,
            "the refusal in the daemon's metrics",
        )


def test_check_config_loads_the_keys_as_run_would(keys, tmp_path):
    config = _config(tmp_path, f'[publish]\ncurve_secret_key = "{keys["server_secret"]}"\ncurve_clients = "{keys["clients"]}"')
    assert run_cli("check-config", "--config", config, "--no-model").returncode == 0
    os.chmod(keys["server_secret"], 0o640)
    bad = run_cli("check-config", "--config", config, "--no-model")
    assert bad.returncode == ExitCode.CONFIG and "publish.curve_secret_key" in bad.stderr and "chmod 600" in bad.stderr


def test_the_allow_list_follows_keys_added_replaced_in_place_and_removed(keys, tmp_path):
    allow = ServerKeys.load(keys["server_secret"], keys["clients"]).allow
    good = keys["clients"] / "good.key"
    good_public, _ = zmq.auth.load_certificate(good)
    stranger_public, _ = zmq.auth.load_certificate(tmp_path / "stranger.key")
    assert allow.callback("*", good_public) and not allow.callback("*", stranger_public)
    good.write_bytes((tmp_path / "stranger.key").read_bytes())  # replaced in place: same name, another key
    assert allow.callback("*", stranger_public) and not allow.callback("*", good_public)
    good.unlink()  # removed
    assert not allow.callback("*", stranger_public)


def test_an_unknown_user_costs_what_a_known_one_does():
    """The comparison for a user that does not exist runs at the configured hashes' cost (timing does not
    tell users apart): the dummy hash is made at the highest cost configured."""
    check = PasswordCheck({"a": hash_password("x", rounds=10), "b": hash_password("y", rounds=11)})
    assert check._dummy.startswith(b"$2b$11$")
    assert not check.check("nobody", "x") and check.check("b", "y")


def test_a_bridge_style_subscriber_goes_on_and_tries_a_refusing_daemon_again(keys, tmp_path, monkeypatch):
    """With on_refused (the bridges), a refusal is reported, not raised; the endpoint is connected anew
    after a wait, so a key added to the daemon's folder meanwhile gets in without restarting anything."""
    import inspectd.client

    monkeypatch.setattr(inspectd.client, "_REFUSED_RETRY_S", (0.5, 1.0))
    pub = _publisher(keys)
    refusals: list[str] = []
    try:
        later = ClientKeys.load(keys["stranger"], keys["server_public"])
        with Subscriber(pub.endpoint, ["defect."], curve=later, on_refused=lambda e, why: refusals.append(why)) as sub:
            wait_until(lambda: _defects(sub, pub, 0.1) == 0 and refusals, 10, "the refusal reported")
            assert "refused our CURVE key" in refusals[0] and "trying again in 0.5 s" in refusals[0]
            (tmp_path / "stranger.key").rename(keys["clients"] / "stranger.key")
            wait_until(lambda: _defects(sub, pub, 0.2) > 0, 20, lambda: f"events after the key was added: {refusals}")
    finally:
        pub.stop()


def test_a_bcrypt_cost_out_of_range_is_a_config_error(tmp_path):
    hashed = hash_password("pw", rounds=10)
    for cost in ("03", "31"):
        with pytest.raises(ConfigError, match=f"bcrypt cost {int(cost)}: 4-15 expected"):
            load_settings(_config(tmp_path, f'[metrics.basic_auth_users]\nprom = "{hashed[:4]}{cost}{hashed[6:]}"'))
