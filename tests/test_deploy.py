"""deploy/: the systemd unit (systemd-analyze verify and security) and install.sh (in throwaway roots).

The install tests must stay offline and fast, so they never let pip fetch TensorFlow: install.sh gets
a wheel of inspectd built here (`--source WHEEL`) and INSPECTD_PIP_ARGS="--no-index --no-deps", so
each release venv holds inspectd alone. Its dependencies come from this test's own venv through
PYTHONPATH, which install.sh keeps away from venv/pip (they would see, and skip, packages that are
not in the venv) but passes to its `check-config` step and which the tests pass to the installed
`inspectd`. The venv is made from this interpreter (`--python`), so compiled packages match.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from support import unshare_unavailable

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "inspectd.service"
INSTALL = ROOT / "deploy" / "install.sh"
MAX_EXPOSURE = 2.5
ENTRY_POINT = "opt/inspectd/venv/bin/inspectd"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is missing (Debian package systemd)")


# ---- the unit ----------------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (systemd keys may repeat: DeviceAllow=, Environment=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def systemd_root(root: Path) -> Path:
    """Make ROOT usable by `systemd-analyze verify --root=ROOT`: it resolves everything inside ROOT, so
    it needs the host's unit files (the targets our unit is ordered against) and /bin/kill (ExecReload)."""
    for link in ("bin", "sbin", "lib"):
        host = Path("/") / link
        if host.is_symlink() and not os.path.lexists(root / link):
            os.symlink(os.readlink(host), root / link)
    (root / "usr" / "bin").mkdir(parents=True, exist_ok=True)
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy2(os.path.realpath("/bin/kill"), root / "bin" / "kill")
    for units in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        src = Path(units).resolve()
        dst = root / src.relative_to("/")
        if src.is_dir() and not dst.exists():
            shutil.copytree(src, dst, symlinks=True)
    return root


def verify(root: Path, unit: str = "inspectd.service") -> list[str]:
    """`systemd-analyze verify --root=ROOT UNIT`: its complaints about our unit.

    verify exits 0 even for unknown keys or unparsable values (it only prints them), so every line
    naming the unit or its file counts; lines about the host's own units do not."""
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={root}", unit], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    complaints = [line for line in lines if "inspectd" in line]
    if proc.returncode != 0:
        complaints.append(f"exit status {proc.returncode}: {lines}")
    return complaints


def test_the_unit_keeps_the_contract_with_the_daemon():
    unit = parse_unit(UNIT)
    svc, unit_sec = unit["Service"], unit["Unit"]
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["main"]
    assert svc["WatchdogSec"] == ["30"]
    assert svc["ExecStart"] == ["/opt/inspectd/venv/bin/inspectd run --config /etc/inspectd/config.toml"]
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["Restart"] == ["on-failure"] and "StartLimitBurst" in unit_sec and "StartLimitIntervalSec" in unit_sec
    assert int(svc["TimeoutStartSec"][0]) >= 300
    assert svc["User"] == ["inspectd"] and "DynamicUser" not in svc
    assert svc["StateDirectory"] == ["inspectd"] and svc["ConfigurationDirectory"] == ["inspectd"]
    env = " ".join(svc["Environment"]).split()
    assert "PYTHONUNBUFFERED=1" in env and "TF_CPP_MIN_LOG_LEVEL=2" in env
    # GPUs and cameras stay reachable: the real /dev, a closed device policy with them let through.
    assert svc["PrivateDevices"] == ["no"] and svc["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in svc["DeviceAllow"]}
    assert {"char-nvidia-frontend", "char-nvidia-uvm", "char-video4linux"} <= allowed
    # TensorFlow (oneDNN), XLA and the CUDA driver generate code at run time.
    assert svc.get("MemoryDenyWriteExecute", ["no"]) == ["no"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


# The bridges' units: (file in deploy/, the unit name verified: a template needs an instance).
BRIDGE_UNITS = (
    ("inspectd-bridge@.service", "inspectd-bridge@mqtt.service"),
    ("inspectd-bridge@.service", "inspectd-bridge@opcua.service"),
    ("inspectd-proxy.service", "inspectd-proxy.service"),
)


@needs_systemd_analyze
@pytest.mark.parametrize("file, name", [("inspectd.service", "inspectd.service"), *BRIDGE_UNITS])
def test_the_unit_verifies_without_complaints(tmp_path, file, name):
    root = systemd_root(tmp_path)
    entry = root / ENTRY_POINT  # verify checks that ExecStart's binary exists and is executable
    entry.parent.mkdir(parents=True)
    entry.write_text("#!/bin/sh\nexit 0\n")
    entry.chmod(0o755)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    shutil.copy2(ROOT / "deploy" / file, root / "etc" / "systemd" / "system" / file)
    assert verify(root, name) == []


@needs_systemd_analyze
@pytest.mark.parametrize("file, name", [("inspectd.service", "inspectd.service"), BRIDGE_UNITS[0], BRIDGE_UNITS[2]])
def test_verify_does_see_mistakes(tmp_path, file, name):
    """The check above means something: a typo and a missing binary are reported, for every unit."""
    root = systemd_root(tmp_path)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    text = (ROOT / "deploy" / file).read_text()
    assert "RestartSec=" in text
    (root / "etc" / "systemd" / "system" / file).write_text(
        re.sub(r"RestartSec=\d+", "RestartSec=ten", text).replace("[Install]", "Bogus=1\n[Install]")
    )
    complaints = "\n".join(verify(root, name))
    assert "RestartSec" in complaints or "ten" in complaints
    assert "Bogus" in complaints
    assert "/opt/inspectd/venv/bin/inspectd" in complaints


@pytest.mark.parametrize("file, command", [("inspectd-bridge@.service", "bridge %i"), ("inspectd-proxy.service", "proxy")])
def test_bridge_units_run_the_bridges_as_the_service_user(file, command):
    svc = parse_unit(ROOT / "deploy" / file)["Service"]
    assert svc["ExecStart"] == [f"/opt/inspectd/venv/bin/inspectd {command} --config /etc/inspectd/bridges.toml"]
    assert svc["User"] == ["inspectd"] and svc["RestartPreventExitStatus"] == ["78"]
    assert svc["MemoryDenyWriteExecute"] == ["yes"] and svc["PrivateDevices"] == ["yes"]


@needs_systemd_analyze
@pytest.mark.parametrize("file", ["inspectd.service", "inspectd-bridge@.service", "inspectd-proxy.service"])
def test_the_unit_exposure_score_is_low(file):
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(ROOT / "deploy" / file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    match = re.search(r"Overall exposure level for inspectd[-a-z@]*\.service:\s*([0-9.]+)", out)
    assert match, out
    assert float(match.group(1)) <= MAX_EXPOSURE, out


def test_install_sh_passes_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is missing (apt-get install shellcheck)")
    proc = subprocess.run([shellcheck, "--severity=style", str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_install_sh_help_and_bad_options():
    proc = subprocess.run([str(INSTALL), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "--gstreamer" in proc.stdout and "--slim" in proc.stdout and "DESTDIR" in proc.stdout
    for options, said in ((["--frobnicate"], "unknown option: --frobnicate"), (["--slim", "--gpu"], "--slim and --gpu")):
        proc = subprocess.run(
            [str(INSTALL), *options],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "DESTDIR": "/nonexistent-should-not-be-created"},
        )
        assert proc.returncode != 0 and said in proc.stderr, options
        assert not os.path.exists("/nonexistent-should-not-be-created")


# ---- install.sh --------------------------------------------------------------------------------------

SITE_PACKAGES = sysconfig.get_path("purelib")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """inspectd as a wheel, built offline with this venv's setuptools from a copy of the tree."""
    pytest.importorskip("setuptools", reason="building the test wheel offline needs setuptools in this venv")
    pytest.importorskip("wheel", reason="building the test wheel offline needs wheel in this venv")
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "inspectd", src / "inspectd", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_offline_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("inspectd-*.whl")
    return whl


def _offline_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "INSPECTD_")) and k not in ("DESTDIR", "PYTHONPATH")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", TF_CPP_MIN_LOG_LEVEL="3")
    env.update(extra)
    return env


def install(
    wheel: Path,
    *args: str,
    destdir: Path | None,
    python: str | None = sys.executable,
    check: bool = True,
    prefix: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    env = _offline_env(INSPECTD_PIP_ARGS="--no-index --no-deps", PYTHONPATH=SITE_PACKAGES)
    if destdir is not None:
        env["DESTDIR"] = str(destdir)
    cmd = [*prefix, str(INSTALL), "--source", str(wheel), *(("--python", python) if python else ()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=wheel.parent)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def manifest(root: Path) -> dict[str, tuple]:
    """Every path under ROOT except the release venvs: mode, link target or content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("opt/inspectd/releases/"):
            continue
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def run_installed(dest: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*args], capture_output=True, text=True, timeout=120, cwd=dest, env=_offline_env(PYTHONPATH=SITE_PACKAGES)
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flock") is None, reason="install.sh needs flock (util-linux)")
def test_install_into_destdir_is_idempotent_and_keeps_the_config(wheel, tmp_path):
    dest = tmp_path / "root"
    first = install(wheel, "--no-enable", destdir=dest)
    assert "skipped creating user/group" in first.stdout and "skipped systemctl" in first.stdout

    opt, etc = dest / "opt" / "inspectd", dest / "etc" / "inspectd"
    config, unit = etc / "config.toml", dest / "etc" / "systemd" / "system" / "inspectd.service"
    assert config.read_bytes() == (ROOT / "config.example.toml").read_bytes()
    assert mode(config) == 0o640 and mode(etc) == 0o750
    assert unit.read_bytes() == UNIT.read_bytes() and mode(unit) == 0o644
    release1 = os.readlink(opt / "venv")
    assert release1.startswith("releases/") and (opt / release1 / "bin" / "python").exists()
    assert not os.path.lexists(opt / "venv.previous")
    entry = dest / ENTRY_POINT
    assert os.access(entry, os.X_OK) and mode(opt) == 0o755
    release_txt = (opt / "venv" / "share" / "inspectd" / "release.txt").read_text()
    assert "version=" in release_txt and "extras=tensorflow\n" in release_txt  # runs .keras models unless --slim

    # The installed entry point runs, from the venv under DESTDIR, with the package installed there.
    proc = run_installed(dest, str(entry), "--help")
    assert proc.returncode == 0 and "check-config" in proc.stdout, proc.stderr
    proc = run_installed(dest, str(opt / "venv" / "bin" / "python"), "-c", "import inspectd; print(inspectd.__file__)")
    assert Path(proc.stdout.strip()).resolve().is_relative_to((opt / release1).resolve()), proc.stdout + proc.stderr
    proc = run_installed(dest, str(entry), "check-config", "--config", str(config))
    assert proc.returncode == 0, proc.stderr

    # Second run: the config (with the operator's edit) is kept; nothing changes but the release.
    with config.open("a") as f:
        f.write("\n# edited by the operator\n")
    edited = config.read_bytes()
    before = manifest(dest)
    second = install(wheel, "--no-enable", destdir=dest)
    assert "kept the existing" in second.stdout and "unit" in second.stdout and "unchanged" in second.stdout
    assert config.read_bytes() == edited
    after = manifest(dest)
    release2 = os.readlink(opt / "venv")
    assert release2 != release1 and os.readlink(opt / "venv.previous") == release1
    for changed in ("opt/inspectd/venv", "opt/inspectd/venv.previous"):
        before.pop(changed, None)
        after.pop(changed, None)
    assert after == before

    # Third run: only the current and the previous release are kept.
    install(wheel, "--no-enable", destdir=dest)
    release3 = os.readlink(opt / "venv")
    assert os.readlink(opt / "venv.previous") == release2
    assert sorted(p.name for p in (opt / "releases").iterdir()) == sorted([release2[9:], release3[9:]])

    # Rollback swaps current and previous; the entry point still runs.
    proc = subprocess.run(
        [str(INSTALL), "--rollback"], capture_output=True, text=True, timeout=60, env=_offline_env(DESTDIR=str(dest))
    )
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(opt / "venv") == release2 and os.readlink(opt / "venv.previous") == release3
    assert run_installed(dest, str(entry), "--version").returncode == 0

    # The installed tree, with its real entry point, passes systemd-analyze verify.
    if SYSTEMD_ANALYZE:
        assert verify(systemd_root(dest)) == []


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flock") is None, reason="install.sh needs flock (util-linux)")
def test_a_release_that_rejects_the_config_is_not_switched_to(wheel, tmp_path):
    dest = tmp_path / "root"
    install(wheel, "--no-enable", destdir=dest)
    opt, config = dest / "opt" / "inspectd", dest / "etc" / "inspectd" / "config.toml"
    current = os.readlink(opt / "venv")
    config.write_text(config.read_text() + "\n[no_such_section]\nkey = 1\n")
    proc = install(wheel, "--no-enable", destdir=dest, check=False)
    assert proc.returncode != 0 and "rejects" in proc.stderr and "no_such_section" in proc.stderr
    assert os.readlink(opt / "venv") == current and not os.path.lexists(opt / "venv.previous")
    assert [p.name for p in (opt / "releases").iterdir()] == [current[9:]]  # the new one was removed


@pytest.mark.slow
def test_real_install_in_a_private_mount_namespace(wheel, tmp_path):
    """The non-DESTDIR path (user and group, ownership, the check run as the service user) without
    touching this machine: /etc is an overlay whose changes land in tmp_path, /opt and /var/log are
    tmp_path directories, all inside a mount namespace that ends with the command."""
    why = unshare_unavailable()
    if why:
        pytest.skip(why)
    if (
        not os.access("/usr/bin/python3", os.X_OK)
        or subprocess.run(
            ["/usr/bin/python3", "-c", f"import sys; sys.exit(sys.version_info[:2] != {sys.version_info[:2]})"]
        ).returncode
        != 0
    ):
        pytest.skip("/usr/bin/python3 is not this Python's version (the venv borrows this venv's packages)")
    if subprocess.run(["/usr/bin/python3", "-c", "import venv, ensurepip"], capture_output=True).returncode != 0:
        pytest.skip("/usr/bin/python3 has no venv/ensurepip: install.sh would apt-get python3-venv onto this machine")
    closed = next((p for p in (Path(SITE_PACKAGES), *Path(SITE_PACKAGES).parents) if not p.stat().st_mode & 0o001), None)
    if closed is not None:  # e.g. a checkout inside a `mktemp -d` folder (mode 0700)
        pytest.skip(f"{closed} is not searchable by other users: the service user cannot borrow this venv's packages")
    upper, work, opt, varlog = (tmp_path / n for n in ("etc-upper", "etc-work", "opt", "varlog"))
    for d in (upper, work, opt, varlog):
        d.mkdir()
    script = (
        f"set -e; mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc; "
        f'mount --bind {opt} /opt; mount --bind {varlog} /var/log; exec "$@"'
    )

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        prefix = ("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh")
        return install(wheel, *args, destdir=None, python=None, check=check, prefix=prefix)

    first = run()
    assert "created system user inspectd" in first.stdout
    assert "systemd is not running here: skipped systemctl" in first.stdout
    passwd = {line.split(":")[0]: line.split(":") for line in (upper / "passwd").read_text().splitlines()}
    group = {line.split(":")[0]: line.split(":") for line in (upper / "group").read_text().splitlines()}
    user = passwd["inspectd"]
    assert user[5] == "/nonexistent" and user[6].endswith("nologin") and int(user[2]) < 1000
    gid = int(group["inspectd"][2])
    assert int(user[3]) == gid
    if "video" in group:
        assert "inspectd" in group["video"][3].split(",")
    config = upper / "inspectd" / "config.toml"
    assert (config.stat().st_uid, config.stat().st_gid, mode(config)) == (0, gid, 0o640)
    assert (config.parent.stat().st_uid, config.parent.stat().st_gid, mode(config.parent)) == (0, gid, 0o750)
    unit = upper / "systemd" / "system" / "inspectd.service"
    assert unit.read_bytes() == UNIT.read_bytes() and (unit.stat().st_uid, mode(unit)) == (0, 0o644)
    assert os.readlink(opt / "inspectd" / "venv").startswith("releases/")

    second = run()
    assert "created group" not in second.stdout and "created system user" not in second.stdout
    assert "added user" not in second.stdout
    assert "kept the existing /etc/inspectd/config.toml" in second.stdout

    # The new release is checked as the service user: a config it cannot read stops the switch.
    current = os.readlink(opt / "inspectd" / "venv")
    config.chmod(0o600)
    third = run(check=False)
    assert third.returncode != 0 and "rejects /etc/inspectd/config.toml" in third.stderr
    assert os.readlink(opt / "inspectd" / "venv") == current
