#!/usr/bin/env bash
# The runtimes on a GPU, for a GPU machine that reaches PyPI (the daemon's own path: TensorFlow, and ONNX
# Runtime's CUDA provider), from the repository root:
#
#     bash benchmarks/gpu_runtimes.sh                  # -> benchmarks/results/gpu-runtimes-*.{json,md,png}, .log
#     DRY_RUN=1 bash benchmarks/gpu_runtimes.sh        # the same steps on the CPU with this checkout's .venv, short
#
# Installs into a venv of its own (/tmp/inspectd-gpu-venv): inspectd[gpu,onnx,toolkit] (TensorFlow with its
# CUDA libraries from pip) and onnxruntime-gpu in place of onnxruntime (ONNX Runtime finds CUDA and cuDNN in
# the same nvidia-* pip packages). TensorRT is not tried: inspectd does not open ONNX Runtime's TensorRT
# provider, so INT8 is not measured on a GPU (the CUDA provider runs most of a QDQ graph in float). Then benchmarks/performance.py, three times (about 2-3 minutes each, 8 in all on a machine with
# 16 cores; the installs take longer on a fresh pip cache):
#   1. float32, XLA off: TensorFlow vs ONNX Runtime CUDA, batch 1/8/32; the daemon at max_batch 4 with 4 cameras;
#   2. float16 (mixed_float16) beside float32: TensorFlow, batch 1/8/32, after float16's quality gate on 60
#      synthetic images of the camera size (a random-weights model may well be refused: then float32 only);
#      the daemon (float32) at max_batch 16 with 16 cameras;
#   3. XLA on (float32): TensorFlow, batch 1/8/32; the daemon at max_batch 16 with 16 cameras.
# Each run: one round (--repeat 1), 5 s per measurement, the 752x480 EfficientNetV2B0 of docs/performance.md
# (made here with random weights: its speed is real, its outputs are not) unless MODEL/SIZE say otherwise.
# A run that fails is logged and the next one goes on (the float32 one again without ONNX Runtime, say
# when onnxruntime-gpu finds no CUDA it can load); the exit status is 1 if any run failed, 69 when the
# machine has no GPU or cannot install.
#
# The GPU machines lent to this project's development reach no registry; there benchmarks/gpu.sh (the
# model under Keras' JAX backend, wheels carried along) is what runs.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
log="$OUT/gpu-runtimes.log"
exec > >(tee "$log") 2>&1

if [[ -n "${DRY_RUN:-}" ]]; then
    py=.venv/bin/python device=cpu seconds=1 batches=1,2 size="${SIZE:-320x240}" model="${MODEL:-builtin:demo}"
    tag=dry-run dry=(--cameras 2 --pipeline-batch 2)  # later options win: 2 cameras, not 16, on 2 cores
else
    nvidia-smi || { echo "nvidia-smi failed: no NVIDIA GPU or driver"; exit 69; }
    venv=/tmp/inspectd-gpu-venv
    # py-spy names the daemon's threads in the CPU-per-thread tables
    python3 -m venv "$venv" && "$venv/bin/pip" install -q --upgrade pip &&
        "$venv/bin/pip" install -q -e '.[gpu,onnx,toolkit]' py-spy &&
        "$venv/bin/pip" uninstall -q -y onnxruntime && "$venv/bin/pip" install -q onnxruntime-gpu ||
        { echo "installing failed (does this machine reach PyPI?)"; exit 69; }
    py="$venv/bin/python" device=gpu:0 seconds=5 batches=1,8,32 size="${SIZE:-752x480}" model="${MODEL:-}"
    tag=gpu dry=()
    if [[ -z "$model" ]]; then
        model=runs/v2b0/v2b0-${size}.keras
        w=${size%x*} h=${size#*x}
        [[ -f "$model" ]] || { "$py" tests/fixtures/make_keras2_classifier.py runs/v2b0 --width "$w" --height "$h" &&
                              "$venv/bin/inspectd" convert runs/v2b0/reference.hdf5 --out "$model"; } ||
            { echo "making the EfficientNetV2B0 model failed"; exit 70; }
    fi
fi
"$py" -c 'import sys, tensorflow as tf; gpus = tf.config.list_physical_devices("GPU"); print("TensorFlow", tf.__version__,
"GPUs:", gpus); sys.exit(0 if gpus or sys.argv[1] == "cpu" else 69)' "$device" ||
    { echo "TensorFlow sees no GPU (CUDA libraries?)"; exit 69; }

failed=0
run() {  # name, then performance.py options; returns performance.py's exit status
    local name=$1
    shift
    echo "== $name: $*"
    "$py" benchmarks/performance.py --model "$model" --size "$size" --device "$device" --seconds "$seconds" \
        --repeat 1 --batches "$batches" --out "$OUT/gpu-runtimes-$tag-$name" "$@" ${dry[@]+"${dry[@]}"} && return 0
    echo "== $name failed"
    return 1
}
# With 16 cameras the RTSP pipeline's 16 x264 servers share the machine's CPU cores with the daemon.
run float32 --runtimes tensorflow,onnxruntime --cameras 4 --pipeline-batch 4 ||
    run float32-tensorflow --runtimes tensorflow --cameras 4 --pipeline-batch 4 || failed=$((failed + 1))
"$py" -m inspectd synth "$OUT/gpu-gate-data" --n 60 --size "$size" --seed 12 >/dev/null || failed=$((failed + 1))
run float16 --runtimes tensorflow --precisions float32,float16 --validation "$OUT/gpu-gate-data" --cameras 16 \
    --pipeline-batch 16 || failed=$((failed + 1))
run xla --runtimes tensorflow --xla --cameras 16 --pipeline-batch 16 || failed=$((failed + 1))
echo "results: $OUT/gpu-runtimes-$tag-*.md; $failed run(s) failed"
exit $((failed > 0))
