#!/usr/bin/env bash
# CPU latency of CIFAR VGG-16, dense vs uniform-L1-pruned to 25% of MACs (about 50% of the
# channels of every layer), on ONNX Runtime (CPU provider) and an AOTInductor CPU package,
# at batch 1 and 32. Both models are timed side by side in one process, so the speedups
# are ratios measured under the same conditions; the absolute CPU times are not claims.
# The weights are untrained (0 epochs): latency does not depend on them.
# Usage: benchmarks/cpu_vgg16_latency.sh DATA_DIR   (DATA_DIR/cifar10/{train,test})
# Writes benchmarks/results/cpu-vgg16-l1-macs0.25-bench.{json,md} and the two plots.
set -euo pipefail
data_dir=${1:?usage: $0 DATA_DIR}
cd "$(dirname "$0")/.."
out=runs/bench-cpu-vgg16-l1-macs0.25
compress run --model vgg16 --dataset cifar10 --data-dir "$data_dir" --method l1 --budget-macs 0.25 \
  --epochs 0 --finetune-epochs 0 --device cpu --out "$out" --overwrite
compress bench "$out" --device cpu --backends ort,aoti --batch-sizes 1,32 --min-iters 50 --min-seconds 5
mkdir -p benchmarks/results
for f in bench.json bench.md bench-speedup.png bench-latency.png; do
  cp "$out/$f" "benchmarks/results/cpu-vgg16-l1-macs0.25-$f"
done
