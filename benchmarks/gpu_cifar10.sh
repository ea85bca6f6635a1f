#!/usr/bin/env bash
# GPU evidence for the criteria on real CIFAR-10 (JPEG q75 copy), meant for one GPU command each:
#   vgg16: dense VGG-16 (25 epochs); L1 (10 fine-tuning epochs) vs PSAP (5 steps of 2 epochs) at
#          10% of parameters; the FFR penalty's step-time overhead; FFR (25 epochs from scratch with
#          the penalty, 25% of MACs, 10 fine-tuning) vs L1 from the dense model (10 fine-tuning);
#          BN-scale sparsity, FFR vs the dense model (the same training without the penalty).
#   vgg14: dense VGG-14 (15 epochs); SMOEA (population 32, 10 generations, 1 fine-tuning epoch
#          between its 13 blocks, 10 at the end) vs L1 (22 fine-tuning epochs) at 16.56% of parameters.
# Usage: benchmarks/gpu_cifar10.sh DATA_DIR vgg16|vgg14 RESULTS_DIR
# Every step has its own time limit, so a slow one cannot take the others with it; the
# summaries go to RESULTS_DIR (benchmarks/results/gpu-cifar10-PART.{json,md}, ...).
set -uo pipefail
data=${1:?usage: $0 DATA_DIR vgg16|vgg14 RESULTS_DIR} part=${2:?} results=${3:?}
cd "$(dirname "$0")/.."
mkdir -p "$results"
run() { local limit=$1; shift; timeout "$limit" python3 -m compressor.cli run --dataset cifar10 --data-dir "$data" \
  --overwrite "$@" || echo "step failed or timed out: $*"; }
publish() { cp "benchmarks/results/$1".* "benchmarks/results/$1"-* "$results"/ 2>/dev/null; }
r=runs/gpu-cifar10
if [ "$part" = vgg16 ]; then
  run 170 --model vgg16 --epochs 25 --method l1 --budget-params 0.1 --finetune-epochs 10 --out $r-vgg16-l1-params0.1
  dense=$r-vgg16-l1-params0.1/dense.pt
  run 90 --checkpoint $dense --method psap --steps 5 --step-epochs 2 --finetune-epochs 0 --budget-params 0.1 \
    --out $r-vgg16-psap-params0.1
  timeout 45 python3 benchmarks/ffr_overhead.py --model vgg16 --shape 3,32,32 --batch-size 128 --out gpu-vgg16-ffr-overhead
  run 60 --checkpoint $dense --method l1 --budget-macs 0.25 --finetune-epochs 10 --out $r-vgg16-l1-macs0.25
  run 200 --model vgg16 --from-scratch --method ffr --ffr-epochs 25 --budget-macs 0.25 --finetune-epochs 10 \
    --out $r-vgg16-ffr-macs0.25
  python3 benchmarks/summarize_runs.py gpu-cifar10-vgg16 $r-vgg16-l1-params0.1 $r-vgg16-psap-params0.1 \
    $r-vgg16-l1-macs0.25 $r-vgg16-ffr-macs0.25
  [ -f $r-vgg16-ffr-macs0.25/metrics.json ] && python3 benchmarks/ffr_sparsity.py gpu-cifar10-vgg16 $dense \
    $r-vgg16-ffr-macs0.25
  publish gpu-cifar10-vgg16; publish gpu-vgg16-ffr-overhead
elif [ "$part" = vgg14 ]; then
  run 150 --model vgg14 --epochs 15 --method l1 --budget-params 0.1656 --finetune-epochs 22 --out $r-vgg14-l1-params0.1656
  run 220 --checkpoint $r-vgg14-l1-params0.1656/dense.pt --method smoea --population 32 --generations 10 \
    --step-epochs 1 --finetune-epochs 10 --budget-params 0.1656 --out $r-vgg14-smoea-params0.1656
  cp $r-vgg14-smoea-params0.1656/smoea-fronts.png benchmarks/results/gpu-cifar10-vgg14-smoea-fronts.png
  cp $r-vgg14-smoea-params0.1656/smoea-fronts.json benchmarks/results/gpu-cifar10-vgg14-smoea-fronts.json
  python3 benchmarks/summarize_runs.py gpu-cifar10-vgg14 $r-vgg14-l1-params0.1656 $r-vgg14-smoea-params0.1656
  publish gpu-cifar10-vgg14
fi
