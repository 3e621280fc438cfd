#!/usr/bin/env bash
# The GPU benchmark on a bare, offline GPU machine, from the repository root:
#
#     bash benchmarks/gpu.sh [extra gpu_models.py options]     # writes $OUT/gpu.json and $OUT/gpu.log
#     ALLOW_CPU=1 bash benchmarks/gpu.sh --batches 1 2 --seconds 0.5 --v2b0-size 160x128 --deadline 0   # dry run, no GPU
#
# Why Keras' JAX backend: the machine we are lent has Python with jax (CUDA), numpy, h5py, ml-dtypes,
# rich and absl-py but no TensorFlow and no Keras, and nothing can be downloaded there; a TensorFlow
# wheel (~600 MB) cannot travel with the working tree (64 MiB per call). Our model files are standard
# Keras 3 `.keras` archives whose layers are Keras layers and Keras ops (the custom one, TopKMean,
# included), so the same artefact loads under any Keras backend: Keras itself and the small pure or
# prebuilt wheels it needs travel in .whl/ (not committed: .git/info/exclude), and are installed into
# /tmp/site without touching the image's packages. Make .whl/ on a machine that reaches PyPI:
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#         --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#         keras==3.15.1 namex==0.1.0 optree==0.20.0 typing-extensions==4.16.0
#
# The inspectd code on the load path (inspectd.model.deployable, .head, .convert, .backbones,
# inspectd.pipeline.engine's with_policy, inspectd.model.masks) imports neither TensorFlow nor
# pydantic nor OpenCV, so the package runs from the checkout (PYTHONPATH) without its own dependencies.
#
# On a GPU machine that has TensorFlow (pip install 'inspectd[gpu]'), run the same benchmark under
# TensorFlow directly, no wheels needed; its modes there are jit (XLA), graph (the daemon's
# tf.function) and eager:
#
#     KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/gpu_models.py --modes jit graph eager --out runs/gpu-tf.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
mkdir -p "$OUT"

{
    if compgen -G ".whl/*.whl" >/dev/null; then
        rm -rf /tmp/site
        if ! { python3 -m pip --version >/dev/null 2>&1 &&
               python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; }; then
            echo "pip missing or failed: unpacking the wheels (a wheel is a zip laid out for site-packages)"
            rm -rf /tmp/site
            python3 -c 'import glob, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site") for w in glob.glob(".whl/*.whl")]'
        fi
        export PYTHONPATH="/tmp/site:$PWD"
        echo "installed into /tmp/site:" .whl/*.whl
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        echo "no .whl/: using the Keras already installed"
    fi
    nvidia-smi || echo "nvidia-smi failed (exit $?)"
    # Without a GPU the benchmark stops at once (exit 3); ALLOW_CPU=1 runs it on the CPU (a dry run).
    KERAS_BACKEND="${KERAS_BACKEND:-jax}" python3 benchmarks/gpu_models.py ${ALLOW_CPU:+--allow-cpu} --out "$OUT/gpu.json" "$@"
} 2>&1 | tee "$OUT/gpu.log"
