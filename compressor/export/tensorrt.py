"""TensorRT engines from ONNX, and a runner on torch CUDA tensors (no pycuda).

Written against the TensorRT 10.x Python API. TensorRT 10 can still build *weakly typed*
networks, where builder flags (FP16, INT8 with an implicit calibrator) let it pick lower
precisions; both are deprecated there. TensorRT 11 removed them: every network is
*strongly typed*, so precision comes from the ONNX itself (an fp16 ONNX, or explicit
QuantizeLinear/DequantizeLinear nodes: compress's own ``onnx-int8`` export, made by ONNX
Runtime's static quantizer, or NVIDIA Model Optimizer). All of that branching lives in
:func:`plan_precision` and :func:`plan_int8`.

TensorRT cannot be installed on the machines this project is developed on, so its tests
skip there with the reason; nothing here has been executed against a real TensorRT yet.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch

from ..artifacts import sidecar_path
from ..errors import CompressorError
from ..files import atomic_path, write_json

PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = ("on a Linux or Windows machine with an NVIDIA GPU and its driver, `pip install tensorrt` "
                "(TensorRT 10 or later) and use a CUDA build of torch")


def status() -> tuple[bool, str]:
    """(True, TensorRT version) when TensorRT imports and torch sees a CUDA GPU; else (False, why not).

    The one place that detects TensorRT: :func:`available`, :func:`require` and every caller
    (export, bench, the CLI, the runtime loader) ask here.
    """
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError when its CUDA libraries are missing
        return False, f"TensorRT is not installed or does not load ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return False, (f"TensorRT {trt.__version__} is installed, "
                       f"but torch ({torch.__version__}, {build}) sees no CUDA GPU")
    return True, trt.__version__


def available() -> bool:
    """Whether TensorRT engines can be built and run here (TensorRT and a CUDA GPU)."""
    return status()[0]


def require():
    """The ``tensorrt`` module, or one CompressorError saying what is missing and what to install.

    Every entry point calls this first, so a missing TensorRT is one line, never an ImportError.
    """
    ok, why = status()
    if not ok:
        raise CompressorError(f"TensorRT engines need TensorRT and a CUDA GPU: {why}; {INSTALL_HINT}")
    import tensorrt as trt

    return trt


def check_profile(min_batch: int, opt_batch: int, max_batch: int) -> None:
    """The optimization profile's batch sizes, in order: 1 <= min <= opt <= max, or one clear error."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise CompressorError(f"need 1 <= min batch <= opt batch <= max batch, "
                              f"got {min_batch}, {opt_batch}, {max_batch}")


def major_version(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def plan_precision(major: int, precision: str, fp16_onnx: bool, qdq: bool) -> tuple[bool, tuple[str, ...]]:
    """(strongly typed?, builder flag names) for building ``precision`` from this ONNX on TensorRT ``major``.

    The one place that knows the version differences. TensorRT 10: plain ONNX is built weakly
    typed with the FP16 / INT8 flags (INT8 also gets FP16, so layers that do not pay in int8
    fall back to fp16, not fp32); a Q/DQ ONNX is built strongly typed. TensorRT 11+: always
    strongly typed, so the ONNX must already carry the precision.
    """
    if precision not in PRECISIONS:
        raise CompressorError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if qdq and precision != "int8":
        raise CompressorError("this ONNX has QuantizeLinear/DequantizeLinear nodes, so it builds an int8 engine: "
                              "use precision int8")
    if fp16_onnx and not qdq and precision != "fp16":
        raise CompressorError(f"this ONNX has fp16 weights, so it cannot build an {precision} engine: "
                              "export an fp32 ONNX")
    if qdq:
        return True, ()
    if major >= 11:
        if precision == "fp16" and not fp16_onnx:
            raise CompressorError(f"TensorRT {major}.x removed the FP16 builder flag (strongly typed networks only): "
                                  "build an fp16 engine from an fp16 ONNX (export with --onnx-fp16, or convert it "
                                  "with NVIDIA Model Optimizer AutoCast)")
        if precision == "int8":
            raise CompressorError(f"TensorRT {major}.x removed implicit int8 calibration: quantize the model with "
                                  "explicit Q/DQ nodes (compress export --formats onnx-int8, or NVIDIA Model "
                                  "Optimizer, `pip install nvidia-modelopt`) and build from that Q/DQ ONNX")
        return True, ()
    return False, {"fp32": (), "fp16": ("FP16",), "int8": ("FP16", "INT8")}[precision]


INT8_SOURCES = ("qdq", "calibrator")


def plan_int8(major: int, source: str) -> str:
    """Where an int8 engine's scales come from on TensorRT ``major``: ``"qdq"`` or ``"calibrator"``.

    ``qdq`` (explicit quantization, TensorRT 10's preferred path and 11's only one): the engine
    is built from the Q/DQ ONNX of ``--export onnx-int8``, strongly typed, with no calibrator and
    no precision flags; the scales are the ones ONNX Runtime calibrated and that file was checked
    with. ``calibrator`` (implicit quantization): the fp32 ONNX with the INT8 flag and an
    IInt8EntropyCalibrator2 fed with training images; deprecated in TensorRT 10, removed in 11.
    """
    if source not in INT8_SOURCES:
        raise CompressorError(f"--trt-int8 must be one of {', '.join(INT8_SOURCES)}, not {source!r}")
    if source == "calibrator" and major >= 11:
        raise CompressorError(f"TensorRT {major}.x removed implicit int8 calibration: build int8 from the Q/DQ ONNX "
                              "(--trt-int8 qdq, the default)")
    return source


def wants_fp16_onnx(precision: str) -> bool:
    """True where an fp16 engine must be built from an fp16 ONNX (TensorRT 11+, strongly typed only)."""
    return precision == "fp16" and major_version(require()) >= 11


def onnx_types(onnx_path) -> tuple[bool, bool]:
    """(has fp16 weights, has Q/DQ nodes) of an ONNX file: what a strongly typed build will run in."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        raise CompressorError(f"{onnx_path} is not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    graphs = [model.graph, *(f for f in model.functions)]
    fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for g in graphs for n in g.node)
    return fp16, qdq


def build_engine(onnx_path, engine_path, *, precision: str = "fp16", min_batch: int = 1, opt_batch: int = 32,
                 max_batch: int = 256, workspace_gib: float = 4.0, timing_cache=None, calibration_batches=None,
                 calibration_cache=None, source_sha256: str | None = None) -> Path:
    """Build ``engine_path`` (and its JSON sidecar) from an ONNX file whose dim 0 is a dynamic batch.

    The engine is written atomically, after its sidecar, so an engine file that exists is finished.
    An int8 engine from a Q/DQ ONNX (``compress export --formats onnx-int8``) is explicitly
    quantized: built strongly typed, with no calibrator, and ``calibration_batches`` are not used.
    From a plain fp32 ONNX (TensorRT 10 only), ``calibration_batches`` (float32 NCHW tensors,
    normalised) feed the implicit int8 calibrator; with an existing ``calibration_cache`` they
    may be omitted.
    """
    trt = require()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise CompressorError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    check_profile(min_batch, opt_batch, max_batch)
    if not workspace_gib > 0:
        raise CompressorError(f"the TensorRT workspace must be positive, got {workspace_gib} GiB")
    if not onnx_path.is_file():
        raise CompressorError(f"no ONNX file at {onnx_path}")
    fp16_onnx, qdq = onnx_types(onnx_path)
    strongly_typed, flags = plan_precision(major_version(trt), precision, fp16_onnx, qdq)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network_flags = 0  # explicit batch is the only mode since TensorRT 10; 11 is always strongly typed
    if strongly_typed and major_version(trt) < 11:
        network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no details"
        raise CompressorError(f"TensorRT could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    profile = builder.create_optimization_profile()
    for tensor in inputs:
        shape = tuple(tensor.shape)
        if not shape or shape[0] != -1 or any(d < 0 for d in shape[1:]):
            raise CompressorError(f"input {tensor.name!r} of {onnx_path.name} has shape {shape}: only dim 0 (batch) "
                                  "may be dynamic, and it must be (export with a dynamic batch axis)")
        rest = shape[1:]
        profile.set_shape(tensor.name, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    for name in flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    calibrator = None
    if "INT8" in flags:
        if len(inputs) != 1:
            raise CompressorError(f"int8 calibration here feeds one input, but {onnx_path.name} has {len(inputs)}")
        calibrator = _calibrator(trt, calibration_batches, calibration_cache, tuple(inputs[0].shape)[1:], opt_batch)
        config.int8_calibrator = calibrator
        # calibration runs at one fixed shape: a profile of its own, with min = opt = max
        calibration_profile = builder.create_optimization_profile()
        calibration_profile.set_shape(inputs[0].name, *[calibrator.shape] * 3)
        if not config.set_calibration_profile(calibration_profile):
            raise CompressorError(f"TensorRT rejected the calibration shape {calibrator.shape}")

    cache_path = Path(timing_cache) if timing_cache else None
    _attach_timing_cache(config, cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompressorError(f"TensorRT failed to build a {precision} engine from {onnx_path.name} "
                              "(its log above says why)")
    if cache_path:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))

    def describe(tensor):
        return {"name": tensor.name, "shape": [int(d) for d in tensor.shape], "dtype": _dtype_name(trt, tensor.dtype)}

    write_json(sidecar_path(engine_path), {
        "inputs": [describe(t) for t in inputs],
        "outputs": [describe(t) for t in outputs],
        "precision": precision,
        "strongly_typed": strongly_typed,
        "min_batch": min_batch,
        "opt_batch": opt_batch,
        "max_batch": max_batch,
        "workspace_gib": workspace_gib,
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "onnx": onnx_path.name,
        "source_sha256": source_sha256,
        "calibration_batches": calibrator.used if calibrator is not None else None,
        "quantization": ("explicit (Q/DQ in the ONNX)" if qdq else
                         "implicit (int8 calibrator)" if calibrator is not None else None),
    })
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    return engine_path


def _attach_timing_cache(config, cache_path: Path | None) -> None:
    """Reuse layer timings from earlier builds; a cache from another GPU or TensorRT is replaced, not fatal."""
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    if blob:
        try:
            cache = config.create_timing_cache(blob)
            if cache is not None and config.set_timing_cache(cache, False):
                return
        except Exception:  # a truncated or foreign file
            pass
        print(f"TensorRT: timing cache {cache_path} does not match this GPU or TensorRT; starting a new one")
    config.set_timing_cache(config.create_timing_cache(b""), False)


def _dtype_name(trt, dtype) -> str:
    """'float32', 'float16', ... rather than 'DataType.FLOAT', so the sidecar reads without TensorRT."""
    try:
        import numpy as np

        return np.dtype(trt.nptype(dtype)).name
    except Exception:
        return str(dtype).rsplit(".", 1)[-1].lower()


def _calibrator(trt, batches, cache_path, sample_shape: tuple, opt_batch: int):
    """An IInt8EntropyCalibrator2 fed from torch tensors (TensorRT 10's implicit int8 path).

    TensorRT calibrates at one fixed shape, that of the first batch; batches of another shape
    (a short last batch) are skipped. Each batch is copied into one CUDA buffer, so only one
    is on the GPU at a time. With a calibration cache file, TensorRT reads scales from it and
    asks for no batches.
    """
    cache_path = Path(cache_path) if cache_path else None
    pending = iter(batches if batches is not None else ())
    first = next(pending, None)
    if first is None:
        if not (cache_path and cache_path.is_file()):
            raise CompressorError("an int8 engine needs calibration batches (training images) or an existing "
                                  "calibration cache")
        shape = (opt_batch, *sample_shape)
    else:
        if not torch.is_tensor(first) or first.dim() != len(sample_shape) + 1:
            raise CompressorError("calibration batches must be NCHW tensors")
        shape = tuple(first.shape)
        if shape[1:] != tuple(sample_shape):
            raise CompressorError(f"calibration batches have shape {shape}, the network wants (N, "
                                  f"{', '.join(map(str, sample_shape))})")
        pending = itertools.chain([first], pending)

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.shape = shape
            self.buffer = torch.empty(shape, dtype=torch.float32, device="cuda")
            self.used = 0
            self.skipped = 0

        def get_batch_size(self):
            return shape[0]

        def get_batch(self, names):
            for batch in pending:
                if not torch.is_tensor(batch) or tuple(batch.shape) != shape:
                    self.skipped += 1
                    continue
                self.buffer.copy_(batch.detach())
                torch.cuda.current_stream().synchronize()  # TensorRT reads it on its own stream
                self.used += 1
                return [int(self.buffer.data_ptr())] * len(names)
            return None

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path and cache_path.is_file() else None

        def write_calibration_cache(self, cache):
            if cache_path:
                with atomic_path(cache_path) as tmp:
                    tmp.write_bytes(bytes(cache))

    return EntropyCalibrator()


def _torch_dtype(trt, dtype):
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT8: torch.int8,
             trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
    for name, torch_type in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = torch_type
    if dtype not in table:
        raise CompressorError(f"unsupported TensorRT I/O type {dtype}")
    return table[dtype]


class TensorRTModel:
    """A deserialised engine called like a module: torch CUDA tensor in, float torch CUDA tensor out.

    Buffers are torch tensors (``set_tensor_address``) and the engine runs on torch's current
    stream (``execute_async_v3``), so it is ordered with the surrounding torch work, with no copies.
    """

    def __init__(self, engine_path: str | os.PathLike, device: int | str | torch.device | None = None):
        trt = require()
        path = Path(engine_path)
        if not path.is_file():
            raise CompressorError(f"no TensorRT engine at {path}")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if self.device.type != "cuda":
            raise CompressorError(f"a TensorRT engine runs on a CUDA device, not {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise CompressorError(f"{path} is not an engine that TensorRT {trt.__version__} on this GPU can load "
                                      "(engines are tied to the TensorRT version and GPU that built them)")
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CompressorError(f"TensorRT could not create an execution context for {path} (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise CompressorError(f"expected an engine with one input and one output, found {inputs} and {outputs}")
        self._input, self._output = inputs[0], outputs[0]
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self._input))
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self._output))
        low, _opt, high = self.engine.get_tensor_profile_shape(self._input, 0)
        self.batch_range = (int(low[0]), int(high[0]))

    @property
    def input_name(self) -> str:
        return self._input

    @property
    def output_name(self) -> str:
        return self._output

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.batch_range
        if x.dim() == 0 or not low <= x.shape[0] <= high:
            raise CompressorError(f"batch {x.shape[0] if x.dim() else 'of a scalar'} is outside the engine's "
                                  f"profile [{low}, {high}]")
        with torch.cuda.device(self.device):
            x = x.detach().to(self.device, self.input_dtype).contiguous()
            if not self.context.set_input_shape(self._input, tuple(x.shape)):
                raise CompressorError(f"the engine does not accept input shape {tuple(x.shape)}")
            shape = tuple(self.context.get_tensor_shape(self._output))
            if any(d < 0 for d in shape):
                raise CompressorError(f"the engine's output shape {shape} is not known from the input shape")
            out = torch.empty(shape, dtype=self.output_dtype, device=self.device)
            if not (self.context.set_tensor_address(self._input, x.data_ptr())
                    and self.context.set_tensor_address(self._output, out.data_ptr())):
                raise CompressorError("TensorRT rejected the input or output buffer address")
            # x and out are freed onto the same stream by torch's allocator, so reuse waits for this run
            if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
                raise CompressorError("TensorRT failed to execute the engine (its log above says why)")
        return out.float()
