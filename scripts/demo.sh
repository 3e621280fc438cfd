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
export INSPECTD_PUBLISH__ATTACH_FRAME=true
config="$root/config.example.toml"
# The addresses as the daemon will use them: the config file with every INSPECTD_* override applied.
if ! addresses="$("$venv/bin/python" - "$config" <<'PY'
import sys
from pathlib import Path

from inspectd.config import load_settings
from inspectd.errors import InspectdError

try:
    s = load_settings(Path(sys.argv[1]))
except InspectdError as exc:
    sys.exit(f"demo: {exc}")
local = lambda host: "127.0.0.1" if host in ("0.0.0.0", "::", "*") else (f"[{host}]" if ":" in host else host)
endpoint = s.publish.endpoint.replace("tcp://*:", "tcp://127.0.0.1:").replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
ui = f"http://{local(s.ui.host)}:{s.ui.port}/" if s.ui.enabled else ""
print(f"http://{local(s.metrics.host)}:{s.metrics.port}", endpoint, ui or "-")
PY
)"; then
    exit 1
fi
read -r metrics events ui <<<"$addresses"

"$venv/bin/inspectd" run --config "$config" &
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

# Wait for the daemon to report ready (model warm, publisher bound, frames arriving).
for _ in $(seq 1 240); do
    "$venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
        "$metrics/readyz" 2>/dev/null && break
    kill -0 "$daemon" 2>/dev/null || { echo "demo: the daemon exited; see its messages above" >&2; exit 1; }
    sleep 0.5
done
echo "demo: daemon ready; live view at ${ui/#-/off} (open it in a browser); metrics at $metrics/metrics;" \
     "events on $events (Ctrl-C stops)"

watch=("$venv/bin/inspectd" watch --save "$out" "$events")
if [[ "$seconds" -gt 0 ]]; then
    timeout --signal=TERM "$seconds" "${watch[@]}" &
else
    "${watch[@]}" &
fi
watcher=$!
wait "$watcher" || true
