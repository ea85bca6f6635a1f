#!/usr/bin/env bash
# FFR on real MNIST, Conv-4: the structured-sparsity claim and accuracy after pruning.
#   FFR (default weights 0.01/0.01): 5 epochs from random weights with the penalty, prune to 25% of
#        MACs by BN scale, 3 fine-tuning epochs
#   FFR (strong weights 0.5/0.5): the same, pruned to 10% of MACs
#   L1:  5 dense epochs (DENSE_CKPT) + L1 pruning to 25% / 10% of MACs + 3 fine-tuning epochs
#   FFR compiled: the default-weight run again with --ffr-compile on (the penalty compiled on the CPU)
#   plain: DENSE_CKPT itself, 5 epochs from random weights by the same training code with no
#        penalty (same one-cycle schedule, rate and seed as FFR's regularised training)
# Sparsity is measured before pruning, so it does not depend on the budget; then the time
# overhead of the penalty per training step, plain and FFR interleaved in one process, with the
# penalty eager and compiled.
# Usage: benchmarks/mnist_ffr.sh DATA_DIR [DENSE_CKPT]
# Writes benchmarks/results/mnist-conv4-ffr.{json,md}, mnist-conv4-ffr-scales.png and
# mnist-conv4-ffr-overhead{,-compiled}.json.
set -euo pipefail
data_dir=${1:?usage: $0 DATA_DIR [DENSE_CKPT]}
cd "$(dirname "$0")/.."
dense=${2:-runs/bench-mnist-conv4-l1-macs0.5/dense.pt}
[ -f "$dense" ] || benchmarks/mnist_conv4_l1.sh "$data_dir"
common=(--dataset mnist --data-dir "$data_dir" --overwrite --finetune-epochs 3)
ffr=(--model conv4 --from-scratch --method ffr --ffr-epochs 5)
r=runs/bench-ffr-mnist-conv4
compress run "${ffr[@]}" --budget-macs 0.25 --out $r-ffr-macs0.25 "${common[@]}"
compress run --checkpoint "$dense" --method l1 --budget-macs 0.25 --out $r-l1-macs0.25 "${common[@]}"
compress run "${ffr[@]}" --ffr-length 0.5 --ffr-curvature 0.5 --budget-macs 0.1 --out $r-ffr-strong-macs0.1 "${common[@]}"
compress run --checkpoint "$dense" --method l1 --budget-macs 0.1 --out $r-l1-macs0.1 "${common[@]}"
compress run "${ffr[@]}" --ffr-compile on --budget-macs 0.25 --out $r-ffr-compiled-macs0.25 "${common[@]}"
python benchmarks/summarize_runs.py mnist-conv4-ffr $r-ffr-macs0.25 $r-l1-macs0.25 $r-ffr-strong-macs0.1 $r-l1-macs0.1 \
  $r-ffr-compiled-macs0.25
python benchmarks/ffr_sparsity.py mnist-conv4-ffr "$dense" $r-ffr-macs0.25 $r-ffr-strong-macs0.1 $r-ffr-compiled-macs0.25
o=(--model conv4 --shape 1,28,28 --batch-size 128 --rounds 11)
python benchmarks/ffr_overhead.py "${o[@]}" --compile off --out mnist-conv4-ffr-overhead
python benchmarks/ffr_overhead.py "${o[@]}" --compile on --out mnist-conv4-ffr-overhead-compiled
