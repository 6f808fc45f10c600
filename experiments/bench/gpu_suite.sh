#!/usr/bin/env bash
# Every GPU measurement (the fused loss kernels; the CLIP step against open_clip's) in one command,
# results as JSON under $OUT. Run `bash experiments/bench/gpu_wheels.sh` on a machine with network
# access first, copy the repository with its `.whl/` folder to the GPU machine, then there:
#   bash experiments/bench/gpu_suite.sh [STAGE ...]     # stages: tests loss clip openclip fed accum profile
# Each stage writes $OUT/<stage>.json (or .log) and a failing stage does not stop the others.
set -uo pipefail
OUT=${OUT:-/tmp/mmcl_gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
STAGES=${*:-tests loss clip openclip fed accum profile}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv"
for s in $STAGES; do
  echo "=== $s $(date -u +%T)"
  case $s in
    tests)    python3 -m pytest -q -x tests/losses/test_fused_gpu.py 2>&1 | tail -20 > "$OUT/tests.log" ;;
    loss)     python3 experiments/bench/loss.py --dim 512 --dtype bfloat16 --loss infonce sigmoid_loss \
                --batch 65536 262144 1048576 --impl fused tiled --json "$OUT/loss.json" ;;
    clip)     python3 experiments/bench/train_step.py --preset vit-b16 --batch 256 \
                --json "$OUT/clip_b256.json" ;;
    openclip) XLA_PYTHON_CLIENT_PREALLOCATE=false python3 experiments/bench/open_clip_step.py \
                --batch 256 --json "$OUT/openclip_eager.json"
              XLA_PYTHON_CLIENT_PREALLOCATE=false python3 experiments/bench/open_clip_step.py \
                --batch 256 --compile --json "$OUT/openclip_compile.json" ;;
    fed)      python3 -m mmcl.cli data build-shapes --output /tmp/shapes224 --num-train 4096 \
                --num-test 16 --image-size 224 > /dev/null
              python3 experiments/bench/train_step.py --preset vit-b16 --batch 256 \
                --data /tmp/shapes224 --json "$OUT/clip_fed.json" ;;
    accum)    python3 experiments/bench/train_step.py --preset vit-b16 --batch 32768 --grad-accum 128 \
                --grad-cache --steps 2 --warmup 1 --no-checkpoint --json "$OUT/clip_b32k.json" ;;
    profile)  python3 experiments/bench/train_step.py --preset vit-b16 --batch 256 --steps 5 \
                --no-checkpoint --profile "$OUT/trace" --json "$OUT/clip_profile.json" ;;
    *) echo "unknown stage $s" ;;
  esac
done
ls -la "$OUT"
