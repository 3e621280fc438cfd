#!/usr/bin/env bash
# Install or upgrade inspectd as a systemd service (Debian 12 / Ubuntu 22.04+), as root:
#
#   deploy/install.sh [--slim] [--gstreamer] [--gpu] [--onnx] [--openvino] [--bridges] [--source DIR|WHEEL] [--no-enable] [--no-start]
#   deploy/install.sh --rollback
#
# Layout (see deploy/README.md):
#   /opt/inspectd/releases/<UTC time>/   one virtual environment per install (inspectd + dependencies)
#   /opt/inspectd/venv -> releases/...   the release the unit runs (ExecStart=/opt/inspectd/venv/bin/inspectd)
#   /opt/inspectd/venv.previous -> ...   the one before it, kept for --rollback; older ones are removed
#   /etc/inspectd/config.toml            root:inspectd 0640; written from config.example.toml only if missing
#   /etc/systemd/system/inspectd.service deploy/inspectd.service, replaced on every run; likewise the
#                                        bridges' inspectd-bridge@.service and inspectd-proxy.service
#                                        (installed, never enabled by this script: docs/integration.md)
#
# Every run builds a fresh release next to the running one: the running daemon never sees a
# half-installed environment, the new release is checked against the existing config before it is
# switched to (a failed check leaves everything as it was), and the switch is one atomic rename of
# the venv symlink. Running it twice changes nothing but the release (the package is reinstalled).
#
# Environment:
#   DESTDIR=/tmp/root   write everything under this root instead of /; no user creation, no apt, no
#                       systemctl, no chown (for tests and for looking at the result). The venv is
#                       created at its DESTDIR path and is not relocatable: not a packaging tool.
#   INSPECTD_PIP_ARGS   extra pip arguments for every pip call, e.g. an offline line PC:
#                       "--no-index --find-links /media/usb/wheelhouse"; the tests use "--no-index --no-deps".
#   PIP_INDEX_URL etc.  pip's own settings (a local mirror) are honoured as usual.
set -euo pipefail
umask 022

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

say() { printf 'install.sh: %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<'EOF'
Usage: deploy/install.sh [OPTIONS]        (as root; DESTDIR=DIR to install into a throwaway root)

Install or upgrade inspectd as the systemd service "inspectd".

  --slim                    no TensorFlow: the slim extra (ONNX Runtime and OpenVINO) runs exported models only
                            (model.path = a folder from `inspectd export MODEL --runtime onnxruntime --out DIR`;
                            builtin:demo is bundled exported); about 560 MB instead of 2.8 GB. Without it the
                            tensorflow extra is installed, which runs .keras models
  --gstreamer               install the gstreamer extra (PyGObject: GStreamer pipelines as cameras, rtsp:// via GStreamer)
                            and the Debian packages it builds and runs with
  --gpu                     install the gpu extra (tensorflow[and-cuda]; needs the NVIDIA driver)
  --onnx                    install the onnx extra: ONNX Runtime, the fastest CPU runtime measured
                            ([model] runtime = "auto" picks it; docs/performance.md)
  --openvino                install the openvino extra: OpenVINO's CPU runtime
  --bridges                 install the bridges extra (paho-mqtt, asyncua) for inspectd-bridge@mqtt and @opcua
  --source DIR|WHEEL        what to install: a source tree or a built wheel
                            (default: the checkout this script lives in)
  --python PATH             interpreter for the virtual environment (default: /usr/bin/python3).
                            Must not live under /root or /home: the unit has ProtectHome=yes.
  --system-site-packages    let the venv see the interpreter's own packages (e.g. a system-wide
                            TensorFlow on NVIDIA Jetson)
  --no-enable               do not enable or start the service (implies --no-start)
  --no-start                enable, but do not (re)start the service
  --rollback                switch back to the previous release (venv.previous) and restart
  -h, --help                this text

Environment: DESTDIR, INSPECTD_PIP_ARGS (extra pip arguments, e.g. --no-index --find-links DIR).
EOF
}

# ---- options -------------------------------------------------------------------------------------
extras=()
slim=0
source_arg="$repo"
python=""
system_site=0
enable=1
start=1
rollback=0
while (($#)); do
    case "$1" in
        --slim) slim=1 ;;
        --gstreamer) extras+=(gstreamer) ;;
        --gpu) extras+=(gpu) ;;
        --onnx) extras+=(onnx) ;;
        --openvino) extras+=(openvino) ;;
        --bridges) extras+=(bridges) ;;
        --source) (($# >= 2)) || die "--source needs a directory or a wheel"; source_arg="$2"; shift ;;
        --source=*) source_arg="${1#*=}" ;;
        --python) (($# >= 2)) || die "--python needs a path"; python="$2"; shift ;;
        --python=*) python="${1#*=}" ;;
        --system-site-packages) system_site=1 ;;
        --no-enable) enable=0; start=0 ;;
        --no-start) start=0 ;;
        --rollback) rollback=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done

if ((slim)); then
    [[ " ${extras[*]} " != *" gpu "* ]] || die "--slim and --gpu: the gpu extra is TensorFlow's; a slim install runs on the CPU"
    extras+=(slim)
else
    extras=(tensorflow "${extras[@]}")
fi

destdir="${DESTDIR:-}"
destdir="${destdir%/}"
if [[ -n "$destdir" ]]; then
    mkdir -p "$destdir"
    destdir="$(cd "$destdir" && pwd)"
fi
pip_args=()
read -r -a pip_args <<<"${INSPECTD_PIP_ARGS:-}"

opt="$destdir/opt/inspectd"
releases="$opt/releases"
venv_link="$opt/venv"
prev_link="$opt/venv.previous"
etc="$destdir/etc/inspectd"
config="$etc/config.toml"
unit="$destdir/etc/systemd/system/inspectd.service"

# Real system changes (user, apt, ownership, systemctl) only without DESTDIR; systemctl only when
# systemd is the running init (not in a container or chroot).
real_root=0
[[ -z "$destdir" ]] && real_root=1
use_systemctl=0
if ((real_root)) && [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    use_systemctl=1
fi
if ((real_root)) && [[ $(id -u) -ne 0 ]]; then
    die "run as root (or set DESTDIR=DIR to install into a throwaway root)"
fi

# install(1) with owner/group only for a real install (DESTDIR may run unprivileged, and the
# inspectd group exists only on the real system).
owned() { # owned USER:GROUP -> the install(1) owner options, or none under DESTDIR
    ((real_root)) && printf -- '-o\n%s\n-g\n%s\n' "${1%%:*}" "${1##*:}"
    return 0
}

systemctl_or_skip() {
    if ((use_systemctl)); then
        systemctl "$@"
    elif [[ -n "$destdir" ]]; then
        say "DESTDIR set: skipped systemctl $*"
    else
        say "systemd is not running here: skipped systemctl $*"
    fi
}

# Points LINK at releases/NAME with one rename (a reader never sees the link missing).
point() { # point LINK TARGET
    ln -sfn "$2" "$1.tmp.$$"
    mv -T "$1.tmp.$$" "$1"
}

restart_service() { # restart (or start) the service; 1 when it did not come up
    if ((use_systemctl)); then
        say "systemctl restart inspectd (returns once the model is warm, at most TimeoutStartSec)"
        systemctl restart inspectd && return 0
        warn "inspectd did not start; see: journalctl -u inspectd -n 100"
        return 1
    fi
    systemctl_or_skip restart inspectd
}

# One install.sh at a time (a second one would remove the release the first is building).
install -d -m 0755 "$opt"
exec 9>"$opt/.install.lock"
flock -n 9 || die "another install.sh is running ($opt/.install.lock)"

# ---- rollback --------------------------------------------------------------------------------------
if ((rollback)); then
    [[ -L "$prev_link" && -e "$prev_link" ]] || die "no previous release to roll back to ($prev_link)"
    current="$(readlink "$venv_link")"
    previous="$(readlink "$prev_link")"
    point "$venv_link" "$previous"
    point "$prev_link" "$current"
    say "rolled back: $venv_link -> $previous (was $current; run --rollback again to undo)"
    restart_service || die "the previous release did not start either"
    exit 0
fi

# ---- Debian packages -------------------------------------------------------------------------------
if [[ -z "$python" ]]; then
    python=/usr/bin/python3
    [[ -x "$python" ]] || python="$(command -v python3 || true)"
    [[ -n "$python" ]] || python=python3
fi
apt_needed=()
if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_needed+=(python3-venv)
fi
if [[ " ${extras[*]} " == *" gstreamer "* ]]; then
    # PyGObject is built by pip against these; the gir/plugins packages are GStreamer itself, and Aravis for
    # genicam:// cameras (arv-tool-0.8 lists them) (the RTSP server of scripts/test.sh is for the tests only).
    for pkg in gcc python3-dev pkg-config libgirepository1.0-dev libcairo2-dev gir1.2-gstreamer-1.0 \
        gir1.2-gst-plugins-base-1.0 gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
        gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav gir1.2-aravis-0.8 aravis-tools-cli; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || apt_needed+=("$pkg")
    done
fi
if ((${#apt_needed[@]})); then
    if ((real_root)) && command -v apt-get >/dev/null; then
        say "installing Debian packages: ${apt_needed[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${apt_needed[@]}" >/dev/null
    else
        warn "not installing Debian packages here (DESTDIR set or no apt-get): ${apt_needed[*]}"
    fi
fi
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "Python >= 3.10 needed, $python is $("$python" --version 2>&1)"
if [[ " ${extras[*]} " == *" gpu "* ]] && ! command -v nvidia-smi >/dev/null; then
    warn "--gpu: nvidia-smi not found; install the NVIDIA driver, or TensorFlow will run on the CPU"
fi

# ---- user and group --------------------------------------------------------------------------------
if ((real_root)); then
    if ! getent group inspectd >/dev/null; then
        groupadd --system inspectd
        say "created group inspectd"
    fi
    if ! getent passwd inspectd >/dev/null; then
        useradd --system --gid inspectd --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "inspectd daemon" inspectd
        say "created system user inspectd"
    fi
    # Cameras (/dev/video*: video) and DRM render nodes (/dev/dri/renderD*: render), where the
    # groups exist; the unit picks the memberships up from /etc/group.
    for grp in video render; do
        if getent group "$grp" >/dev/null && ! id -nG inspectd | tr ' ' '\n' | grep -qx "$grp"; then
            usermod -a -G "$grp" inspectd
            say "added user inspectd to group $grp"
        fi
    done
else
    say "DESTDIR set: skipped creating user/group inspectd"
fi

# ---- configuration ---------------------------------------------------------------------------------
# /etc/inspectd: root:inspectd 0750; config.toml root:inspectd 0640 (it may hold camera passwords).
mapfile -t own < <(owned root:inspectd)
install -d -m 0750 "${own[@]}" "$etc"
if [[ -e "$config" ]]; then
    say "kept the existing $config (never overwritten; compare with $venv_link/share/inspectd/config.example.toml)"
    if [[ $(stat -c %a "$config") == *[1-7] ]]; then
        warn "$config is readable by everyone; it may hold camera credentials: chmod 0640 $config"
    fi
else
    install -m 0640 "${own[@]}" "$repo/config.example.toml" "$config"
    say "wrote $config from config.example.toml (the demo: two synthetic cameras; edit it)"
fi

# ---- unit ----------------------------------------------------------------------------------------
mapfile -t own < <(owned root:root)
install -d -m 0755 "$(dirname "$unit")"
for file in inspectd.service inspectd-bridge@.service inspectd-proxy.service; do
    target="$(dirname "$unit")/$file"
    if cmp -s "$here/$file" "$target"; then
        say "unit $target unchanged"
    else
        install -m 0644 "${own[@]}" "$here/$file" "$target"
        say "installed unit $target"
    fi
done

# ---- the release: a fresh venv with inspectd ------------------------------------------------------
if [[ -d "$source_arg" ]]; then
    source_path="$(cd "$source_arg" && pwd)"
    [[ -f "$source_path/pyproject.toml" ]] || die "--source $source_arg: no pyproject.toml there"
elif [[ -f "$source_arg" && "$source_arg" == *.whl ]]; then
    source_path="$(cd "$(dirname "$source_arg")" && pwd)/$(basename "$source_arg")"
else
    die "--source $source_arg: not a directory or a .whl file"
fi
spec="$source_path"
if ((${#extras[@]})); then
    spec="${source_path}[$(IFS=,; echo "${extras[*]}")]"
fi

if [[ -e "$venv_link" && ! -L "$venv_link" ]]; then
    die "$venv_link is a directory, not a link made by this script; move it away and re-run"
fi
install -d -m 0755 "$opt" "$releases"
name="$(date -u +%Y%m%dT%H%M%SZ)"
n=1
while [[ -e "$releases/$name" ]]; do name="$(date -u +%Y%m%dT%H%M%SZ)-$n"; n=$((n + 1)); done
release="$releases/$name"
building="$release"
cleanup() { if [[ -n "${building:-}" ]]; then rm -rf "$building"; fi; }
trap cleanup EXIT

say "creating release $release ($("$python" --version 2>&1))"
venv_opts=()
((system_site)) && venv_opts+=(--system-site-packages)
# PYTHONPATH/PYTHONHOME from the caller's shell would make pip see (and skip) packages that are
# not in the venv: never pass them to venv or pip.
env -u PYTHONPATH -u PYTHONHOME "$python" -m venv "${venv_opts[@]}" "$release"
base="$(readlink -f "$release/bin/python")"
case "$base" in
    /root/* | /home/*)
        msg="the venv's interpreter $base is under /root or /home, which the service cannot see (ProtectHome=yes); use --python /usr/bin/python3"
        if ((real_root)); then die "$msg"; else warn "$msg"; fi ;;
esac
pip() { env -u PYTHONPATH -u PYTHONHOME "$release/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip "${pip_args[@]}"
say "installing $spec${pip_args[*]:+ (pip args: ${pip_args[*]})}$( ((slim)) || echo ' (TensorFlow is large: minutes on a fresh cache)')"
pip install -q "${pip_args[@]}" "$spec"
version="$(env -u PYTHONPATH "$release/bin/python" -c 'import importlib.metadata as m; print(m.version("inspectd"))')"
install -d -m 0755 "$release/share/inspectd"
install -m 0644 "$repo/config.example.toml" "$release/share/inspectd/config.example.toml"
install -m 0644 "$here/bridges.example.toml" "$release/share/inspectd/bridges.example.toml"
cat >"$release/share/inspectd/release.txt" <<EOF
version=$version
installed=$name
source=$source_arg
extras=${extras[*]}
python=$base
EOF

# The new release must accept the existing config before the service is switched to it; on a real
# install checked as the service user, so an unreadable config or model shows up here too.
check=("$release/bin/inspectd" check-config --config "$config")
if ((real_root)) && command -v runuser >/dev/null; then
    check=(runuser -u inspectd -- "${check[@]}")
fi
if ! "${check[@]}" >/dev/null; then
    die "inspectd $version rejects $config (above); nothing was switched: fix the config and re-run"
fi

# ---- switch ----------------------------------------------------------------------------------------
old=""
[[ -L "$venv_link" ]] && old="$(readlink "$venv_link")"
point "$venv_link" "releases/$name"
building=""
if [[ -n "$old" && "$old" != "releases/$name" && -d "$opt/$old" ]]; then
    point "$prev_link" "$old"
fi
keep_prev=""
[[ -L "$prev_link" ]] && keep_prev="$(readlink "$prev_link")"
for dir in "$releases"/*; do
    [[ -d "$dir" ]] || continue
    rel="releases/$(basename "$dir")"
    if [[ "$rel" != "releases/$name" && "$rel" != "$keep_prev" ]]; then
        rm -rf "$dir"
        say "removed old release $rel"
    fi
done
say "inspectd $version is now $venv_link -> releases/$name${keep_prev:+ (previous: $keep_prev)}"

# ---- systemd ---------------------------------------------------------------------------------------
systemctl_or_skip daemon-reload
if ((enable)); then
    systemctl_or_skip enable inspectd
fi
if ((start)); then
    if ! restart_service; then
        if [[ -n "$keep_prev" ]] && ((use_systemctl)); then
            warn "rolling back to $keep_prev"
            point "$venv_link" "$keep_prev"
            point "$prev_link" "releases/$name"
            restart_service || true
        fi
        die "the new release did not start (rolled back where a previous release existed)"
    fi
elif ((enable)); then
    say "--no-start: run 'systemctl restart inspectd' to use the new release"
else
    say "--no-enable: not enabled or (re)started; a running inspectd keeps its release until restarted"
fi

cat <<EOF

inspectd $version installed${destdir:+ under DESTDIR=$destdir}
  binary     $venv_link/bin/inspectd   (previous release: ${keep_prev:-none}; roll back: $0 --rollback)
  config     $config   (check: $venv_link/bin/inspectd check-config --config $config; apply: systemctl reload inspectd)
  unit       $unit
  logs       journalctl -u inspectd -f        status: systemctl status inspectd
  metrics    http://127.0.0.1:9108/metrics  (/healthz, /readyz)   [metrics] in the config
  events     ZeroMQ PUB at [publish].endpoint (default tcp://127.0.0.1:5556): inspectd watch ENDPOINT
  state      /var/lib/inspectd (event archive), /var/cache/inspectd (CUDA cache); created by systemd
EOF
