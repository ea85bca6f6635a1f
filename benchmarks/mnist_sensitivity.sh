#!/usr/bin/env bash
# Sensitivity vs L1 on real MNIST, Conv-4, at 50% and 25% of MACs with equal fine-tuning,
# and the paper's robustness claim: the layer ranking of an early model vs the final one.
# Usage: benchmarks/mnist_sensitivity.sh DATA_DIR [DENSE_CKPT]
#   DENSE_CKPT defaults to the dense model of benchmarks/mnist_conv4_l1.sh (5 epochs).
# Writes benchmarks/results/mnist-conv4-sensitivity.{json,md}.
set -euo pipefail
data_dir=${1:?usage: $0 DATA_DIR [DENSE_CKPT]}
cd "$(dirname "$0")/.."
dense=${2:-runs/bench-mnist-conv4-l1-macs0.5/dense.pt}
[ -f "$dense" ] || benchmarks/mnist_conv4_l1.sh "$data_dir"
runs=()
for budget in 0.5 0.25; do
  for method in l1 sensitivity; do
    out=runs/bench-sens-mnist-conv4-$method-macs$budget
    compress run --checkpoint "$dense" --dataset mnist --data-dir "$data_dir" --method "$method" \
      --budget-macs "$budget" --finetune-epochs 2 --out "$out" --overwrite
    runs+=("$out")
  done
done
# An early model: the same recipe stopped after 1 epoch (a separate run, same seed).
early=runs/bench-sens-mnist-conv4-early
compress run --model conv4 --dataset mnist --data-dir "$data_dir" --method l1 --budget-macs 0.5 \
  --epochs 1 --finetune-epochs 0 --out "$early" --overwrite
compress analyze "$early" --data-dir "$data_dir" --out "$early/analysis"
compress analyze "$(dirname "$dense")" --data-dir "$data_dir" --out runs/bench-sens-mnist-conv4-final-analysis
python benchmarks/summarize_sensitivity.py "$early/analysis/sensitivity.json" \
  runs/bench-sens-mnist-conv4-final-analysis/sensitivity.json "${runs[@]}"
