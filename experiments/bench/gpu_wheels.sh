#!/usr/bin/env bash
# Downloads, on a machine with network access, the wheels an offline GPU machine lacks for the
# benchmarks in gpu_suite.sh (an image with jax/flax/optax/orbax/chex/torch/torchvision/timm but
# not these), into .whl/, which git ignores; copy it to the GPU machine with the repository.
# Pure-Python or manylinux cp312 wheels: the GPU machine runs Python 3.12 on x86-64. (soundfile: data_pipelines.audio, imported
# by the grain pipelines.)
#   bash experiments/bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "grain==0.2.18" "array-record==0.8.6" "portpicker==1.6.0" "tensorboardX==2.6.5" \
  "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.2.13" \
  "soundfile==0.13.1" "cffi==2.0.0" "pycparser==2.23"
ls -la .whl
