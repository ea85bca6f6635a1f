# Sourced by the benchmarks/gpu_*.sh scripts (from the repository root, with $py, $data and $dataset set):
# torch-pruning from the wheels and the data set from the archive that ../shared/tools/device-stage.sh
# stages under .device/, and this checkout on PYTHONPATH. A no-op where they are already in place.
if ! $py -c "import torch_pruning" 2>/dev/null; then
  if ls .device/wheels/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl \
      && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
  $py -c "import torch_pruning" 2>/dev/null || { echo "torch-pruning is not installed (stage it with ../shared/tools/device-stage.sh)"; exit 2; }
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
if [ "$dataset" = cifar10 ] && [ ! -d "$data/cifar10" ] && [ -f .device/data/cifar10-jpeg.tar.gz ]; then
  mkdir -p "$data" && tar -xzf .device/data/cifar10-jpeg.tar.gz -C "$data"
fi
