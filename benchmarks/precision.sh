#!/usr/bin/env bash
# Precision and `runtime = "auto"` on this machine (docs/performance.md#precision), for one model:
#  1. the quality gates: OpenVINO bfloat16 (where the CPU has it), INT8 for OpenVINO (NNCF) and ONNX Runtime, on
#     labelled images the calibration never saw (for builtin:demo: synthetic sets of two other seeds);
#  2. `inspectd export --runtime auto`: every runtime x hint x batch size measured, the table;
#  3. `inspectd bench` at each (runtime, precision) that passed and with auto: the bare model and the pipeline.
# Usage: benchmarks/precision.sh [MODEL] [OUT]   (MODEL default builtin:demo; a trained model calibrates and
# validates on its own training set unless CALIBRATION / VALIDATION name folders)
# Env: BATCH (bench batch size, default 4), SECONDS_EACH (bench measuring time, default 15), SIZE (camera WxH, 320x240)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="${1:-builtin:demo}"
out="${2:-$root/benchmarks/results/precision-$(date -u +%Y%m%dT%H%M%SZ)}"
py="${PYTHON:-$root/.venv/bin/python}"
batch="${BATCH:-4}" seconds="${SECONDS_EACH:-15}" size="${SIZE:-320x240}"
mkdir -p "$out"
cache="$out/cache"
run() { echo "+ inspectd $*" | tee -a "$out/log.txt" >&2; "$py" -m inspectd "$@" 2>>"$out/log.txt"; }

data=()
if [[ "$model" == builtin:demo && -z "${CALIBRATION:-}" ]]; then
    # the demo model was trained on synthetic images (seed 0); these seeds are other images of the same kind
    run synth "$out/calibration" --n 300 --size "$size" --seed 11 >/dev/null
    run synth "$out/validation" --n 200 --size "$size" --seed 12 >/dev/null
    CALIBRATION="$out/calibration" VALIDATION="$out/validation"
fi
[[ -n "${CALIBRATION:-}" ]] && data+=(--calibration "$CALIBRATION")
[[ -n "${VALIDATION:-}" ]] && data+=(--validation "$VALIDATION")
validation=()
[[ -n "${VALIDATION:-}" ]] && validation=(--validation "$VALIDATION")

{
    echo "# precision benchmark: $model, $(date -u +%FT%TZ)"
    echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) x$(nproc); flags:" \
        "$(grep -m1 -o -w -E 'avx512_bf16|amx_bf16|avx512_vnni|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ' || true)"
    echo
    echo '## quality gates'
    echo '```'
    passed=("onnxruntime float32" "openvino float32")
    if run export "$model" --runtime openvino --precision bfloat16 "${validation[@]}" --cache-dir "$cache"; then
        passed+=("openvino bfloat16")
    fi
    for rt in openvino onnxruntime; do
        if run export "$model" --runtime "$rt" --int8 "${data[@]}" --cache-dir "$cache"; then
            passed+=("$rt int8")
        fi
    done
    echo '```'
    echo
    echo '## runtime auto (float32)'
    echo '```'
    run export "$model" --runtime auto --cache-dir "$cache"
    echo '```'
    echo
    echo "## bench: batch $batch, $size, ${seconds} s each"
    echo '```'
    for pair in "${passed[@]}" "auto float32"; do
        read -r rt precision <<<"$pair"
        run bench --model "$model" --runtime "$rt" --precision "$precision" --batch "$batch" --cameras "$batch" \
            --size "$size" --seconds "$seconds" --cache-dir "$cache" --json >"$out/bench-$rt-$precision.json"
        "$py" - "$out/bench-$rt-$precision.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
b, p = r["bare_model"], r["pipeline"]
name = f"{b['runtime']}{'/' + b['hint'].lower() if b.get('hint') else ''} {b['precision']}"
tag = " (auto)" if r["options"]["runtime"] == "auto" else ""
print(f"{name + tag:<36} bare {b['fps']:8.1f} frames/s   pipeline {p['fps']:8.1f} ({p['fps'] / b['fps']:.2f}x)   residual {p['residual']}")
EOF
    done
    echo '```'
} | tee "$out/precision.md"
echo "wrote $out/precision.md" >&2
