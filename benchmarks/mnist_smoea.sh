#!/usr/bin/env bash
# SMOEA vs L1 on real MNIST, Conv-4, at 25% and 16.56% of parameters (the paper's VGG-14 share),
# with equal fine-tuning epochs (5): SMOEA fine-tunes 1 epoch after each of its first 3 blocks
# and 2 at the end; L1 fine-tunes 5. Both start from the same 5-epoch dense model.
# The search is sized for a 2-core CPU: population 16, 10 generations, 1,024 validation images.
# Usage: benchmarks/mnist_smoea.sh DATA_DIR [DENSE_CKPT]
# Writes benchmarks/results/mnist-conv4-smoea.{json,md} and mnist-conv4-smoea-fronts-params*.png.
set -euo pipefail
data_dir=${1:?usage: $0 DATA_DIR [DENSE_CKPT]}
cd "$(dirname "$0")/.."
dense=${2:-runs/bench-mnist-conv4-l1-macs0.5/dense.pt}
[ -f "$dense" ] || benchmarks/mnist_conv4_l1.sh "$data_dir"
common=(--checkpoint "$dense" --dataset mnist --data-dir "$data_dir" --overwrite)
runs=()
for budget in 0.25 0.1656; do
  out=runs/bench-smoea-mnist-conv4-smoea-params$budget
  compress run --method smoea --population 16 --generations 10 --search-samples 1024 --step-epochs 1 \
    --budget-params "$budget" --finetune-epochs 2 --out "$out" "${common[@]}"
  cp "$out/smoea-fronts.png" "benchmarks/results/mnist-conv4-smoea-fronts-params$budget.png"
  runs+=("$out")
  out=runs/bench-smoea-mnist-conv4-l1-params$budget
  compress run --method l1 --budget-params "$budget" --finetune-epochs 5 --out "$out" "${common[@]}"
  runs+=("$out")
done
python benchmarks/summarize_runs.py mnist-conv4-smoea "${runs[@]}"
