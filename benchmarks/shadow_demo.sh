#!/usr/bin/env bash
# A shadow model end to end, as docs/models.md shows it: two real models trained here on synthetic data, a weaker
# one (1 epoch) in production and a stronger one (12 epochs) as its shadow, a daemon on two synthetic cameras for
# SECONDS (default 90), then `inspectd shadow report`. Usage: benchmarks/shadow_demo.sh [OUT_DIR] [SECONDS]
set -euo pipefail
out=${1:-runs/shadow-demo}
seconds=${2:-90}
inspectd=${INSPECTD:-.venv/bin/inspectd}
mkdir -p "$out"
[ -d "$out/synth" ] || "$inspectd" synth "$out/synth" --n 240 --size 96x96 --seed 1
for spec in weak:1 strong:12; do
  name=${spec%%:*} epochs=${spec##*:}
  [ -f "$out/$name.keras" ] || "$inspectd" train "$out/synth" --out "$out/$name.keras" --epochs "$epochs" \
    --input-size 96x96 --backbone efficientnetv2b0 --weights none --stride 16 --mask-rule probability --seed 0
done
rm -rf "$out/archive"
cat > "$out/config.toml" <<EOF
[[models]]
id = "top"
path = "weak.keras"

[[models]]
id = "top-next"
path = "strong.keras"
shadow_of = "top"

[archive]
dir = "archive"

[metrics]
port = 0

[publish]
endpoint = "tcp://127.0.0.1:0"

[[cameras]]
id = "line1-a"
url = "synthetic://?fps=6&width=96&height=96&defect_rate=0.5&seed=11"
model = "top"

[[cameras]]
id = "line1-b"
url = "synthetic://?fps=6&width=96&height=96&defect_rate=0.5&seed=12"
model = "top"
EOF
timeout -s TERM "$seconds" "$inspectd" run --config "$out/config.toml" 2> "$out/daemon.log" || true
"$inspectd" shadow report --config "$out/config.toml"
