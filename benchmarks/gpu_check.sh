#!/usr/bin/env bash
# The GPU checks, as one command for a session lent a GPU through the `device` tool:
#   bash benchmarks/gpu_check.sh        (benchmarks/GPU.md: the calls and their order)
# 1. the CUDA tests (tests/test_gpu.py: autocast, fp16 loss scaling, torch.compile,
#    GPU/CPU agreement, onnxruntime's CUDA provider where its wheel is installed);
# 2. training throughput, engine vs the reference loop, on random images of CIFAR-10's
#    shape (throughput does not depend on the pixels; the real data travels only with
#    gpu_resnet9.sh).
# Four files land in $OUT (the device tool returns at most 8), or /tmp/gpu-check elsewhere.
set -uo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOOLKIT_PROGRESS=0
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
"$python" -c "import torch, onnxruntime as ort; print('torch', torch.__version__,
  'cuda', torch.version.cuda, 'ort', ort.__version__, ort.get_available_providers())" \
  | tee -a "$out/gpu.txt"

timeout 240 "$python" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 \
  | tee "$out/pytest-gpu.log"

timeout 200 "$python" -m benchmarks.train_speed --synthetic --device cuda \
  --report train_speed-gpu 2>&1 | tail -30
cp benchmarks/train_speed-gpu.json benchmarks/train_speed-gpu.md "$out/" 2>/dev/null
