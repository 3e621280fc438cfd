"""Keys and the files that hold them: ZeroMQ CURVE key pairs, the client allow-list, file modes, passwords.

    keys = ServerKeys.load("/etc/inspectd/keys/server.key_secret", "/etc/inspectd/keys/clients")
    client = ClientKeys.load("me.key_secret", "server.key")      # a subscriber's own pair + the daemon's public key
    generate_keys(Path("/etc/inspectd/keys"), "server")           # -> server.key (0644), server.key_secret (0600)

The key files are ZeroMQ's own certificate format (`zmq.auth.create_certificates`, the format of
czmq's `zcert`), so keys made by other ZeroMQ tools work here and ours work there. A secret key
file must be private to its owner: one that its group or other users can read is refused, as
OpenSSH refuses an unprotected private key. docs/security.md has the threat model.
"""

from __future__ import annotations

__all__ = [
    "ServerKeys",
    "ClientKeys",
    "AllowList",
    "generate_keys",
    "private_file",
    "check_config_file",
    "is_loopback_endpoint",
    "hash_password",
    "PasswordCheck",
]

import contextlib
import grp
import hashlib
import ipaddress
import logging
import os
import pwd
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import zmq
import zmq.auth
from zmq.utils import z85

from inspectd.errors import ConfigError, UsageError

log = logging.getLogger("inspectd.security")

# A refused key is logged at most this often (a consumer restarted in a loop by its supervisor, a scan).
_REFUSED_LOG_EVERY_S = 60.0
# At most this many bcrypt checks run at once: wrong passwords cost ~0.2 s of CPU each, and a flood of
# them must not take the line PC's cores from inspection. Requests beyond wait this long, then are refused.
_BCRYPT_AT_ONCE = 1
_BCRYPT_TURN = threading.BoundedSemaphore(_BCRYPT_AT_ONCE)
_BCRYPT_WAIT_S = 2.0


def private_file(path: str | Path, key: str) -> Path:
    """`path` as a Path if it is a regular file owned by us (or root) that neither its group nor others can
    read; ConfigError naming `key` (the setting or option that names it) otherwise. (The folders above it
    are not checked: keep them root-owned, as /etc/inspectd is.)"""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{key} {str(path)!r}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{key} {str(path)!r}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{key} {str(path)!r}: not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{key} {str(path)!r}: a secret readable or writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); refused: chmod 600 it, owned by the user that reads it"
        )
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            f"{key} {str(path)!r}: a secret owned by another user (uid {st.st_uid}), who could replace "
            f"it; refused: chown it to the user that reads it"
        )
    if not os.access(path, os.R_OK):
        raise ConfigError(
            f"{key} {str(path)!r}: not readable by this process (uid {os.geteuid()}): chown it to the user that reads it"
        )
    return path


def check_config_file(path: Path, holds_secrets: bool) -> None:
    """ConfigError if a config file can be changed by group or others (whoever writes it decides what the
    daemon loads and where it sends events), or, when it `holds_secrets` (passwords in camera URLs or a
    broker login), if others can read it. Group read stays allowed: the service's own group reads it
    (root:inspectd 0640, as deploy/install.sh writes it)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return  # reading it reports the problem
    if mode & 0o022:
        raise ConfigError(f"{path}: writable by group or others (mode {mode:04o}); refused: chmod 640 it")
    if holds_secrets and mode & 0o004:
        raise ConfigError(
            f"{path}: holds passwords and is readable by everyone (mode {mode:04o}); refused: "
            "chmod 640 it (owner root, group of the service)"
        )


def _load_pair(path: str | Path, key: str) -> tuple[bytes, bytes]:
    path = private_file(path, key)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key} {str(path)!r}: not a ZeroMQ key file: {exc}") from None
    if not secret:
        raise ConfigError(
            f"{key} {str(path)!r}: holds no secret-key: name the .key_secret file "
            "(inspectd keys generate writes NAME.key and NAME.key_secret)"
        )
    _check_z85(public, key, path)
    _check_z85(secret, key, path)
    return public, secret


def _load_public(path: str | Path, key: str) -> bytes:
    path = Path(path)
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key} {str(path)!r}: not a ZeroMQ public key file: {exc}") from None
    _check_z85(public, key, path)
    return public


def _check_z85(value: bytes, key: str, path: Path) -> None:
    """A CURVE key is 32 bytes, written as 40 Z85 characters."""
    try:
        ok = len(z85.decode(value)) == 32
    except (ValueError, KeyError, IndexError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(f"{key} {str(path)!r}: a key in it is not 40 Z85 characters")


class AllowList:
    """The client public keys in a folder (`*.key`), for pyzmq's authenticator (`configure_curve_callback`).

    Read again whenever a key file is added, removed, replaced or changed (each handshake compares the
    files' names, sizes, inodes and modification times: a handful of stat calls), so a key takes effect
    at the next connection, without a restart; a client already connected stays connected until it
    reconnects (restart the daemon to cut one off at once). A refused key is logged with its public key
    (once a minute per key), so an operator can tell which client it is."""

    def __init__(self, folder: str | Path, key: str = "publish.curve_clients"):
        self.folder, self.key = Path(folder), key
        self._keys: frozenset[bytes] = frozenset()
        self._signature: tuple | None = None
        self._lock = threading.Lock()
        self._logged: dict[bytes, float] = {}
        self._error_logged = -_REFUSED_LOG_EVERY_S
        self.refresh(strict=True)

    def _files(self) -> tuple:
        """What identifies the folder's key files as they are now (OSError if it cannot be read)."""
        out = []
        for entry in os.scandir(self.folder):
            if entry.name.endswith(".key"):
                st = entry.stat()
                out.append((entry.name, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(sorted(out))

    def refresh(self, strict: bool = False) -> frozenset[bytes]:
        """Read the folder if its key files changed; ConfigError when `strict` (at start), else the last good list."""
        try:
            signature = self._files()
            if signature != self._signature:
                keys = frozenset(zmq.auth.load_certificates(self.folder))
                with self._lock:
                    self._keys, self._signature = keys, signature
                log.info("%s: %d client key(s) allowed from %s", self.key, len(keys), self.folder)
        except (OSError, ValueError) as exc:
            if strict:
                raise ConfigError(f"{self.key} {str(self.folder)!r}: cannot read the client keys: {exc}") from None
            now = time.monotonic()
            if now - self._error_logged >= _REFUSED_LOG_EVERY_S:
                self._error_logged = now
                log.error(
                    "%s %s: cannot read the client keys (keeping the last %d): %s", self.key, self.folder, len(self._keys), exc
                )
        return self._keys

    def callback(self, domain: str, client_key: bytes) -> bool:
        """pyzmq's credentials-provider hook: `client_key` is Z85; True lets the handshake go on."""
        allowed = client_key in self.refresh()
        if not allowed:
            now = time.monotonic()
            if now - self._logged.get(client_key, -_REFUSED_LOG_EVERY_S) >= _REFUSED_LOG_EVERY_S:
                self._logged[client_key] = now
                if len(self._logged) > 1000:  # bounded: a scan with random keys cannot grow it
                    self._logged.clear()
                log.warning(
                    "refused a client key not in %s: %s (add its .key file there to allow it)",
                    self.folder,
                    client_key.decode("ascii", "replace"),
                )
        return allowed


@dataclass(frozen=True)
class ServerKeys:
    """The daemon's CURVE key pair and its client allow-list: what every socket it binds uses."""

    public: bytes
    secret: bytes
    allow: AllowList

    @classmethod
    def load(cls, secret_key_file: str | Path, clients_dir: str | Path, key: str = "publish.curve_secret_key") -> ServerKeys:
        public, secret = _load_pair(secret_key_file, key)
        return cls(public, secret, AllowList(clients_dir, key.rsplit(".", 1)[0] + ".curve_clients"))

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server (before it binds)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True


@dataclass(frozen=True)
class ClientKeys:
    """A consumer's own CURVE key pair and the daemon's (or proxy's) public key."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(
        cls, secret_key_file: str | Path, server_key_file: str | Path, keys: tuple[str, str] = ("--client-key", "--server-key")
    ) -> ClientKeys:
        public, secret = _load_pair(secret_key_file, keys[0])
        return cls(public, secret, _load_public(server_key_file, keys[1]))

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of the server (before it connects)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server


def generate_keys(folder: Path, name: str, owner: str | None = None, force: bool = False) -> tuple[Path, Path]:
    """NAME.key (public, 0644) and NAME.key_secret (0600) in `folder` (made 0755 if missing), owned by
    `owner` (a user name, or user:group; needs root) -> (public file, secret file).
    UsageError if either exists (unless `force`) or `owner` is unknown."""
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"--name {name!r}: a plain file name expected (e.g. server, or the client's host name)")
    uid, gid = _owner_ids(owner) if owner else (-1, -1)
    public_file, secret_file = folder / f"{name}.key", folder / f"{name}.key_secret"
    existing = [str(p) for p in (public_file, secret_file) if p.exists()]
    if existing and not force:
        raise UsageError(
            f"{', '.join(existing)} exists; refusing to replace a key (--force replaces it, and every "
            "client or server that trusted the old one must get the new public key)"
        )
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the secret file is private from its first byte
    try:
        for p in (public_file, secret_file):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(old_umask)
    os.chmod(public_file, 0o644)
    os.chmod(secret_file, 0o600)
    if owner:
        for p in (public_file, secret_file):
            os.chown(p, uid, gid)
    return public_file, secret_file


def _owner_ids(owner: str) -> tuple[int, int]:
    user, _, group = owner.partition(":")
    try:
        pw = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    except KeyError:
        raise UsageError(f"--owner {owner!r}: no such user or group on this machine") from None
    return pw.pw_uid, gid


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for endpoints only this machine can reach: ipc://, tcp:// on 127.0.0.0/8, ::1, `lo`, or a host
    name that resolves only to loopback addresses. `*`, 0.0.0.0, other addresses and interfaces: False."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0].strip("[]")
    if host == "lo":
        return True
    if host in ("*", ""):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        # IPv4 and IPv6 only (no family asked for a host name): the address is a string.
        addresses = {cast(str, info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return False  # an interface name, or unresolvable: assume the network
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


# -- passwords (HTTP basic auth of /metrics), bcrypt as Prometheus' exporter web config ----------------------


def hash_password(password: str, rounds: int = 12) -> str:
    """A bcrypt hash for `[metrics] basic_auth_users` (as `htpasswd -nBC 12` or Prometheus' docs make)."""
    import bcrypt

    data = password.encode("utf-8")
    if not data or len(data) > 72:
        raise UsageError("a password of 1-72 bytes expected (bcrypt reads no further)")
    return bcrypt.hashpw(data, bcrypt.gensalt(rounds)).decode("ascii")


class PasswordCheck:
    """user -> bcrypt hash; `check(user, password)`.

    bcrypt is slow on purpose (~0.2 s at cost 12), so a pair that passed is remembered (by a SHA-256 of
    user, password and hash, never the password) for the next scrapes. An unknown user costs one
    comparison at the configured hashes' highest cost too, so timing does not reveal which users exist.
    At most one comparison runs at a time in the whole process (every endpoint's checks share the turn):
    a flood of wrong passwords costs one core, not the machine, and requests that wait more than 2 s for
    their turn are refused."""

    def __init__(self, users: dict[str, str]):
        import bcrypt

        self._bcrypt = bcrypt
        self._users = {u: h.encode("ascii") for u, h in users.items()}
        cost = max((int(h.split("$")[2]) for h in users.values()), default=4)
        self._dummy = bcrypt.hashpw(b"no such user", bcrypt.gensalt(cost))
        self._passed: set[bytes] = set()
        self._lock = threading.Lock()
        self._turn = _BCRYPT_TURN  # one for the process: /metrics and the live view together cost one core

    def __bool__(self) -> bool:
        return bool(self._users)

    def check(self, user: str, password: str) -> bool:
        hashed = self._users.get(user)
        data = password.encode("utf-8")
        token = hashlib.sha256(b"\0".join((user.encode("utf-8"), data, hashed or b""))).digest()
        with self._lock:
            if hashed is not None and token in self._passed:
                return True
        if not self._turn.acquire(timeout=_BCRYPT_WAIT_S):
            return False
        try:
            ok = self._bcrypt.checkpw(data[:72], hashed or self._dummy) and hashed is not None
        except ValueError:  # a malformed hash (checked at load, so only a bug gets here)
            ok = False
        finally:
            self._turn.release()
        if ok:
            with self._lock:
                if len(self._passed) > 1000:
                    self._passed.clear()
                self._passed.add(token)
        return ok
