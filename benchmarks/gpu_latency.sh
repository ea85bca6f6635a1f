#!/usr/bin/env bash
# Latency tables and the latency model on a GPU (issue 28): VGG-16 and ResNet-56 (CIFAR, random
# weights: latency does not depend on them) at batch 1 and 256, fp16, on each GPU latency backend
# this machine has: compile (torch.compile), ort-cuda (onnxruntime-gpu's CUDA provider), trt
# (TensorRT). For each: how long the table takes at the defaults, and the model's error on random
# widths timed whole (benchmarks/latency_tables.py).
#
# Usage (from anywhere):  benchmarks/gpu_latency.sh
# Every row is printed and written to RESULTS/gpu-latency-tables-<backend>.{json,md} as it lands; a row
# already there is skipped, so re-running continues. Measured points are cached in CACHE (default
# runs/gpu-latency-cache): name it in the device tool's `carry` so that a table cut off by the time
# limit goes on where it stopped on the next call. Each invocation stays under 9 minutes: no row
# starts after BUDGET seconds (default 420), and a hard stop at 520 s.
#
# Settings by environment (defaults in brackets):
#   MODELS [vgg16,resnet56]  BATCHES [1,256]  PRECISION [fp16]  BACKENDS [compile, ort-cuda if its CUDA
#   provider is installed, trt if TensorRT is installed]  VALIDATE [10]  BUDGET [420]  CACHE [runs/gpu-latency-cache]
#   RESULTS [benchmarks/results]  DEVICE [cuda]
# In the GPU image (Python 3.12, torch 2.11 CUDA 13, onnx, onnxruntime CPU only, no torch-pruning),
# torch-pruning comes from .device/wheels (../shared/tools/device-stage.sh), the CUDA provider from
# ../shared/tools/device-ort-gpu.sh.
# A CPU dry run of the whole script: DEVICE=cpu MODELS=conv4 BATCHES=1 PRECISION=fp32 BACKENDS=eager,ort-cpu \
#   VALIDATE=2 RESULTS=/tmp/gpu-latency-dry benchmarks/gpu_latency.sh
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${BUDGET:-420} results=${RESULTS:-benchmarks/results} cache=${CACHE:-runs/gpu-latency-cache}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
say() { echo "[gpu_latency $(date -u +%H:%M:%S), ${SECONDS}s] $*"; }

data=${DATA:-data} dataset=none  # no data set: random weights and inputs
. benchmarks/device_setup.sh  # torch-pruning from .device/, this checkout on PYTHONPATH
mkdir -p "$results" "$cache"

if [ -z "${BACKENDS:-}" ]; then
  BACKENDS=compile
  $py -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null \
    && BACKENDS+=",ort-cuda" || say "no onnxruntime CUDA provider: ort-cuda rows not run (../shared/tools/device-ort-gpu.sh)"
  $py -c "import tensorrt" 2>/dev/null && BACKENDS+=",trt" || say "no TensorRT: trt rows not run"
fi
$py -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

for backend in ${BACKENDS//,/ }; do
  left=$((budget - SECONDS))
  [ "$left" -le 30 ] && { say "budget spent: $backend left for the next run (re-run this script)"; continue; }
  say "$backend, ${PRECISION:-fp16}: ${MODELS:-vgg16,resnet56} at batch ${BATCHES:-1,256}"
  timeout --kill-after=10 $((520 - SECONDS)) $py benchmarks/latency_tables.py --models "${MODELS:-vgg16,resnet56}" \
    --batch-sizes "${BATCHES:-1,256}" --backend "$backend" --precision "${PRECISION:-fp16}" \
    --device "${DEVICE:-cuda}" --validate "${VALIDATE:-10}" --cache "$cache" --budget-seconds "$left" \
    --out "$results/gpu-latency-tables-$backend" \
    || say "$backend stopped (time limit or error): run this script again to continue from the cache"
done
say "done: $results/gpu-latency-tables-*.md"
[ -n "${OUT:-}" ] && cp "$results"/gpu-latency-tables-*.{json,md} "$OUT"/ 2>/dev/null
exit 0
