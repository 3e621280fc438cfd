#!/usr/bin/env bash
# The README's main-job command: set up, then run the daemon on config.example.toml (two synthetic
# cameras, the bundled demo model, the live view on http://127.0.0.1:8080/) and a watcher that prints its
# events and saves masks and overlays of defects to demo-out/events/. Ctrl-C stops both cleanly.
#   scripts/demo.sh            run until Ctrl-C
#   scripts/demo.sh 30         stop by itself after 30 seconds
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# onnx: ONNX Runtime, the fastest CPU runtime measured; `runtime = "auto"` picks it (the demo model is converted
# once, at the first start, into ~/.cache/inspectd).
"$root/scripts/bootstrap.sh" toolkit,onnx
venv="${INSPECTD_VENV:-$root/.venv}"
seconds="${1:-0}"
out="$root/demo-out/events"
mkdir -p "$out"

# The demo attaches frames to defect events so the watcher can draw overlays.
INSPECTD_PUBLISH__ATTACH_FRAME=true "$venv/bin/inspectd" run --config "$root/config.example.toml" &
daemon=$!
stop() {
    trap - INT TERM EXIT
    # Background jobs of a script ignore SIGINT, so both are stopped with SIGTERM.
    [[ -n "${watcher:-}" ]] && kill -TERM "$watcher" 2>/dev/null || true
    kill -TERM "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
    echo "demo: stopped; masks and overlays of the defects seen are in $out/"
}
trap stop INT TERM EXIT

# Wait for the daemon to report ready (model warm, publisher bound).
for _ in $(seq 1 240); do
    "$venv/bin/python" - <<'PY' 2>/dev/null && break
import urllib.request; urllib.request.urlopen("http://127.0.0.1:9108/readyz", timeout=1)
PY
    kill -0 "$daemon" 2>/dev/null || { echo "demo: the daemon exited; see its messages above" >&2; exit 1; }
    sleep 0.5
done
echo "demo: daemon ready; live view at http://127.0.0.1:8080/ (open it in a browser); metrics at" \
     "http://127.0.0.1:9108/metrics; events on tcp://127.0.0.1:5556 (Ctrl-C stops)"

if [[ "$seconds" -gt 0 ]]; then
    timeout --signal=TERM "$seconds" "$venv/bin/inspectd" watch --save "$out" &
else
    "$venv/bin/inspectd" watch --save "$out" &
fi
watcher=$!
wait "$watcher" || true
