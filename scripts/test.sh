#!/usr/bin/env bash
# The README's test command: set up (system packages, venv) and run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Debian packages the suite uses: GStreamer + RTSP server (camera tests, through PyGObject, which
# pip builds against libgirepository1.0-dev and libcairo2-dev); prometheus (server + promtool),
# systemd (systemd-analyze), shellcheck and util-linux (flock, unshare) for the deployment tests;
# mosquitto (the MQTT broker the bridge is tested against) and openssl (test certificates); chromium and
# chromium-driver (the live view's browser test: Selenium drives Debian's driver, nothing is downloaded); Aravis
# (genicam:// cameras, through PyGObject) and its fake GigE Vision camera for the GenICam tests.
export INSPECTD_APT_PACKAGES="gcc python3-dev pkg-config libgirepository1.0-dev libcairo2-dev gir1.2-gstreamer-1.0 \
 gir1.2-gst-plugins-base-1.0 gir1.2-gst-rtsp-server-1.0 gstreamer1.0-tools gstreamer1.0-plugins-base \
 gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav \
 prometheus systemd shellcheck util-linux mosquitto openssl chromium chromium-driver \
 gir1.2-aravis-0.8 aravis-tools aravis-tools-cli"
"$root/scripts/bootstrap.sh" dev
venv="${INSPECTD_VENV:-$root/.venv}"
# A second install with the `slim` extra only (no TensorFlow, no Keras): tests/test_slim.py runs the daemon in it and
# checks it publishes the events the TensorFlow path does.
slim="${INSPECTD_SLIM_VENV:-$root/.venv-slim}"
INSPECTD_VENV="$slim" INSPECTD_APT_PACKAGES="" "$root/scripts/bootstrap.sh" slim
export TEST_SLIM_PYTHON="$slim/bin/python"
cd "$root"
# Lint, format check and type-check first (pyproject's [tool.ruff] and [tool.mypy]): a finding fails the run before the
# 15-minute suite starts.
"$venv/bin/ruff" check inspectd tests benchmarks
"$venv/bin/ruff" format --check inspectd tests benchmarks
"$venv/bin/mypy" inspectd
exec "$venv/bin/python" -m pytest "$@"
