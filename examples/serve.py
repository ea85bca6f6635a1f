"""Serve an exported compressor artifact over HTTP (FastAPI + uvicorn), on localhost by default.

    python examples/serve.py runs/conv4/export/conv4-pruned.onnx --port 8000

Any artifact ``compressor.runtime.load`` opens works: ``pruned.pt``, ``.onnx`` (fp32 or int8),
``.pt2``, ``.engine`` (with ``--device cuda``). Endpoints:

- ``GET /health``: the model's kind, input shape, classes, normalisation and max batch.
- ``POST /predict``: either PNG/JPEG files (``multipart/form-data``, one or several, any field
  name, in order), or JSON ``{"images": [N][C][H][W] nested list, "normalized": false}`` where
  the numbers are pixels in [0, 255] (or, with ``"normalized": true``, input already
  normalised as in training). Images are never resized: a wrong size is refused.
  Answer: ``{"kind", "predictions": [{"class", "name", "logits", "file"?}, ...]}``.

Mistakes get a 4xx answer with ``{"error": "..."}``: 400 bad JSON or no images, 413 a batch
over the artifact's maximum (or too large a request), 415 an upload that is not a PNG/JPEG
image (or a body that is neither JSON nor a form), 422 a wrong image size, channel count or
array shape. Needs ``pip install -e '.[serve]'``.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import threading

import numpy as np

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - the message is the point
    sys.exit(f"examples/serve.py needs FastAPI, uvicorn and python-multipart ({exc}); "
             "pip install -e '.[serve]' (or pip install fastapi uvicorn python-multipart)")

from compressor import runtime
from compressor.errors import CompressorError

IMAGE_FORMATS = ("PNG", "JPEG")


class BadRequest(Exception):
    """A client mistake, answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def decode_image(blob: bytes, name: str, shape: tuple[int, int, int] | None) -> np.ndarray:
    """A PNG/JPEG file's pixels as a uint8 (C, H, W) array of the model's size and channels, or BadRequest."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(blob))  # reads the header only: size is checked before decoding
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise BadRequest(415, f"{name!r} is not an image (send PNG or JPEG files)") from None
    if image.format not in IMAGE_FORMATS:
        raise BadRequest(415, f"{name!r} is a {image.format} image; send PNG or JPEG")
    if shape is not None:
        channels, height, width = shape
        if image.size != (width, height):
            raise BadRequest(422, f"{name!r} is {image.size[0]}x{image.size[1]} pixels; this model takes "
                                  f"{width}x{height} (width x height) images, and the service does not resize")
        if channels == 1:
            gray = image.mode in ("L", "LA", "1")
            if image.mode == "P":  # a palette image is grayscale when every palette colour it uses is a gray
                try:
                    rgb = np.asarray(image.convert("RGB"))
                except (OSError, ValueError) as exc:
                    raise BadRequest(415, f"{name!r} could not be decoded ({exc})") from None
                gray = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
            if not gray:
                raise BadRequest(422, f"{name!r} is a {image.mode} image; this model takes 8-bit grayscale "
                                      "(1-channel) images")
            mode = "L"
        elif channels == 3:
            mode = "RGB"  # grayscale is replicated, alpha dropped
        else:
            raise BadRequest(422, f"this model takes {channels}-channel input, which PNG/JPEG cannot carry: "
                                  "send JSON")
    else:
        mode = "RGB" if len(image.getbands()) >= 3 else "L"
    try:
        pixels = np.asarray(image.convert(mode), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadRequest(415, f"{name!r} could not be decoded ({exc})") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def json_batch(body: bytes, model: runtime.Runtime) -> tuple[np.ndarray, bool]:
    """(batch, raw) from a JSON body ``{"images": [...], "normalized": false}``, or BadRequest."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "images" not in data:
        raise BadRequest(400, 'expected a JSON object {"images": [N][C][H][W] numbers, "normalized": false}')
    images, normalized = data["images"], data.get("normalized", False)
    if not isinstance(normalized, bool):
        raise BadRequest(400, '"normalized" must be true or false')
    if not isinstance(images, list) or not images:
        raise BadRequest(400, '"images" must be a non-empty list of images (N x C x H x W)')
    if len(images) > model.max_batch:
        raise BadRequest(413, f"batch of {len(images)} images is over this model's maximum of {model.max_batch}")
    try:
        batch = np.asarray(images, dtype=np.float32)
    except (ValueError, TypeError):
        raise BadRequest(422, '"images" must be a rectangular nested list of numbers, N x C x H x W') from None
    if batch.ndim != 4:
        raise BadRequest(422, f'"images" has shape {list(batch.shape)}; expected N x C x H x W'
                              + (f" = N x {' x '.join(map(str, model.input_shape))}" if model.input_shape else ""))
    if not np.isfinite(batch).all():
        raise BadRequest(422, '"images" holds NaN or infinite values')
    if normalized:
        return batch, False
    if batch.min() < 0 or batch.max() > 255:
        raise BadRequest(422, f'pixels must be in [0, 255] (got [{batch.min():g}, {batch.max():g}]); send '
                              '"normalized": true for input that is already normalised')
    return batch / 255.0, True


def create_app(model: runtime.Runtime, max_request_bytes: int = 64 << 20) -> FastAPI:
    app = FastAPI(title=f"compressor: {model.path.name}", version="1")
    lock = threading.Lock()  # one batch at a time: not every backend's context is thread-safe

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(BadRequest)
    async def bad_request(_request, exc: BadRequest):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.get("/health")
    def health():
        return {"status": "ok", **model.describe()}

    def infer(batch: np.ndarray, raw: bool):
        with lock:
            return model(batch, raw=raw).cpu()

    @app.post("/predict")
    async def predict(request: Request):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_request_bytes:
            raise BadRequest(413, f"the request is {int(length)} bytes, over the limit of {max_request_bytes}")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        names = None
        if kind == "multipart/form-data":
            try:
                form = await request.form(max_files=model.max_batch + 1)
            except Exception as exc:  # noqa: BLE001 - a malformed multipart body, or over the file limit
                raise BadRequest(400 if "Too many" not in str(exc) else 413, f"bad multipart form: {exc}") from None
            try:
                files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
                if not files:
                    raise BadRequest(400, "no files in the form: send images as -F file=@image.png")
                if len(files) > model.max_batch:
                    raise BadRequest(413, f"batch of {len(files)} images is over this model's maximum of "
                                          f"{model.max_batch}")
                names = [f.filename or f"file {i}" for i, f in enumerate(files)]
                images = [decode_image(await f.read(), n, model.input_shape) for f, n in zip(files, names)]
            finally:
                await form.close()
            batch, raw = np.stack(images), True
        elif kind == "application/json":
            batch, raw = json_batch(await request.body(), model)
        else:
            raise BadRequest(415, f"send multipart/form-data image files or application/json, not {kind or 'nothing'}")
        try:
            logits = await run_in_threadpool(infer, batch, raw)
        except CompressorError as exc:
            raise BadRequest(413 if "over this" in str(exc) else 422, str(exc)) from None
        top = logits.argmax(1).tolist()
        classes = model.class_names
        predictions = []
        for i, (k, row) in enumerate(zip(top, logits.tolist())):
            item = {"class": k, "name": classes[k] if k < len(classes) else None, "logits": row}
            if names:
                item["file"] = names[i]
            predictions.append(item)
        return {"kind": model.kind, "predictions": predictions}

    return app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Serve a compressor artifact over HTTP (FastAPI + uvicorn).")
    parser.add_argument("artifact", help="pruned.pt, .onnx, .pt2 or .engine")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (TensorRT engines and CUDA .pt2 need cuda)")
    parser.add_argument("--max-batch", type=int, default=None, help="lower the artifact's batch limit")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body accepted")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        model = runtime.load(args.artifact, args.device, max_batch=args.max_batch, threads=args.threads)
    except CompressorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {model!r} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(create_app(model, int(args.max_request_mb * (1 << 20))), host=args.host, port=args.port,
                log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
