"""Serve an exported compressor artifact over HTTP (FastAPI + uvicorn), on localhost by default.

    python examples/serve.py runs/conv4/export/conv4-pruned.onnx --port 8000

Any artifact ``compressor.runtime.load`` opens works: ``pruned.pt``, ``.onnx`` (fp32 or int8),
``.pt2``, ``.engine`` (with ``--device cuda``). Endpoints:

- ``GET /health``: the model's kind, input shape, classes, normalisation and max batch, and under
  ``batching`` the micro-batcher's state: ``queue_depth`` (requests waiting), ``queued_images``,
  ``in_flight_images``, ``batches``/``requests``/``images`` served, ``largest_batch``, ``mean_batch``.
- ``POST /predict``: either PNG/JPEG files (``multipart/form-data``, one or several, any field
  name, in order), or JSON ``{"images": [N][C][H][W] nested list, "normalized": false}`` where
  the numbers are pixels in [0, 255] (or, with ``"normalized": true``, input already
  normalised as in training). Images are never resized: a wrong size is refused.
  Answer: ``{"kind", "predictions": [{"class", "name", "logits", "file"?}, ...]}``.

Mistakes get a 4xx answer with ``{"error": "..."}``: 400 bad JSON or no images, 413 a batch
over the artifact's maximum (or a request over ``--max-request-mb``, by its Content-Length or,
chunked, as soon as it passes), 415 an upload that is not a PNG/JPEG image (or a body that is
neither JSON nor a form), 422 a wrong image size (read from the header: a huge image is never
decoded), channel count or array shape; 503 when ``--max-queue`` requests already wait.

Concurrent requests are micro-batched (dynamic batching, as Triton's): one thread runs the model,
joining queued requests of the same kind into one call of at most the artifact's max batch, with
a request waiting at most ``--batch-wait-ms`` for others; each gets its own rows back, and a
batch the model refuses is rerun request by request so that only the wrong one gets the error.
The model gets ``--threads`` intra-op threads (default: the cores less one; the event loop
needs the other). ``benchmarks/load_serve.py`` measures it under load. Needs
``pip install -e '.[serve]'``.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import json
import logging
import os
import sys
import threading
import time

import numpy as np

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
    from starlette.routing import Route

    try:
        from python_multipart.multipart import parse_options_header
    except ImportError:  # python-multipart < 0.0.13
        from multipart.multipart import parse_options_header
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

    try:  # reads the header only: the size is checked before decoding; only PNG and JPEG are tried
        image = Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:  # the header claims more pixels than PIL will ever decode
        size = f"; this model takes {shape[2]}x{shape[1]} (width x height) images" if shape else ""
        raise BadRequest(422, f"{name!r} is far too large ({exc}){size}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        try:  # name the format of an image that is not PNG/JPEG
            with Image.open(io.BytesIO(blob)) as other:
                kind = other.format
        except Exception:  # noqa: BLE001 - no image at all
            kind = None
        raise BadRequest(415, f"{name!r} is a {kind} image; send PNG or JPEG" if kind else
                         f"{name!r} is not an image (send PNG or JPEG files)") from None
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
        pixels = np.asarray(image.convert(mode) if image.mode != mode else image, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadRequest(415, f"{name!r} could not be decoded ({exc})") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def form_files(body: bytes, content_type: str, max_parts: int = 1000) -> list[tuple[str, bytes]]:
    """``(filename, content)`` of every file part of a multipart/form-data ``body`` (RFC 7578), in order.

    A part is a file when its Content-Disposition has a ``filename`` (other fields are skipped, as
    before). The whole body is already in memory, so the parts are found with ``bytes.find``: a
    fraction of the cost of a streaming parser for the small images this service takes. 400 for a
    malformed form, 413 for more than ``max_parts`` parts.
    """
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise BadRequest(400, "bad multipart form: no boundary in the Content-Type header")
    delimiter = b"--" + boundary
    at = body.find(delimiter)
    if at < 0 or (at > 0 and body[at - 2:at] != b"\r\n"):
        raise BadRequest(400, "bad multipart form: the body does not start with the boundary")
    files, parts = [], 0
    at += len(delimiter)
    while True:
        if body.startswith(b"--", at):  # the close delimiter: what follows is an epilogue
            return files
        while body[at:at + 1] in (b" ", b"\t"):  # transport padding after a boundary (RFC 2046)
            at += 1
        if not body.startswith(b"\r\n", at):
            raise BadRequest(400, "bad multipart form: a boundary is not followed by a line break")
        at += 2
        end = body.find(b"\r\n" + delimiter, at)
        if end < 0:
            raise BadRequest(400, "bad multipart form: the closing boundary is missing")
        parts += 1
        if parts > max_parts:
            raise BadRequest(413, f"bad multipart form: more than {max_parts} parts")
        split = at if body.startswith(b"\r\n", at) else body.find(b"\r\n\r\n", at, end)
        if split < 0:
            raise BadRequest(400, "bad multipart form: a part's headers do not end in an empty line")
        options = None
        for line in body[at:split].split(b"\r\n") if split > at else []:
            name, colon, value = line.partition(b":")
            if not colon:
                raise BadRequest(400, f"bad multipart form: a malformed part header {line[:80]!r}")
            if name.strip().lower() == b"content-disposition":
                options = parse_options_header(value.strip())[1]
        if options is None:
            raise BadRequest(400, "bad multipart form: a part has no Content-Disposition header")
        if b"filename" in options:
            files.append((options[b"filename"].decode("utf-8", "replace"),
                          body[split + (2 if split == at else 4):end]))
        at = end + 2 + len(delimiter)


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


class MicroBatcher:
    """Dynamic batching (as Triton's): concurrent requests are joined into one model call.

    The event loop queues each request's images (:meth:`submit`) and awaits its future; one thread
    takes the oldest queued request, then keeps taking the next ones (same kind of input, the
    images together at most ``max_batch``) for up to ``wait_s`` after the first, runs them as one
    batch and hands each request its own rows back, as Python lists (``top``, ``logits``). Under
    load the queue fills while a batch runs, so batches grow with no wait at all; ``wait_s`` only
    decides how long a lone request waits for company. A batch the model refuses (one request's
    wrong shape or values) is rerun request by request, so each gets its own answer or error.
    ``max_queue`` bounds the waiting requests: over it, :meth:`submit` raises BadRequest 503.
    """

    def __init__(self, model: runtime.Runtime, max_batch: int, wait_s: float, max_queue: int = 1024):
        self.model, self.wait_s, self.max_queue = model, max(0.0, wait_s), max_queue
        # a fixed-batch artifact (min_batch > 1) takes only its own batch size: no joining there
        self.max_batch = max_batch if model.min_batch <= 1 else 0
        self._cv = threading.Condition()
        self._queue: collections.deque = collections.deque()  # (images, raw, future, loop)
        self._queued_images = self._in_flight = 0
        self._closed = False
        self.batches = self.requests = self.images = self.largest = self.rerun = 0
        self._thread = threading.Thread(target=self._serve, name="micro-batcher", daemon=True)
        self._thread.start()

    def stats(self) -> dict:
        with self._cv:
            return {"queue_depth": len(self._queue), "queued_images": self._queued_images,
                    "in_flight_images": self._in_flight, "batches": self.batches, "requests": self.requests,
                    "images": self.images, "largest_batch": self.largest,
                    "mean_batch": round(self.images / self.batches, 2) if self.batches else None,
                    "batches_rerun_one_by_one": self.rerun, "max_batch": self.max_batch or self.model.min_batch,
                    "max_wait_ms": self.wait_s * 1e3, "max_queue": self.max_queue}

    def submit(self, images: np.ndarray, raw: bool) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cv:
            if len(self._queue) >= self.max_queue:
                raise BadRequest(503, f"the service is busy ({len(self._queue)} requests queued); try again")
            self._queue.append((images, raw, future, loop))
            self._queued_images += len(images)
            self._cv.notify()
        return future

    def close(self):
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    @staticmethod
    def _key(item):
        images, raw = item[0], item[1]
        return raw, images.dtype, images.shape[1:]

    def _take(self) -> list | None:
        """The next batch of queued requests (FIFO), or None once closed and empty."""
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None
            items = [self._queue.popleft()]
            n, key = len(items[0][0]), self._key(items[0])
            deadline = time.monotonic() + self.wait_s
            while n < self.max_batch:
                if self._queue:
                    head = self._queue[0]
                    if self._key(head) != key or n + len(head[0]) > self.max_batch:
                        break
                    items.append(self._queue.popleft())
                    n += len(head[0])
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cv.wait(left)
            self._queued_images -= n
            self._in_flight = n
            return items

    def _run(self, images: np.ndarray, raw: bool):
        logits = self.model(images, raw=raw).cpu()
        return logits.argmax(1).tolist(), logits.tolist()

    def _serve(self):
        while (items := self._take()) is not None:
            try:
                if len(items) == 1:
                    results = [self._attempt(items[0][0], items[0][1])]
                else:
                    batch = np.concatenate([item[0] for item in items])
                    first = self._attempt(batch, items[0][1])
                    if isinstance(first, Exception):  # someone's input is wrong: find whose
                        self.rerun += 1
                        results = [self._attempt(item[0], item[1]) for item in items]
                    else:
                        results, at = [], 0
                        for item in items:
                            k = len(item[0])
                            results.append((first[0][at:at + k], first[1][at:at + k]))
                            at += k
            except BaseException as exc:  # noqa: BLE001 - never leave a request waiting
                results = [exc] * len(items)
            with self._cv:
                n = sum(len(item[0]) for item in items)
                self.batches += 1
                self.requests += len(items)
                self.images += n
                self.largest = max(self.largest, n)
                self._in_flight = 0
            for loop in {item[3] for item in items}:  # one wake-up of the event loop per batch
                pairs = [(item[2], result) for item, result in zip(items, results) if item[3] is loop]
                try:
                    loop.call_soon_threadsafe(_resolve, pairs)
                except RuntimeError:  # the loop has closed: nobody is waiting
                    pass

    def _attempt(self, images, raw):
        try:
            return self._run(images, raw)
        except Exception as exc:  # noqa: BLE001 - handed to the request: a CompressorError is its 4xx, else a 500
            return exc


def _resolve(pairs):
    for future, result in pairs:
        if future.done():  # the client went away and its request was cancelled
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes (a chunked body has no length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"the request is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(model: runtime.Runtime, max_request_bytes: int = 64 << 20, batch_wait_ms: float = 1.0,
               batching: bool = True, max_queue: int = 1024) -> FastAPI:
    batcher = MicroBatcher(model, model.max_batch if batching else 0, batch_wait_ms / 1e3, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = ServeApp(title=f"compressor: {model.path.name}", version="1", lifespan=lifespan)
    app.state.batcher = batcher
    description = model.describe()
    classes = model.class_names

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
        return {"status": "ok", **description, "batching": batcher.stats()}

    async def predict(request: Request):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_request_bytes:
            raise BadRequest(413, f"the request is {int(length)} bytes, over the limit of {max_request_bytes}")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("multipart/form-data", "application/json"):
            raise BadRequest(415, f"send multipart/form-data image files or application/json, not {kind or 'nothing'}")
        body = await read_body(request, max_request_bytes)
        names = None
        if kind == "multipart/form-data":
            files = form_files(body, request.headers["content-type"], max(1000, model.max_batch + 1))
            if not files:
                raise BadRequest(400, "no files in the form: send images as -F file=@image.png")
            if len(files) > model.max_batch:
                raise BadRequest(413, f"batch of {len(files)} images is over this model's maximum of {model.max_batch}")
            names = [filename or f"file {i}" for i, (filename, _) in enumerate(files)]
            images = [decode_image(blob, n, model.input_shape) for (_, blob), n in zip(files, names)]
            batch, raw = np.stack(images), True
        else:
            batch, raw = json_batch(body, model)
        try:
            top, rows = await batcher.submit(batch, raw)
        except CompressorError as exc:
            raise BadRequest(413 if "over this" in str(exc) else 422, str(exc)) from None
        predictions = []
        for i, (k, row) in enumerate(zip(top, rows)):
            item = {"class": k, "name": classes[k] if k < len(classes) else None, "logits": row}
            if names:
                item["file"] = names[i]
            predictions.append(item)
        return JSONResponse({"kind": model.kind, "predictions": predictions})

    # a plain Starlette route: the body is read and checked here, so FastAPI's parameter machinery has nothing to do
    app.router.routes.append(Route("/predict", predict, methods=["POST"]))
    app.fast_predict = predict
    return app


class ServeApp(FastAPI):
    """FastAPI, except that ``POST /predict`` goes straight to its handler.

    Every request otherwise passes FastAPI's and Starlette's middleware stack (error pages,
    telemetry, body limit, exception handlers, exit stacks, routing), a seventh of the event
    loop's time per request here; ``/predict`` does its own checks and turns a BadRequest into
    its JSON answer itself. Everything else (``/health``, 404s, the docs, lifespan) is FastAPI's.
    """

    fast_predict = None

    async def __call__(self, scope, receive, send):
        if (self.fast_predict is not None and scope["type"] == "http" and scope["path"] == "/predict"
                and scope["method"] == "POST"):
            try:
                response = await self.fast_predict(Request(scope, receive))
            except BadRequest as exc:
                response = JSONResponse({"error": exc.message}, status_code=exc.status)
            except ClientDisconnect:  # gone before its body arrived: nobody to answer
                return
            except Exception:  # noqa: BLE001 - as Starlette's error middleware: log it, answer 500
                logging.getLogger("uvicorn.error").exception("POST /predict failed")
                response = JSONResponse({"error": "internal server error"}, status_code=500)
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def default_threads() -> int:
    """The cores this process may use, less one for the event loop (at least 1).

    The model's intra-op threads and the event loop that parses HTTP compete for the same cores; on a
    small or shared machine a second model thread costs more (threads waiting on each other at every
    operator) than it gives.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Serve a compressor artifact over HTTP (FastAPI + uvicorn).")
    parser.add_argument("artifact", help="pruned.pt, .onnx, .pt2 or .engine")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (TensorRT engines and CUDA .pt2 need cuda)")
    parser.add_argument("--max-batch", type=int, default=None, help="lower the artifact's batch limit")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of the model (torch and ONNX Runtime); default: the cores less one, "
                             "at least 1, leaving a core to the HTTP event loop")
    parser.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body accepted")
    parser.add_argument("--batch-wait-ms", type=float, default=1.0,
                        help="micro-batching: how long a request waits for others to join its batch (default 1 ms; "
                             "under load batches fill while the model runs, with no wait)")
    parser.add_argument("--no-batching", action="store_true", help="run every request on its own")
    parser.add_argument("--max-queue", type=int, default=1024,
                        help="requests waiting for the model beyond which new ones get 503 (default 1024)")
    parser.add_argument("--skip-self-test", action="store_true",
                        help="do not re-run the export's recorded self-test on load (runtime.load(self_test=False))")
    parser.add_argument("--trust-factory", dest="trust_factories", action="append", default=[],
                        metavar="MODULE:FUNCTION", help="a model factory a pruned.pt may name beyond the registered "
                        "models and torchvision's classifiers (it is imported and called); repeatable")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.batch_wait_ms < 0 or args.max_queue < 1:
        parser.error("--batch-wait-ms must be >= 0 and --max-queue >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    threads = args.threads or default_threads()
    import torch

    torch.set_num_threads(threads)  # a checkpoint's or .pt2's model; ONNX Runtime gets its own setting below
    try:
        model = runtime.load(args.artifact, args.device, max_batch=args.max_batch, threads=threads,
                             trusted_factories=args.trust_factories, self_test=not args.skip_self_test)
    except CompressorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {model!r} on http://{args.host}:{args.port}", flush=True)
    app = create_app(model, int(args.max_request_mb * (1 << 20)), batch_wait_ms=args.batch_wait_ms,
                     batching=not args.no_batching, max_queue=args.max_queue)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
