#!/usr/bin/env bash
# FFR on real MNIST, Conv-4: the structured-sparsity claim and accuracy after pruning.
#   FFR:    5 epochs from random weights with the penalty, prune by BN scale, 3 fine-tuning epochs
#   plain:  DENSE_CKPT, 5 epochs from random weights by the same training code with no penalty
#           (same one-cycle schedule, rate and seed as FFR's regularised training)
#   L1:     5 dense epochs (DENSE_CKPT) + L1 pruning + 3 fine-tuning epochs
# at 25% and 10% of MACs, then the time overhead of the penalty per step.
# Usage: benchmarks/mnist_ffr.sh DATA_DIR [DENSE_CKPT]
# Writes benchmarks/results/mnist-conv4-ffr.{json,md,png} and mnist-conv4-ffr-overhead.json.
set -euo pipefail
data_dir=${1:?usage: $0 DATA_DIR [DENSE_CKPT]}
cd "$(dirname "$0")/.."
dense=${2:-runs/bench-mnist-conv4-l1-macs0.5/dense.pt}
[ -f "$dense" ] || benchmarks/mnist_conv4_l1.sh "$data_dir"
common=(--dataset mnist --data-dir "$data_dir" --overwrite --finetune-epochs 3)
ffr=(--model conv4 --from-scratch --method ffr --ffr-epochs 5)
runs=()
for budget in 0.25 0.1; do
  compress run "${ffr[@]}" --budget-macs "$budget" --out runs/bench-ffr-mnist-conv4-ffr-macs$budget "${common[@]}"
  runs+=(runs/bench-ffr-mnist-conv4-ffr-macs$budget)
  compress run --checkpoint "$dense" --method l1 --budget-macs "$budget" --out runs/bench-ffr-mnist-conv4-l1-macs$budget \
    "${common[@]}"
  runs+=(runs/bench-ffr-mnist-conv4-l1-macs$budget)
done
python benchmarks/summarize_runs.py mnist-conv4-ffr "${runs[@]}"
python benchmarks/ffr_sparsity.py mnist-conv4-ffr "$dense" \
  runs/bench-ffr-mnist-conv4-ffr-macs0.25 runs/bench-ffr-mnist-conv4-ffr-macs0.1
python benchmarks/ffr_overhead.py --model conv4 --shape 1,28,28 --batch-size 128 --out mnist-conv4-ffr-overhead
