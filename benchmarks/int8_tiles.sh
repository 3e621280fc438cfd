#!/usr/bin/env bash
# INT8 and bfloat16 on a real model with data it never saw (docs/performance.md#precision): a Lite0 model trained on
# the magnetic-tile images (train's recipe, 256x256, EPOCHS epochs), its quality gates on the held-out 25 % test
# split (never used for training, the epoch, the mask rule or the calibration; calibration = the training split),
# and the bare model per runtime, precision and batch size: one benchmarks/performance.py run.
# Usage: benchmarks/int8_tiles.sh TILES [OUT]   (TILES: ok/, defect/, masks/ as the Magnetic Tile dataset's subset)
# Env: EPOCHS (default 12), SECONDS_EACH (default 10), MODEL (skip training: an existing model of this split)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tiles="${1:?usage: benchmarks/int8_tiles.sh TILES [OUT]}"
out="${2:-$root/runs/int8-tiles}"
py="${PYTHON:-$root/.venv/bin/python}"
mkdir -p "$out"
tiles="$(cd "$tiles" && pwd)" out="$(cd "$out" && pwd)"
cd "$root"
"$py" - "$tiles" "$out/split" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from quality import split_tiles  # the 25 % test split of docs/quality.md (seed 0)

print(split_tiles(Path(sys.argv[1]), Path(sys.argv[2]), 0.25, 0))
PY
model="${MODEL:-$out/tiles-lite0.keras}"
if [[ ! -f "$model" ]]; then
    "$py" -m inspectd train "$out/split/train" --out "$model" --input-size 256x256 --epochs "${EPOCHS:-12}" --seed 0
fi
"$py" benchmarks/performance.py --model "$model" --size 256x256 --runtimes onnxruntime,openvino --batches 1,4 \
    --precisions float32,bfloat16,int8 --validation "$out/split/test" --repeat 1 --seconds "${SECONDS_EACH:-10}" \
    --out "$root/benchmarks/results/performance-tiles-int8"
