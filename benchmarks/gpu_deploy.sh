#!/usr/bin/env bash
# The GPU deployment table in one bounded run: VGG-16 / CIFAR-10 pruned by L1 to 25% of its
# MACs, dense against pruned (interleaved), on eager, torch.compile, AOTInductor, ONNX Runtime
# (the CUDA provider, when onnxruntime-gpu is installed) and TensorRT (when installed), in fp32
# and fp16 (and an int8 ONNX on ONNX Runtime), at batch sizes 1, 32, 256 and 1024. Accuracy is
# not the point here: the dense training is short (or give CHECKPOINT=path/to/dense.pt).
#
# Usage (from anywhere):  benchmarks/gpu_deploy.sh DATA_DIR [RUN_DIR]
#   DATA_DIR holds cifar10/{train,test}/<class>/*.jpg (../shared/data/cifar10-jpeg.tar.gz; on the
#   GPU machine, staged by ../shared/tools/device-stage.sh cifar10 and unpacked by its prefix).
#
# Every row is printed and appended to RUN_DIR/bench.jsonl as it lands. Re-running the same
# command continues: the finished run is kept, the finished points are skipped. Each
# invocation stays under 9 minutes: BUDGET seconds (default 480) for the whole script, each
# build and point capped at POINT_SECONDS, and a hard stop 30 s after the budget.
#
# Settings by environment (defaults in brackets):
#   DEVICE [cuda]  EPOCHS [3]  FINETUNE [1]  CHECKPOINT []  BATCHES [1,32,256,1024]
#   PRECISIONS [fp16,fp32 (+int8 where ORT runs)]  BACKENDS [eager,compile, ort if its CUDA provider is
#   installed, aoti, trt if TensorRT is installed]  COMPILE_MODE [reduce-overhead: CUDA graphs, quick to
#   compile]  POINT_SECONDS [60]  BUDGET [480]  ROUNDS [10]  MIN_SECONDS [0.3]  MIN_ITERS [30]  WARMUP [5]
#   RESULTS [benchmarks/results]  OVERWRITE [] (1: start the bench afresh)
# In the GPU image (Python 3.12, torch 2.11 CUDA 13, onnx, onnxruntime CPU only, no torch-pruning),
# torch-pruning comes from .device/wheels (device-stage.sh); ORT fp16 needs onnxconverter-common
# (DEVICE_WHEELS="onnxconverter-common" device-stage.sh) and the CUDA provider onnxruntime-gpu
# (../shared/tools/device-ort-gpu.sh). Without them those rows are noted, not run.
# A CPU dry run of the whole script: DEVICE=cpu MODEL=conv4 DATASET=synthetic BATCHES=1,4 PRECISIONS=fp32
#   BACKENDS=eager,ort EPOCHS=0 FINETUNE=0 benchmarks/gpu_deploy.sh data /tmp/deploy-dry
set -uo pipefail
data=${1:?usage: $0 DATA_DIR [RUN_DIR]}
cd "$(dirname "$0")/.."
run=${2:-runs/gpu-deploy-vgg16-l1-macs0.25}
device=${DEVICE:-cuda} budget=${BUDGET:-480} point=${POINT_SECONDS:-60}
model=${MODEL:-vgg16} dataset=${DATASET:-cifar10} results=${RESULTS:-benchmarks/results}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
left() { local n=$((budget - SECONDS)); [ "$n" -gt 1 ] && echo "$n" || echo 1; }
say() { echo "[gpu_deploy $(date -u +%H:%M:%S), ${SECONDS}s] $*"; }
notes=()

. benchmarks/device_setup.sh  # torch-pruning and the data from .device/

# 1. the run: short dense training (or CHECKPOINT), L1 to 25% of MACs, short fine-tuning; --resume keeps a finished one
if [ ! -f "$run/metrics.json" ]; then
  start=(--epochs "${EPOCHS:-3}")
  [ -n "${CHECKPOINT:-}" ] && start=(--checkpoint "$CHECKPOINT")
  say "run: $model / $dataset, l1 to 25% of MACs -> $run"
  timeout "$(left)" $py -m compressor.cli run --model "$model" --dataset "$dataset" --data-dir "$data" --method l1 \
    --budget-macs 0.25 "${start[@]}" --finetune-epochs "${FINETUNE:-1}" --device "$device" --out "$run" --resume \
    || { echo "the run failed or ran out of time; run this script again to continue it"; exit 1; }
fi

# 2. export the pruned model (ONNX, and the int8 ONNX where this checkout's export writes one) for the
#    accuracy column: export.json holds each artifact's accuracy where the export measures it
if [ ! -f "$run/export/export.json" ] && [ "$(left)" -gt 120 ]; then
  int8=$($py -c "from compressor.export import FORMATS; print(''.join(',' + f for f in FORMATS if 'int8' in f))" 2>/dev/null)
  [ -z "$int8" ] && notes+=("no int8 export format in this checkout yet: the int8 row is the bench's own QDQ ONNX (latency only, no accuracy)")
  say "export: onnx$int8"
  timeout 90 $py -m compressor.cli export "$run" --formats "onnx$int8" --data-dir "$data" >/dev/null \
    || notes+=("export failed or timed out: no artifact accuracy in the table")
fi

# 3. what this machine can run
backends=${BACKENDS:-}
if [ -z "$backends" ]; then
  backends=eager,compile
  if $py -c "import torch, onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null \
     || [ "$device" = cpu ]; then
    backends+=,ort
  else
    notes+=("ort: not run, onnxruntime has no CUDA provider here (../shared/tools/device-ort-gpu.sh brings onnxruntime-gpu)")
  fi
  backends+=,aoti
  if $py -c "import tensorrt" 2>/dev/null; then backends+=,trt; else notes+=("trt: not run, TensorRT is not installed"); fi
fi
precisions=${PRECISIONS:-}
if [ -z "$precisions" ]; then
  precisions=fp16,fp32
  [ "$device" = cpu ] && precisions=fp32
  case ",$backends," in *,ort,*) precisions+=,int8 ;; *) notes+=("int8: not run, it runs on ONNX Runtime only") ;; esac
fi
case ",$backends,:$precisions" in
  *,ort,*fp16*) $py -c "import onnxconverter_common" 2>/dev/null \
    || notes+=("ort fp16: needs onnxconverter-common (DEVICE_WHEELS=onnxconverter-common device-stage.sh); those rows fail") ;;
esac

# 4. the bench: streamed, capped, resumable
total=$(( $(left) - 20 ))
if [ "$total" -lt 30 ]; then
  echo "under 50 s of the budget left; run this script again to continue"; exit 1
fi
fresh=--resume; [ -n "${OVERWRITE:-}" ] && fresh=--overwrite
say "bench: backends $backends, precisions $precisions, batches ${BATCHES:-1,32,256,1024}, $total s"
timeout -k 5 $((total + 30)) $py -m compressor.cli bench "$run" --device "$device" --backends "$backends" \
  --precision "$precisions" --batch-sizes "${BATCHES:-1,32,256,1024}" --compile-mode "${COMPILE_MODE:-reduce-overhead}" \
  --point-seconds "$point" --total-seconds "$total" --rounds "${ROUNDS:-10}" --min-seconds "${MIN_SECONDS:-0.3}" \
  --min-iters "${MIN_ITERS:-30}" --warmup "${WARMUP:-5}" "$fresh" 2>&1 | tee -a "$run/gpu-deploy.log"
status=${PIPESTATUS[0]}
[ "$status" -ne 0 ] && echo "bench exited with $status; finished points are in $run/bench.jsonl: run this script again to continue"

# 5. the goals beside the table, and the results
if [ -f "$run/bench.json" ]; then
  $py - "$run" "${notes[@]}" <<'PY' | tee "$run/bench-goals.md"
import json, sys
from pathlib import Path
from compressor.bench import report
run = Path(sys.argv[1])
result = json.loads((run / "bench.json").read_text())
print(f"## Goals ({result['device']}, commit {result['versions'].get('commit')})\n")
print("\n".join(report.goals(result, batch=256, precision="fp16", min_speedup=3.4, max_latency_ms=0.15)))
if not result.get("complete", True):
    print("- the budget ran out before every point: run the script again to finish the table")
if sys.argv[2:]:
    print("\n## Not run\n")
    print("\n".join(f"- {n}" for n in sys.argv[2:]))
PY
  mkdir -p "$results"
  name="gpu-deploy-$model-$dataset"
  [ "$device" = cpu ] && name="cpu-dryrun-deploy-$model-$dataset"
  for f in bench.json bench.md bench-goals.md bench.jsonl bench-speedup.png bench-latency.png; do
    [ -f "$run/$f" ] && cp "$run/$f" "$results/$name-$f"
  done
  say "done; results in $results/$name-*"
fi
exit "$status"
