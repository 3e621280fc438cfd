#!/usr/bin/env bash
# Rebuilds the bundled demo model inspectd/assets/demo.keras with the project's own tools:
# synthetic 320x240 frames (what the example config's synthetic cameras render), train's chosen
# recipe (docs/quality.md): EfficientNet-Lite0 with its ImageNet weights (offline, from the toolkit
# extra), stride 16, global average pooling, mask rule min-max with its parameter picked on the
# validation masks; about 5 minutes on 2 CPU cores. Deterministic for the seeds up to
# TensorFlow's CPU nondeterminism; docs/daemon.md records the metrics of the committed file.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${INSPECTD_VENV:-$root/.venv}"
work="${1:-$root/runs/demo-model}"
"$venv/bin/inspectd" synth "$work/data" --n 400 --size 320x240 --seed 11
"$venv/bin/inspectd" train "$work/data" --out "$work/demo.keras" --backbone efficientnet_lite0 --weights imagenet \
    --stride 16 --pooling gap --mask-rule minmax --epochs 15 --batch-size 16 --input-size 160x128 --seed 0
"$venv/bin/inspectd" synth "$work/test" --n 100 --size 320x240 --seed 12
"$venv/bin/inspectd" evaluate "$work/demo.keras" "$work/test" --report "$work/report"
cp "$work/demo.keras" "$root/inspectd/assets/demo.keras"
echo "demo model: $root/inspectd/assets/demo.keras ($(du -h "$root/inspectd/assets/demo.keras" | cut -f1))"
# The same model exported for an install without TensorFlow (builtin:demo there; its manifest names demo.keras' sha256).
rm -rf "$root/inspectd/assets/demo-onnx"
"$venv/bin/inspectd" export "$root/inspectd/assets/demo.keras" --runtime onnxruntime --out "$root/inspectd/assets/demo-onnx"
