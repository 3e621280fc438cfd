#!/usr/bin/env bash
# Set-up shared by the README's two commands (scripts/demo.sh, scripts/test.sh), safe to re-run:
#  1. Debian/Ubuntu packages the project needs, installed with apt when run as root (otherwise the
#     exact apt line is printed and we stop);
#  2. a virtual environment in .venv (or $INSPECTD_VENV), created when missing and refreshed when
#     pyproject.toml changed, with inspectd installed in editable mode plus the given extras.
# Usage: scripts/bootstrap.sh EXTRAS   (e.g. "dev" or "toolkit")
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${INSPECTD_VENV:-$root/.venv}"
extras="${1:-toolkit}"
python="${PYTHON:-python3}"

say() { printf 'bootstrap: %s\n' "$*" >&2; }

# Debian packages: name -> why. python3-venv only where the interpreter lacks a working venv.
apt_needed=()
if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_needed+=(python3-venv python3-pip)
fi
for pkg in ${INSPECTD_APT_PACKAGES:-}; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || apt_needed+=("$pkg")
done
if ((${#apt_needed[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        say "installing Debian packages: ${apt_needed[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${apt_needed[@]}" >/dev/null
    else
        say "missing Debian packages; run as root:"
        say "  sudo apt-get update && sudo apt-get install -y ${apt_needed[*]}"
        exit 1
    fi
fi

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    say "Python >= 3.10 needed, found $("$python" --version 2>&1)"
    exit 1
fi

stamp="$venv/.inspectd-installed"
want="$(sha256sum < "$root/pyproject.toml" | cut -c1-16) $extras"
if [[ ! -x "$venv/bin/python" ]]; then
    say "creating virtual environment $venv"
    "$python" -m venv "$venv"
fi
# Installed already: the same pyproject.toml with the same extras, or with "dev", which includes every
# runtime extra (so the demo runs in the test venv without reinstalling).
installed() {
    [[ -f "$stamp" ]] || return 1
    local have
    have="$(cat "$stamp")"
    [[ "$have" == "$want" ]] && return 0
    [[ "${have%% *}" == "${want%% *}" && "${have#* }" == "dev" ]] || return 1
    local extra
    for extra in ${extras//,/ }; do
        [[ " tensorflow toolkit gstreamer pretrained onnx openvino int8 bridges " == *" $extra "* ]] || return 1
    done
}
if ! installed; then
    say "installing inspectd[$extras] into $venv (first time: a few minutes$([[ $extras == slim ]] || echo ", TensorFlow is large"))"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e "${root}[${extras}]"
    echo "$want" > "$stamp"
fi
