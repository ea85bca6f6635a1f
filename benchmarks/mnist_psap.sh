#!/usr/bin/env bash
# PSAP vs L1 on real MNIST, Conv-4, at 25% and 10% of parameters, with equal total epochs (8):
#   L1:                 5 dense epochs (DENSE_CKPT) + 3 fine-tuning epochs
#   PSAP:               5 dense epochs (DENSE_CKPT) + 3 prune-train steps of 1 epoch, no further fine-tuning
#   PSAP from scratch:  4 prune-train steps of 2 epochs from random weights
#   PSAP, --protect-z 1: as PSAP, with a lower bar for restoring a masked filter (10% only)
# Usage: benchmarks/mnist_psap.sh DATA_DIR [DENSE_CKPT]
# Writes benchmarks/results/mnist-conv4-psap.{json,md}.
set -euo pipefail
data_dir=${1:?usage: $0 DATA_DIR [DENSE_CKPT]}
cd "$(dirname "$0")/.."
dense=${2:-runs/bench-mnist-conv4-l1-macs0.5/dense.pt}
[ -f "$dense" ] || benchmarks/mnist_conv4_l1.sh "$data_dir"
common=(--dataset mnist --data-dir "$data_dir" --overwrite)
runs=()
for budget in 0.25 0.1; do
  out=runs/bench-psap-mnist-conv4-l1-params$budget
  compress run --checkpoint "$dense" --method l1 --budget-params "$budget" --finetune-epochs 3 --out "$out" "${common[@]}"
  runs+=("$out")
  out=runs/bench-psap-mnist-conv4-psap-params$budget
  compress run --checkpoint "$dense" --method psap --steps 3 --step-epochs 1 --budget-params "$budget" \
    --finetune-epochs 0 --out "$out" "${common[@]}"
  runs+=("$out")
  out=runs/bench-psap-mnist-conv4-psap-scratch-params$budget
  compress run --model conv4 --from-scratch --method psap --steps 4 --step-epochs 2 --budget-params "$budget" \
    --finetune-epochs 0 --out "$out" "${common[@]}"
  runs+=("$out")
done
out=runs/bench-psap-mnist-conv4-psap-z1-params0.1
compress run --checkpoint "$dense" --method psap --steps 3 --step-epochs 1 --protect-z 1 --budget-params 0.1 \
  --finetune-epochs 0 --out "$out" "${common[@]}"
runs+=("$out")
python benchmarks/summarize_runs.py mnist-conv4-psap "${runs[@]}"
