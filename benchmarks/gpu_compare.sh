#!/usr/bin/env bash
# Issue 15's GPU study: VGG-16 / CIFAR-10 at 16.56% of params, every method, 3 seeds, equal epochs,
# as one `compress compare` study that any session with a GPU continues where the last one stopped.
#
# Usage (from anywhere):  benchmarks/gpu_compare.sh DATA_DIR [STUDY_DIR]
#   DATA_DIR holds cifar10/{train,test}/<class>/*.jpg (../shared/data/cifar10-jpeg.tar.gz; on the GPU
#   machine, staged by ../shared/tools/device-stage.sh cifar10 and unpacked here from .device/data).
#
# Each invocation stays under 9 minutes: the study runs for BUDGET seconds (default 480) and is then
# stopped; the next invocation continues it (finished cells are read back, the interrupted one resumes
# from its last saved epoch). Every finished cell prints one line as it lands, and compare.md / .json /
# .png are rewritten after each cell. Run it again until it prints "study complete".
#
# Settings by environment (defaults in brackets):
#   DENSE_EPOCHS [100]  PRUNING_EPOCHS [40]  SEEDS [3]  BUDGETS [params:0.1656]
#   METHODS [l1,random,tp-l1,tp-l1-global,tp-bn,tp-taylor,tp-lamp,sensitivity,psap,ffr,smoea]
#   CRITERION ["--group-size 2 --population 32 --generations 10"] (the other criteria at their defaults, which
#   the Conv-4 CIFAR-10 study chose: FFR 1 regularised epoch, PSAP 1 step, sensitivity 2 steps)
#   CHECKPOINT [] (a trained dense model instead of DENSE_EPOCHS of training)  BUDGET [480]  DEVICE [cuda]
#   OVERHEAD_BATCH [512] (the batch of the masked-step timing, written to STUDY_DIR-masked-overhead.json)
# A CPU dry run: DEVICE=cpu MODEL=conv4 DATASET=synthetic DENSE_EPOCHS=1 PRUNING_EPOCHS=2 SEEDS=2 \
#   METHODS=l1,ffr CRITERION="--ffr-epochs 1" BUDGETS=params:0.3 benchmarks/gpu_compare.sh data /tmp/gpu-compare-dry
set -uo pipefail
data=${1:?usage: $0 DATA_DIR [STUDY_DIR]}
cd "$(dirname "$0")/.."
study=${2:-studies/gpu-vgg16-cifar10}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

dataset=${DATASET:-cifar10}
. benchmarks/device_setup.sh  # torch-pruning and the data from .device/

# First, once per study (about a minute on a GPU): what PSAP's masked training adds to a VGG-16 step, the masking
# hooks and the gradient watch timed apart (benchmarks/masked_overhead.py; an H100 once took 4.3 s per masked
# epoch against 3.0 s plain). Its time comes out of BUDGET.
overhead="${study%/}-masked-overhead.json"  # beside the study: its directory holds only the study
mkdir -p "$(dirname "$study")"
if [ ! -f "$overhead" ]; then
  timeout --kill-after=10 120 $py benchmarks/masked_overhead.py --model "${MODEL:-vgg16}" --device "${DEVICE:-cuda}" \
    --batch-size "${OVERHEAD_BATCH:-512}" --rounds 5 --steps 20 --out "$overhead" \
    || echo "masked-overhead: stopped or failed (the study goes on); it runs again next time"
fi
left=$(( ${BUDGET:-480} - SECONDS ))
[ "$left" -lt 60 ] && { echo "no time left for the study this run; run the same command again"; exit 124; }

start=(--epochs "${DENSE_EPOCHS:-100}")
[ -n "${CHECKPOINT:-}" ] && start=(--checkpoint "$CHECKPOINT")
# shellcheck disable=SC2206
criterion=(${CRITERION:---group-size 2 --population 32 --generations 10})
timeout --signal=INT --kill-after=30 "$left" $py -m compressor compare --model "${MODEL:-vgg16}" \
  --dataset "$dataset" --data-dir "$data" --device "${DEVICE:-cuda}" \
  --methods "${METHODS:-l1,random,tp-l1,tp-l1-global,tp-bn,tp-taylor,tp-lamp,sensitivity,psap,ffr,smoea}" \
  --budgets "${BUDGETS:-params:0.1656}" --seeds "${SEEDS:-3}" --pruning-epochs "${PRUNING_EPOCHS:-40}" \
  "${start[@]}" "${criterion[@]}" --out "$study"
status=$?
if [ "$status" -eq 0 ]; then
  echo "study complete: $study/compare.md"
elif [ "$status" -eq 124 ] || [ "$status" -eq 130 ]; then
  echo "stopped after ${BUDGET:-480}s to stay under the 9-minute limit; run the same command again to continue"
fi
[ -f "$study/compare.md" ] && cat "$study/compare.md"
exit "$status"
