#!/usr/bin/env bash
# resnet9's default recipe (the 94 % target) on a lent GPU, on the real CIFAR-10 carried to
# that machine as .gpu-data/cifar10 (see benchmarks/GPU.md), then evaluated once on the test
# split and exported. Three files land in $OUT (or /tmp/gpu-check elsewhere).
#   bash benchmarks/gpu_resnet9.sh [DATA_DIR]
set -uo pipefail
data=${1:-.gpu-data/cifar10}
out=${OUT:-/tmp/gpu-check}
run=/tmp/runs/cifar10-resnet9-gpu
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOOLKIT_PROGRESS=0 TOOLKIT_DATA=/tmp/toolkit-data
python=${PYTHON:-python3}

{
  start=$(date +%s)
  "$python" -m toolkit train resnet9 --data-dir "$data" --run-dir "$run" --device cuda &&
    echo "train wall seconds: $(( $(date +%s) - start ))" &&
    "$python" -m toolkit evaluate "$run" &&
    "$python" -m toolkit export "$run"
} 2>&1 | tee "$out/resnet9.log"
cp "$run/metrics.csv" "$out/resnet9-metrics.csv" 2>/dev/null
cp "$run/eval/metrics.json" "$out/resnet9-test.json" 2>/dev/null
