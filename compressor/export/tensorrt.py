"""TensorRT engines from ONNX, and a runner on torch CUDA tensors (no pycuda).

Written against the TensorRT 10.x Python API. TensorRT 10 still has the builder
precision flags (FP16, INT8) and the implicit int8 calibrators, though both are
deprecated in favour of *strongly typed* networks, whose precision comes from the ONNX
types (an fp16 ONNX, or explicit QuantizeLinear/DequantizeLinear nodes). From 11.x on,
only strongly typed networks are built here: fp16 then needs an fp16 ONNX, and int8
needs a Q/DQ ONNX (for example from NVIDIA Model Optimizer). ``_uses_precision_flags``
is the one place that decides.

TensorRT cannot be installed on the machines this project is built on, so this module
has not been executed there; its tests skip with the reason.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CompressorError
from ..files import atomic_path, write_json

PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = ("install TensorRT 10 with `pip install tensorrt` on a Linux or Windows machine with an NVIDIA GPU, "
                "its driver, and a CUDA build of torch")


def status() -> tuple[bool, str]:
    """(True, TensorRT version) when TensorRT imports and torch sees a CUDA GPU; else (False, why not)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return False, f"TensorRT is not installed ({exc})"
    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} is installed, but torch sees no CUDA GPU"
    return True, trt.__version__


def require():
    """The ``tensorrt`` module, or one CompressorError saying what is missing and what to install."""
    ok, why = status()
    if not ok:
        raise CompressorError(f"TensorRT engines need TensorRT and a CUDA GPU: {why}; {INSTALL_HINT}")
    import tensorrt as trt

    return trt


def _major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def _uses_precision_flags(trt) -> bool:
    """TensorRT 10 builds fp16/int8 from builder flags; 11+ only from the network's own types."""
    return _major(trt) < 11


def wants_fp16_onnx(precision: str) -> bool:
    """True where an fp16 engine must be built from an fp16 ONNX (strongly typed TensorRT 11+)."""
    return precision == "fp16" and not _uses_precision_flags(require())


def _onnx_types(onnx_path: Path) -> tuple[bool, bool]:
    """(has fp16 weights, has Q/DQ nodes) of an ONNX file."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    return fp16, qdq


def build_engine(onnx_path, engine_path, *, precision: str = "fp16", min_batch: int = 1, opt_batch: int = 32,
                 max_batch: int = 256, workspace_gib: float = 4.0, timing_cache=None, calibration_batches=None,
                 calibration_cache=None, source_sha256: str | None = None) -> Path:
    """Build and save an engine (plus a JSON sidecar) for the ONNX file's dynamic batch axis."""
    trt = require()
    if precision not in PRECISIONS:
        raise CompressorError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise CompressorError(f"need 1 <= min batch <= opt batch <= max batch, got {min_batch}, {opt_batch}, {max_batch}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise CompressorError(f"no ONNX file at {onnx_path}")
    fp16_onnx, qdq = _onnx_types(onnx_path)
    flags_mode = _uses_precision_flags(trt) and not qdq
    if not flags_mode:
        if precision == "fp16" and not fp16_onnx:
            raise CompressorError(f"TensorRT {trt.__version__} builds strongly typed networks: export the ONNX in "
                                  "fp16 (--onnx-fp16) for an fp16 engine")
        if precision == "int8" and not qdq:
            raise CompressorError(f"TensorRT {trt.__version__} has no implicit int8 calibration: quantize the model "
                                  "with explicit Q/DQ nodes (e.g. NVIDIA Model Optimizer) and build from that ONNX")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network_flags = 0 if flags_mode else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompressorError(f"TensorRT could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for tensor in inputs:
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise CompressorError(f"input {tensor.name!r} has dynamic dimensions besides the batch: {tuple(tensor.shape)}")
        profile.set_shape(tensor.name, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    if flags_mode and precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8 engines fall back to fp16 where int8 does not pay
    calibrator = None
    if flags_mode and precision == "int8":
        if not calibration_batches:
            raise CompressorError("an int8 engine needs calibration images (training batches)")
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = _calibrator(trt, calibration_batches, calibration_cache)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompressorError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache_path:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))

    def describe(tensor):
        return {"name": tensor.name, "shape": [int(d) for d in tensor.shape], "dtype": str(tensor.dtype)}

    write_json(sidecar_path(engine_path), {
        "inputs": [describe(t) for t in inputs],
        "outputs": [describe(network.get_output(i)) for i in range(network.num_outputs)],
        "precision": precision,
        "strongly_typed": not flags_mode,
        "batch": {"min": min_batch, "opt": opt_batch, "max": max_batch},
        "workspace_gib": workspace_gib,
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "onnx": onnx_path.name,
        "source_sha256": source_sha256,
    })
    return engine_path


def sidecar_path(engine_path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_suffix(engine_path.suffix + ".json")


def _calibrator(trt, batches, cache_path):
    """An entropy calibrator fed from torch CUDA tensors (TensorRT 10's implicit int8 path)."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = [b.detach().float().cuda().contiguous() for b in batches]
            self.index = 0
            self.current = None  # keeps the batch alive while TensorRT reads it

        def get_batch_size(self):
            return int(self.batches[0].shape[0])

        def get_batch(self, names):
            if self.index >= len(self.batches):
                return None
            self.current = self.batches[self.index]
            self.index += 1
            return [int(self.current.data_ptr())] * len(names)

        def read_calibration_cache(self):
            path = Path(cache_path) if cache_path else None
            return path.read_bytes() if path and path.is_file() else None

        def write_calibration_cache(self, cache):
            if cache_path:
                with atomic_path(cache_path) as tmp:
                    tmp.write_bytes(bytes(cache))

    return Calibrator()


def _torch_dtype(trt, dtype):
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT8: torch.int8,
             trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dtype not in table:
        raise CompressorError(f"unsupported TensorRT I/O type {dtype}")
    return table[dtype]


class TensorRTModel:
    """A deserialised engine called like a module: torch CUDA tensor in, torch CUDA tensor out.

    The buffers are torch tensors (``set_tensor_address``), and the engine runs on torch's
    current stream (``execute_async_v3``), so it composes with the rest of a torch program.
    """

    def __init__(self, engine_path: str | os.PathLike, device: int | None = None):
        trt = require()
        path = Path(engine_path)
        if not path.is_file():
            raise CompressorError(f"no TensorRT engine at {path}")
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise CompressorError(f"{path} is not an engine this TensorRT ({trt.__version__}) and GPU can load")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise CompressorError(f"expected one input and one output, found {inputs} and {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        low, _opt, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.batch_range = (int(low[0]), int(high[0]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.batch_range
        if not low <= x.shape[0] <= high:
            raise CompressorError(f"batch {x.shape[0]} is outside the engine's profile [{low}, {high}]")
        x = x.to(self.device, self.input_dtype).contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise CompressorError(f"the engine does not accept input shape {tuple(x.shape)}")
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                          device=self.device)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise CompressorError("TensorRT failed to execute the engine")
        return out.float()
