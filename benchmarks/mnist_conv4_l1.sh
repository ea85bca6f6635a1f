#!/usr/bin/env bash
# Conv-4 on real MNIST: dense accuracy, then L1 pruning to 50% of MACs and fine-tuning.
# Usage: benchmarks/mnist_conv4_l1.sh DATA_DIR   (DATA_DIR/mnist/{train,test} as ImageFolder trees,
#        e.g. `tar -xzf mnist-png.tar.gz -C DATA_DIR`; online, torchvision downloads MNIST instead)
# Writes benchmarks/results/mnist-conv4-l1-macs0.5.json: metrics.json of the run, which records
# the command, commit, device, data set, date and versions.
set -euo pipefail
data_dir=${1:?usage: $0 DATA_DIR}
cd "$(dirname "$0")/.."
out=runs/bench-mnist-conv4-l1-macs0.5
compress run --model conv4 --dataset mnist --data-dir "$data_dir" --method l1 --budget-macs 0.5 \
  --epochs 5 --finetune-epochs 3 --out "$out" --overwrite
mkdir -p benchmarks/results
cp "$out/metrics.json" benchmarks/results/mnist-conv4-l1-macs0.5.json
