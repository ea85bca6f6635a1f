"""What an exported artifact carries, and where: shared by the exporters and the runtime loader.

An artifact's model spec, batch limit and self-test travel with it: in an ONNX file's
``metadata_props``, or in a JSON sidecar ``<artifact>.json`` beside a ``.pt2`` package or a
TensorRT engine. The exporters write them here and :mod:`compressor.runtime` reads them here,
so neither imports the other, and a file's name, sidecar and hash follow one rule each.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from .errors import CompressorError
from .files import atomic_path, read_json_object, write_json

KINDS = {".pt": "checkpoint", ".pth": "checkpoint", ".onnx": "onnx", ".engine": "tensorrt", ".plan": "tensorrt",
         ".pt2": "aoti"}
SPEC_KEY = "compressor.spec"  # ONNX metadata: the checkpoint's ModelSpec as JSON (compressor.runtime reads it)
MAX_BATCH_KEY = "compressor.max_batch"  # ONNX metadata: the largest batch the artifact is meant for (decimal)
SELF_TEST_KEY = "compressor.self_test"  # ONNX metadata: the export's self-test (compressor.selftest)


def sidecar_path(path) -> Path:
    """``model.pt2`` -> ``model.pt2.json``, ``model.engine`` -> ``model.engine.json``."""
    path = Path(path)
    return path.with_suffix(path.suffix + ".json")


def sha256(path) -> str:
    """The file's SHA-256, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_onnx_metadata(path) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` as a dict (weights in external files are not read)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's parse errors have many types
        raise CompressorError(f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    return {p.key: p.value for p in proto.metadata_props}


def write_onnx_metadata(path, props: dict[str, str]) -> None:
    """Add (or replace) ``metadata_props`` entries of an existing ONNX file, atomically; the rest is kept."""
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CompressorError(f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                        **{str(k): str(v) for k, v in props.items()}})
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def read_sidecar(path) -> dict | None:
    """The JSON sidecar of the artifact at ``path`` (None if there is none), or one clear error."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    return read_json_object(side, "a JSON object", "delete it or re-export")


def write_metadata(path, spec, max_batch: int | None = None) -> Path:
    """Record ``spec`` (a :class:`~compressor.checkpoint.ModelSpec`) and the batch limit in or beside ``path``.

    ONNX: ``metadata_props`` ``compressor.spec`` / ``compressor.max_batch`` (other entries kept).
    ``.pt2`` / ``.engine``: merged into the JSON sidecar ``<artifact>.json`` as ``spec`` (and
    ``max_batch`` if the sidecar has none: a TensorRT profile's own limit is never overwritten).
    """
    path = Path(path)
    kind = KINDS.get(path.suffix.lower())
    if not path.is_file():
        raise CompressorError(f"no artifact at {path}")
    if kind == "onnx":
        props = {SPEC_KEY: json.dumps(dataclasses.asdict(spec))}
        if max_batch is not None:
            props[MAX_BATCH_KEY] = str(int(max_batch))
        write_onnx_metadata(path, props)
    elif kind in ("aoti", "tensorrt"):
        info = read_sidecar(path) or {}
        info["spec"] = dataclasses.asdict(spec)
        if max_batch is not None:
            info.setdefault("max_batch", int(max_batch))
        write_json(sidecar_path(path), info)
    elif kind != "checkpoint":  # a checkpoint holds its spec already
        raise CompressorError(f"cannot record metadata for {path.name}: unknown artifact suffix")
    return path


def write_self_test(path, record: dict) -> Path:
    """Record an artifact's self-test (see :mod:`compressor.selftest`) where the runtime loader finds it."""
    path = Path(path)
    kind = KINDS.get(path.suffix.lower())
    if kind == "onnx":
        write_onnx_metadata(path, {SELF_TEST_KEY: json.dumps(record)})
    elif kind in ("aoti", "tensorrt"):
        write_json(sidecar_path(path), {**(read_sidecar(path) or {}), "self_test": record})
    return path
