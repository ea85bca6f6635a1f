"""One way to run any artifact compressor writes, for services: ``load(path, device)``.

``load`` opens a checkpoint (``.pt``), an ONNX file (fp32, fp16 or int8 Q/DQ, through ONNX
Runtime), a TensorRT engine (``.engine``/``.plan``, CUDA only) or an AOTInductor package
(``.pt2``, on the device it was compiled for) and returns a :class:`Runtime`, the same
callable for all of them::

    model = compressor.runtime.load("export/conv4-pruned.onnx")
    logits = model(images_uint8, raw=True)      # NCHW pixels; the checkpoint's mean/std applied
    logits = model(normalised_float_batch)      # already normalised, as in training
    model.spec, model.max_batch, model.kind     # what the artifact was made from

Artifacts carry the checkpoint's :class:`~compressor.checkpoint.ModelSpec` (input shape,
classes, class names, normalisation): ONNX files in ``metadata_props`` (``compressor.spec``,
``compressor.max_batch``), ``.pt2`` packages and TensorRT engines in a JSON sidecar
``<artifact>.json`` (key ``spec``, beside ``max_batch``). :func:`write_metadata` writes it;
``compress export`` calls it for every artifact. A file without it (a foreign ONNX) still
loads, from what the file itself says, but ``raw=True`` is refused because its normalisation
is unknown. Every mistake (missing file, unknown suffix, wrong device, wrong shape or
dtype, too large a batch) is one :class:`~compressor.errors.CompressorError`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch

from . import models, selftest
from .artifacts import (  # noqa: F401  (sidecar_path, write_metadata, write_self_test: re-exported)
    KINDS,
    SELF_TEST_KEY,
    read_onnx_metadata,
    sidecar_path,
    write_metadata,
    write_self_test,
)
from .artifacts import read_sidecar as _read_sidecar
from .checkpoint import ModelSpec
from .errors import CompressorError

DEFAULT_MAX_BATCH = 256  # where the artifact sets no limit (a checkpoint, a foreign ONNX): as `--max-batch`
INPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
def spec_to_dict(spec: ModelSpec) -> dict:
    return dataclasses.asdict(spec)


def spec_from_dict(data, where: str) -> ModelSpec:
    """A ModelSpec from its JSON form, every field checked; fields a newer writer added are ignored."""
    return ModelSpec.from_dict(data, where)


def _device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CompressorError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N' (N = 0, 1, ...: a GPU's "
                              "index)") from None
    if dev.type not in ("cpu", "cuda"):
        raise CompressorError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), not {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise CompressorError(f"device {device!r} asked for, but torch ({torch.__version__}, {build}) sees no "
                                  "CUDA GPU; use device='cpu' (not possible for TensorRT engines or CUDA .pt2 "
                                  "packages)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise CompressorError(f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    return dev


class Runtime:
    """A loaded artifact: ``model(images, raw=False)`` -> float32 logits ``(N, classes)`` on :attr:`device`.

    ``images``: an NCHW batch, torch tensor or numpy array, of ``1..max_batch`` images of
    :attr:`input_shape`. ``raw=True``: pixels, uint8 in [0, 255] or float in [0, 1]; the
    spec's per-channel mean/std are applied here. ``raw=False``: float input already
    normalised (uint8 is refused: it can only be pixels). Calls are not thread-safe for every
    kind (a TensorRT execution context is not): serialise them in a threaded server.
    """

    kind: str = ""
    recorded_self_test: dict | None = None  # the export's self-test, run by load() (compressor.selftest)
    self_test: dict | None = None  # what it gave on this machine

    def __init__(self, path: Path, device: torch.device, spec: ModelSpec | None, max_batch: int,
                 input_shape=None, num_classes: int | None = None, min_batch: int = 1,
                 input_dtype: torch.dtype = torch.float32):
        self.path, self.device, self.spec = path, device, spec
        self.max_batch, self.min_batch = int(max_batch), int(min_batch)
        shape = spec.input_shape if spec is not None else input_shape
        self.input_shape = tuple(int(d) for d in shape) if shape is not None else None
        self.num_classes = spec.num_classes if spec is not None else num_classes
        self.input_dtype = input_dtype
        self._mean = self._std = None
        norm = spec.normalization if spec is not None else {}
        if norm and norm.get("mean") is not None and norm.get("std") is not None:
            mean = torch.tensor(norm["mean"], dtype=torch.float32).flatten()
            std = torch.tensor(norm["std"], dtype=torch.float32).flatten()
            channels = self.input_shape[0] if self.input_shape else len(mean)
            if len(mean) != channels or len(std) != channels or not bool((std > 0).all()):
                raise CompressorError(f"{path.name}: the recorded normalisation (mean {norm['mean']}, "
                                      f"std {norm['std']}) "
                                      f"does not fit {channels} input channels with positive std")
            self._mean = mean.view(1, -1, 1, 1).to(device)
            self._std = std.view(1, -1, 1, 1).to(device)

    # -- what the artifact is ------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self.spec.classes) if self.spec is not None and self.spec.classes else []

    @property
    def normalization(self) -> dict:
        return dict(self.spec.normalization) if self.spec is not None else {}

    def describe(self) -> dict:
        """A JSON-ready summary (what a service's health endpoint shows)."""
        return {"kind": self.kind, "path": self.path.name, "device": str(self.device),
                "input_shape": list(self.input_shape) if self.input_shape else None,
                "num_classes": self.num_classes, "classes": self.class_names, "normalization": self.normalization,
                "min_batch": self.min_batch, "max_batch": self.max_batch, "has_spec": self.spec is not None,
                "model": self.spec.model if self.spec is not None else None}

    def __repr__(self) -> str:
        return (f"Runtime(kind={self.kind!r}, path={self.path.name!r}, device={str(self.device)!r}, "
                f"input_shape={self.input_shape}, max_batch={self.max_batch})")

    # -- calling -------------------------------------------------------------------------
    def __call__(self, images, raw: bool = False) -> torch.Tensor:
        with torch.no_grad():
            x = self.prepare(images, raw)
            out = self._run(x)
        if not torch.is_tensor(out):
            out = torch.as_tensor(np.asarray(out))
        return out.float().to(self.device)

    def prepare(self, images, raw: bool = False) -> torch.Tensor:
        """Check ``images`` and turn them into the artifact's input tensor (on its device, in its dtype)."""
        x = _as_tensor(images)
        want = f"(N, {', '.join(map(str, self.input_shape))})" if self.input_shape else "(N, C, H, W)"
        if x.dim() != 4:
            hint = "; add a batch axis: images[None]" if x.dim() == 3 else ""
            raise CompressorError(f"expected an NCHW batch {want}, got an array of shape {tuple(x.shape)}{hint}")
        if self.input_shape and tuple(x.shape[1:]) != self.input_shape:
            raise CompressorError(f"wrong input shape: expected {want}, got {tuple(x.shape)}")
        n = int(x.shape[0])
        if n == 0:
            raise CompressorError("empty batch: send at least one image")
        if n > self.max_batch:
            raise CompressorError(f"batch of {n} images is over this {self.kind} artifact's maximum of "
                                  f"{self.max_batch}; split it into batches of at most {self.max_batch}")
        if n < self.min_batch:
            raise CompressorError(f"batch of {n} images is under this {self.kind} artifact's minimum of "
                                  f"{self.min_batch}")
        if x.dtype == torch.uint8:
            if not raw:
                raise CompressorError("uint8 images are pixels: call with raw=True to apply the model's "
                                      "normalisation, or pass normalised float input")
        elif not x.dtype.is_floating_point:
            raise CompressorError(f"images must be uint8 (pixels) or float, not {str(x.dtype).removeprefix('torch.')}")
        elif not bool(torch.isfinite(x).all()):
            raise CompressorError("images hold NaN or infinite values")
        x = x.to(self.device)
        if raw:
            if self.spec is None:
                raise CompressorError(f"{self.path.name} records no model spec, so its normalisation is unknown: "
                                      "raw=True is not possible; pass normalised float input (raw=False), or "
                                      "re-export it with compress export")
            if self._mean is None:
                raise CompressorError(f"{self.path.name}'s spec records no normalisation (mean/std): raw=True is "
                                      "not possible; pass the input the model was trained on (raw=False)")
            if x.dtype == torch.uint8:
                x = x.float() / 255.0
            else:
                x = x.float()
                low, high = float(x.min()), float(x.max())
                if low < -1e-3 or high > 1 + 1e-3:
                    raise CompressorError(f"raw float images must be in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
                                          "divide pixels by 255, or pass uint8")
            x = (x - self._mean) / self._std
        return x.to(self.input_dtype).contiguous()

    def _run(self, x: torch.Tensor):
        raise NotImplementedError


def _as_tensor(images) -> torch.Tensor:
    if torch.is_tensor(images):
        return images.detach()
    if isinstance(images, np.ndarray):
        if images.dtype == object or images.dtype.kind not in "uifb":
            raise CompressorError(f"images must be a numeric array, not dtype {images.dtype}")
        if not images.flags.writeable or not images.dtype.isnative:
            images = np.array(images, dtype=images.dtype.newbyteorder("="), copy=True)
        return torch.from_numpy(np.ascontiguousarray(images))
    raise CompressorError(f"images must be a torch tensor or a numpy array (NCHW), not {type(images).__name__}")


class CheckpointRuntime(Runtime):
    kind = "checkpoint"

    def __init__(self, path: Path, device: torch.device, max_batch: int | None, trusted_factories=()):
        from . import checkpoint

        model, spec, self.recorded_self_test = checkpoint.load_with_self_test(path, trusted_factories)
        self.model = model.to(device).eval()
        super().__init__(path, device, spec, max_batch or DEFAULT_MAX_BATCH)

    def _run(self, x):
        return self.model(x)


class OnnxRuntime(Runtime):
    kind = "onnx"

    def __init__(self, path: Path, device: torch.device, max_batch: int | None, threads: int | None):
        from .export import onnx as onnx_export

        meta = read_onnx_metadata(path)
        spec = spec_from_dict(meta[onnx_export.SPEC_KEY], path.name) if onnx_export.SPEC_KEY in meta else None
        if SELF_TEST_KEY in meta:
            try:
                self.recorded_self_test = json.loads(meta[SELF_TEST_KEY])
            except ValueError:
                raise CompressorError(f"{path.name}: its self-test record is not JSON; re-export it, or load it "
                                      "with --skip-self-test") from None
        self.model = onnx_export.OnnxRuntimeModel(path, device, threads)  # the toolkit's one ORT wrapper
        inputs, outputs = self.model.inputs, self.model.outputs
        if len(inputs) != 1 or len(outputs) < 1:
            raise CompressorError(f"{path.name} has {len(inputs)} inputs and {len(outputs)} outputs; this runtime "
                                  "serves models with one image input and logits as first output")
        if inputs[0].type not in onnx_export.OnnxRuntimeModel.TYPES:
            raise CompressorError(f"{path.name}'s input {inputs[0].name!r} is {inputs[0].type}; this runtime feeds "
                                  "floating-point images")
        shape = list(inputs[0].shape)
        if len(shape) != 4:
            raise CompressorError(f"{path.name}'s input {inputs[0].name!r} has shape {shape}, not NCHW")
        static = shape[1:] if all(isinstance(d, int) and d > 0 for d in shape[1:]) else None
        if spec is not None and static is not None and list(spec.input_shape) != static:
            raise CompressorError(f"{path.name}: its graph takes (N, {', '.join(map(str, static))}) but its "
                                  f"recorded spec says {spec.input_shape}; re-export it")
        fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        limit = fixed or _recorded_count(meta.get(onnx_export.MAX_BATCH_KEY), "max_batch", path)
        out_shape = outputs[0].shape
        classes = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else None
        super().__init__(path, device, spec, _limit(path, limit, max_batch), static, classes,
                         min_batch=fixed or 1, input_dtype=self.model.input_dtype)
        if device.type == "cuda" and (self.model.input_dtype != torch.float32 or not classes):
            raise CompressorError(f"{path.name}: ONNX Runtime on CUDA here needs float32 input and a static "
                                  "class count; run it on device='cpu'")

    def _run(self, x):
        try:
            return self.model(x)
        except CompressorError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a foreign model's own shape check
            raise CompressorError(f"ONNX Runtime refused the batch of shape {tuple(x.shape)}: "
                                  f"{str(exc).strip().splitlines()[0][:300]}") from None


class AOTIRuntime(Runtime):
    kind = "aoti"

    def __init__(self, path: Path, device: torch.device, max_batch: int | None):
        from .export import aoti

        info = {**aoti.package_metadata(path), **(_read_sidecar(path) or {})}  # sidecar wins
        compiled_for = info.get("device") or info.get("AOTI_DEVICE_KEY")
        if not compiled_for:
            raise CompressorError(f"{path} is not an AOTInductor package (no AOTI metadata inside; a .pt2 from "
                                  "torch.export.save is an exported program, not a compiled package)")
        if not isinstance(compiled_for, str) or compiled_for.split(":")[0] not in ("cpu", "cuda"):
            raise CompressorError(f"{path.name}: its metadata names the device {compiled_for!r}; expected cpu or cuda")
        if torch.device(compiled_for).type != device.type:
            raise CompressorError(f"{path.name} was compiled for {compiled_for}, so it runs only there: load it with "
                                  f"device='{torch.device(compiled_for).type}' (or export one for {device.type})")
        spec = spec_from_dict(info["spec"], path.name) if info.get("spec") else None
        self.recorded_self_test = info.get("self_test")
        shape = info.get("input_shape")
        if shape is not None and not (isinstance(shape, list) and len(shape) == 3
                                      and all(_recorded_count(d, "input_shape", path) for d in shape)):
            raise CompressorError(f"{path.name}: its metadata's input_shape {shape!r} is not [C, H, W]")
        dtype = INPUT_DTYPES.get(str(info.get("dtype", "float32")))
        if dtype is None:
            raise CompressorError(f"{path.name}: its metadata names input dtype {info.get('dtype')!r}; expected one "
                                  f"of {', '.join(INPUT_DTYPES)}")
        # every recorded count checked before the package's native code is loaded
        limit = _recorded_count(info.get("max_batch"), "max_batch", path)
        classes = _recorded_count(info.get("num_classes"), "num_classes", path)
        least = _recorded_count(info.get("min_batch", 1), "min_batch", path)
        try:
            self.model = aoti.AOTIModel(path, device_index=device.index if device.type == "cuda" else -1)
        except CompressorError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CompressorError(f"cannot load the AOTInductor package {path.name} (built with torch "
                                  f"{info.get('torch', '?')}, this is {torch.__version__}): {type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from None
        super().__init__(path, device, spec, _limit(path, limit, max_batch), shape, classes, min_batch=least,
                         input_dtype=dtype)

    def _run(self, x):
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                return self.model(x)
        return self.model(x)


class TensorRTRuntime(Runtime):
    kind = "tensorrt"

    def __init__(self, path: Path, device: torch.device, max_batch: int | None):
        if device.type != "cuda":
            raise CompressorError(f"{path.name} is a TensorRT engine, which runs only on a CUDA GPU: load it with "
                                  "device='cuda'")
        from .export import tensorrt

        info = _read_sidecar(path) or {}
        self.recorded_self_test = info.get("self_test")
        self.model = tensorrt.TensorRTModel(path, device)
        low, high = self.model.batch_range
        spec = spec_from_dict(info["spec"], path.name) if info.get("spec") else None
        shape = tuple(int(d) for d in self.model.engine.get_tensor_shape(self.model.input_name))[1:]
        shape = shape if shape and all(d > 0 for d in shape) else None
        out = tuple(int(d) for d in self.model.engine.get_tensor_shape(self.model.output_name))
        if spec is not None and shape is not None and tuple(spec.input_shape) != shape:
            raise CompressorError(f"{path.name}: the engine takes (N, {', '.join(map(str, shape))}) but its sidecar's "
                                  f"spec says {spec.input_shape}; re-export it")
        super().__init__(path, device, spec, _limit(path, high, max_batch), shape,
                         out[-1] if out and out[-1] > 0 else None, min_batch=low, input_dtype=self.model.input_dtype)

    def _run(self, x):
        return self.model(x)


def _recorded_count(value, what: str, path: Path) -> int | None:
    """A count an artifact's metadata records (decimal text or a number), checked; None where it records none."""
    if value is None:
        return None
    try:
        count = int(value) if isinstance(value, str) else value
    except ValueError:
        count = None
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1 << 30:
        raise CompressorError(f"{path.name}: its metadata's {what} {value!r} is not a positive whole number")
    return count


def _limit(path: Path, artifact_max, wanted) -> int:
    """The batch limit: the artifact's own (if it has one), lowered to ``wanted`` if asked."""
    if wanted is not None:
        if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
            raise CompressorError(f"max_batch must be a positive integer, not {wanted!r}")
        if artifact_max is not None and wanted > int(artifact_max):
            raise CompressorError(f"max_batch {wanted} is over what {path.name} was built for ({artifact_max})")
        return wanted
    return int(artifact_max) if artifact_max is not None else DEFAULT_MAX_BATCH


def load(path: str | os.PathLike, device: str | torch.device = "cpu", max_batch: int | None = None,
         threads: int | None = None, trusted_factories=(), self_test: bool = True) -> Runtime:
    """Open the artifact at ``path`` on ``device`` as a :class:`Runtime` (see the module's docstring).

    ``max_batch`` lowers the artifact's own batch limit (default: the limit it was exported with,
    else {DEFAULT_MAX_BATCH}); ``threads`` sets ONNX Runtime's intra-op threads. Works under
    ``torch.inference_mode()`` and ``torch.no_grad()``. ``trusted_factories``: model factories
    (``"module:function"``) a checkpoint may name beyond the registry and torchvision's classification
    models. ``self_test``: run the inputs the export recorded and refuse an artifact that answers
    otherwise on this machine (see :mod:`compressor.selftest`).

    What loading trusts: a ``.pt`` checkpoint and an ONNX file are data (no code of the file's
    choosing runs); a ``.pt2`` AOTInductor package and a TensorRT engine are native code compiled
    by whoever made them, so load only those you built or trust.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise CompressorError(f"an artifact's path is a file name, not {path!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise CompressorError(f"threads must be a whole number >= 0 (0: ONNX Runtime's own choice), not {threads!r}")
    trusted_factories = models.trusted_names(trusted_factories)
    path = Path(path)
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise CompressorError(f"{path.name}: unknown artifact type {path.suffix or '(no suffix)'!r}; compressor "
                              f"loads {', '.join(sorted(KINDS))}")
    if not path.is_file():
        raise CompressorError(f"no {kind} artifact at {path}" + (" (it is a directory)" if path.is_dir() else ""))
    dev = _device(device)
    if kind == "checkpoint":
        loaded = CheckpointRuntime(path, dev, _limit(path, None, max_batch) if max_batch is not None else None,
                                   trusted_factories)
    elif kind == "onnx":
        loaded = OnnxRuntime(path, dev, max_batch, threads)
    elif kind == "aoti":
        loaded = AOTIRuntime(path, dev, max_batch)
    else:
        loaded = TensorRTRuntime(path, dev, max_batch)
    if self_test:
        loaded.self_test = selftest.run(loaded, loaded.recorded_self_test)
    return loaded


load.__doc__ = load.__doc__.replace("{DEFAULT_MAX_BATCH}", str(DEFAULT_MAX_BATCH))
