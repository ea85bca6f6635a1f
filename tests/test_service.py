"""examples/serve.py in a subprocess on a free localhost port: real PNG requests, answers checked against PyTorch."""
import asyncio
import http.client
import importlib.util
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor import checkpoint, models, runtime
from compressor.export import onnx

pytest.importorskip("fastapi", reason="the example service needs FastAPI: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the example service needs uvicorn: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="the example service needs python-multipart: pip install -e '.[serve]'")
Image = pytest.importorskip("PIL.Image")

SERVE = Path(__file__).resolve().parents[1] / "examples" / "serve.py"
SHAPE = [1, 12, 12]
CLASSES = ["zero", "one", "two"]
NORM = {"mean": [0.4], "std": [0.25]}
MAX_BATCH = 4
TIMEOUT = 10  # seconds for any one HTTP call
MAX_REQUEST_MB = 1  # the test service's body limit (--max-request-mb)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_and_artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = models.create("conv4", len(CLASSES), 1).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    spec = checkpoint.spec_for(model, "conv4", models.factory_kwargs("conv4", len(CLASSES), 1), SHAPE, len(CLASSES),
                               normalization=NORM, classes=CLASSES)
    path = onnx.export(model, folder / "m.onnx", torch.randn(2, *SHAPE))
    runtime.write_metadata(path, spec, MAX_BATCH)
    return model, path


def start_service(path, *extra):
    """(url, process) of serve.py on a free localhost port, once it answers /health; a generator for fixtures."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(SERVE), str(path), "--port", str(port), "--threads", "1",
                             "--log-level", "warning", "--max-request-mb", str(MAX_REQUEST_MB), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the service exited with {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("the service did not answer /health within 180 s")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


@pytest.fixture(scope="module")
def service(model_and_artifact):
    yield from start_service(model_and_artifact[1])


@pytest.fixture(scope="module")
def server(service):
    return service[0]


@pytest.fixture(scope="module")
def slow_batching_server(model_and_artifact):
    """A service that waits up to 300 ms for a batch to fill, so that concurrent requests surely share one."""
    yield from start_service(model_and_artifact[1], "--batch-wait-ms", "300")


def request(url, data=None, headers=None, method=None):
    """(status, JSON answer) of one HTTP call, 4xx included."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def png(array, mode="L", fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()


def multipart(files):
    """A multipart/form-data body of ``(filename, bytes, content type)`` under the field ``file``."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, blob, kind in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                     f"Content-Type: {kind}\r\n\r\n".encode() + blob + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def images(n, seed=0, size=(12, 12)):
    return np.random.default_rng(seed).integers(0, 256, (n, *size), dtype=np.uint8)


def pytorch_logits(model, pixels):
    x = (torch.from_numpy(pixels).float()[:, None] / 255 - NORM["mean"][0]) / NORM["std"][0]
    with torch.no_grad():
        return model(x)


def test_health(server):
    status, body = request(server + "/health")
    assert status == 200
    assert body["kind"] == "onnx" and body["input_shape"] == SHAPE and body["classes"] == CLASSES
    assert body["max_batch"] == MAX_BATCH and body["num_classes"] == 3
    batching = body["batching"]
    assert batching["max_batch"] == MAX_BATCH and batching["max_wait_ms"] == 1.0
    assert {"queue_depth", "queued_images", "in_flight_images", "batches", "requests", "images"} <= set(batching)


def test_png_files_match_pytorch(server, model_and_artifact):
    model, _ = model_and_artifact
    pixels = images(3)
    body, headers = multipart([(f"img{i}.png", png(p), "image/png") for i, p in enumerate(pixels)])
    status, answer = request(server + "/predict", body, headers)
    assert status == 200, answer
    expected = pytorch_logits(model, pixels)
    got = torch.tensor([p["logits"] for p in answer["predictions"]])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert [p["class"] for p in answer["predictions"]] == expected.argmax(1).tolist()
    assert [p["name"] for p in answer["predictions"]] == [CLASSES[k] for k in expected.argmax(1).tolist()]
    assert [p["file"] for p in answer["predictions"]] == ["img0.png", "img1.png", "img2.png"]


def test_one_jpeg_file(server, model_and_artifact):
    model, _ = model_and_artifact
    blob = png(images(1, 5)[0], fmt="JPEG")
    decoded = np.array(Image.open(io.BytesIO(blob)).convert("L"))[None]  # JPEG is lossy: compare what it holds
    status, answer = request(server + "/predict", *multipart([("a.jpg", blob, "image/jpeg")]))
    assert status == 200, answer
    torch.testing.assert_close(torch.tensor(answer["predictions"][0]["logits"])[None], pytorch_logits(model, decoded),
                               atol=1e-4, rtol=1e-4)


def test_json_batch_matches_pytorch(server, model_and_artifact):
    model, _ = model_and_artifact
    pixels = images(2, 1)
    payload = json.dumps({"images": pixels[:, None].tolist()}).encode()
    status, answer = request(server + "/predict", payload, {"Content-Type": "application/json"})
    assert status == 200, answer
    expected = pytorch_logits(model, pixels)
    torch.testing.assert_close(torch.tensor([p["logits"] for p in answer["predictions"]]), expected,
                               atol=1e-4, rtol=1e-4)
    normalised = ((pixels[:, None] / 255 - NORM["mean"][0]) / NORM["std"][0]).tolist()
    status, answer = request(server + "/predict", json.dumps({"images": normalised, "normalized": True}).encode(),
                             {"Content-Type": "application/json"})
    assert status == 200, answer
    torch.testing.assert_close(torch.tensor([p["logits"] for p in answer["predictions"]]), expected,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case, status, words", [
    ("wrong size", 422, "is 10x12 pixels; this model takes 12x12"),
    ("colour", 422, "grayscale"),
    ("not an image", 415, "is not an image"),
    ("too many files", 413, f"maximum of {MAX_BATCH}"),
    ("no files", 400, "no files"),
])
def test_bad_uploads(server, case, status, words):
    files = {
        "wrong size": [("w.png", png(images(1, size=(12, 10))[0]), "image/png")],
        "colour": [("c.png", png(np.zeros((12, 12, 3), np.uint8), mode="RGB"), "image/png")],
        "not an image": [("notes.txt", b"hello, not pixels", "text/plain")],
        "too many files": [(f"{i}.png", png(p), "image/png") for i, p in enumerate(images(MAX_BATCH + 1))],
        "no files": [],
    }[case]
    if case == "no files":
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--{boundary}--\r\n').encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    else:
        body, headers = multipart(files)
    got, answer = request(server + "/predict", body, headers)
    assert got == status and words in answer["error"], answer


@pytest.mark.parametrize("payload, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"pixels": []}).encode(), 400, '"images"'),
    (json.dumps({"images": np.zeros((2, 1, 12, 13)).tolist()}).encode(), 422,
     "wrong input shape: expected (N, 1, 12, 12)"),
    (json.dumps({"images": [[[[1, 2], [3]]]]}).encode(), 422, "rectangular"),
    (json.dumps({"images": np.zeros((MAX_BATCH + 1, 1, 12, 12)).tolist()}).encode(), 413, f"maximum of {MAX_BATCH}"),
    (json.dumps({"images": np.full((1, 1, 12, 12), 300).tolist()}).encode(), 422, "[0, 255]"),
])
def test_bad_json(server, payload, status, words):
    got, answer = request(server + "/predict", payload, {"Content-Type": "application/json"})
    assert got == status and words in answer["error"], answer


def test_other_content_type_and_unknown_route(server):
    got, answer = request(server + "/predict", b"abc", {"Content-Type": "text/plain"})
    assert got == 415 and "multipart/form-data" in answer["error"]
    got, answer = request(server + "/nothing")
    assert got == 404 and answer["error"]


def test_bad_artifact_exits_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SERVE), str(tmp_path / "missing.onnx")], capture_output=True,
                          text=True, timeout=180, check=False)
    assert proc.returncode == 2 and "error: no onnx artifact at" in proc.stderr


# -- limits, each hit while normal requests run beside it ---------------------------------------------------------


def png_header(width, height) -> bytes:
    """A small PNG whose header says width x height 8-bit grayscale: what a huge image looks like before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


def memory_kb(proc) -> dict:
    """The service's resident memory now (VmRSS) and at its peak (VmHWM), in kB."""
    lines = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


class NormalTraffic:
    """A thread that sends ordinary PNG requests one after another (at most ``limit``, for at most 60 s) until stopped,
    and keeps each answer with the pixels it sent."""

    def __init__(self, url, limit=400):
        self.url, self.limit, self.answers = url, limit, []
        self.stop, self.started = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        deadline = time.monotonic() + 60
        for i in range(self.limit):
            if self.stop.is_set() or time.monotonic() > deadline:
                break
            pixels = images(1, 100 + i)
            self.answers.append((pixels, *request(self.url + "/predict",
                                                  *multipart([(f"n{i}.png", png(pixels[0]), "image/png")]))))
            self.started.set()

    def __enter__(self):
        self.thread.start()
        assert self.started.wait(TIMEOUT), "no normal request was answered"
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(TIMEOUT + 5)
        assert not self.thread.is_alive()


def send_raw(url, body, headers, chunked=False):
    """(status, JSON answer) of a POST with http.client: a body as bytes with its Content-Length, or chunked."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        if chunked:
            pieces = [body[i:i + 65536] for i in range(0, len(body), 65536)]
            conn.request("POST", "/predict", body=iter(pieces), headers=headers, encode_chunked=True)
        else:
            conn.request("POST", "/predict", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def too_large_json() -> bytes:
    body = json.dumps({"images": np.zeros((1, 1, 12, 12)).tolist(), "pad": "x" * (MAX_REQUEST_MB << 20)}).encode()
    assert len(body) > MAX_REQUEST_MB << 20
    return body


LIMIT_CASES = {
    # case: (body, headers, chunked) -> status, words in the error
    "body over the limit": (lambda: (too_large_json(), {"Content-Type": "application/json"}, False),
                            413, "over the limit of"),
    "chunked body over the limit": (lambda: (too_large_json(), {"Content-Type": "application/json"}, True),
                                    413, "over the limit of"),
    "12000x12000 image header": (lambda: (*multipart([("huge.png", png_header(12000, 12000), "image/png")]), False),
                                 422, "'huge.png' is 12000x12000 pixels; this model takes 12x12"),
    "decompression bomb header": (lambda: (*multipart([("bomb.png", png_header(60000, 60000), "image/png")]), False),
                                  422, "'bomb.png' is far too large"),
    "too many files": (lambda: (*multipart([(f"{i}.png", png(p), "image/png")
                                            for i, p in enumerate(images(MAX_BATCH + 1))]), False),
                       413, f"batch of {MAX_BATCH + 1} images is over this model's maximum of {MAX_BATCH}"),
    "too many JSON images": (lambda: (json.dumps({"images": images(MAX_BATCH + 1)[:, None].tolist()}).encode(),
                                      {"Content-Type": "application/json"}, False),
                             413, f"maximum of {MAX_BATCH}"),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_limits_hold_while_normal_requests_succeed(service, model_and_artifact, case):
    url, proc = service
    model, _ = model_and_artifact
    make, status, words = LIMIT_CASES[case]
    body, headers, chunked = make()
    before = memory_kb(proc)
    with NormalTraffic(url) as normal:
        for _ in range(3):
            start = time.monotonic()
            got, answer = send_raw(url, body, headers, chunked)
            assert got == status and words in answer["error"], answer
            assert time.monotonic() - start < 5, "a refusal should not wait for work it never does"
    after = memory_kb(proc)
    # a huge image is refused from its header, never decoded: 12000 x 12000 pixels would be 137 MB
    assert after["VmHWM"] - before["VmHWM"] < 40_000, (before, after)
    assert normal.answers, "no normal request ran beside the refused ones"
    for pixels, got, answer in normal.answers:
        assert got == 200, answer
        torch.testing.assert_close(torch.tensor(answer["predictions"][0]["logits"])[None],
                                   pytorch_logits(model, pixels), atol=1e-4, rtol=1e-4)
    status, health = request(url + "/health")
    assert status == 200 and health["batching"]["queue_depth"] == 0


def test_concurrent_requests_share_a_batch_and_get_their_own_answers(slow_batching_server, model_and_artifact):
    url, _ = slow_batching_server
    model, _ = model_and_artifact
    _, before = request(url + "/health")
    sizes = [1, 2, 1, 3, 1, 2, 1, 1]  # PNG requests of several images each, and two JSON ones
    pixel_sets = [images(n, 200 + i) for i, n in enumerate(sizes)]
    results = [None] * (len(sizes) + 2)

    def png_call(i):
        results[i] = request(url + "/predict", *multipart([(f"r{i}-{k}.png", png(p), "image/png")
                                                            for k, p in enumerate(pixel_sets[i])]))

    def json_call(i, pixels):
        results[i] = request(url + "/predict", json.dumps({"images": pixels[:, None].tolist()}).encode(),
                             {"Content-Type": "application/json"})

    json_pixels = [images(2, 300), images(1, 301)]
    threads = [threading.Thread(target=png_call, args=(i,)) for i in range(len(sizes))]
    threads += [threading.Thread(target=json_call, args=(len(sizes) + j, p)) for j, p in enumerate(json_pixels)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    for i, pixels in enumerate(pixel_sets + json_pixels):
        status, answer = results[i]
        assert status == 200, answer
        got = torch.tensor([p["logits"] for p in answer["predictions"]])
        torch.testing.assert_close(got, pytorch_logits(model, pixels), atol=1e-4, rtol=1e-4)
        if i < len(sizes):
            assert [p["file"] for p in answer["predictions"]] == [f"r{i}-{k}.png" for k in range(len(pixels))]
    _, after = request(url + "/health")
    served = after["batching"]["requests"] - before["batching"]["requests"]
    batches = after["batching"]["batches"] - before["batching"]["batches"]
    assert served == len(threads) and batches < served, after["batching"]  # some requests shared a batch
    assert 1 < after["batching"]["largest_batch"] <= MAX_BATCH
    assert after["batching"]["queue_depth"] == 0 and after["batching"]["in_flight_images"] == 0


# -- in-process: the batcher and the form parser on their own -------------------------------------------------------


@pytest.fixture(scope="module")
def serve_module():
    spec = importlib.util.spec_from_file_location("serve_example", SERVE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeModel:
    """Logits = each image's pixel sum and its negation; a batch holding a pixel of 7 is refused (as a wrong input)."""
    kind, min_batch, max_batch = "fake", 1, 8

    def __init__(self):
        self.calls = []

    def __call__(self, x, raw=False):
        from compressor.errors import CompressorError

        self.calls.append(len(x))
        if (x == 7).any():
            raise CompressorError("a seven")
        total = torch.as_tensor(x, dtype=torch.float32).flatten(1).sum(1)
        return torch.stack([total, -total], 1)


def test_micro_batcher_joins_splits_and_isolates_errors(serve_module):
    from compressor.errors import CompressorError

    model = FakeModel()
    batcher = serve_module.MicroBatcher(model, model.max_batch, wait_s=0.3)

    async def scenario():
        inputs = [np.full((n, 1, 2, 2), v, np.uint8) for n, v in [(1, 1), (3, 2), (2, 7), (1, 4), (2, 5)]]
        futures = [batcher.submit(x, True) for x in inputs]
        return inputs, await asyncio.gather(*futures, return_exceptions=True)

    try:
        inputs, results = asyncio.run(scenario())
        stats = batcher.stats()
    finally:
        batcher.close()
    for x, result in zip(inputs, results):
        if (x == 7).any():
            assert isinstance(result, CompressorError) and "a seven" in str(result)
            continue
        top, logits = result
        assert len(top) == len(x) and top == [0] * len(x)
        assert logits == [[float(x[i].sum()), -float(x[i].sum())] for i in range(len(x))]
    assert model.calls[0] == 7  # 1 + 3 + 2 + 1 joined; the last request's 2 more would pass max_batch (8): next batch
    assert model.calls[1:5] == [1, 3, 2, 1]  # the refused batch rerun request by request
    assert model.calls[5:] == [2]
    assert stats["batches_rerun_one_by_one"] == 1 and stats["requests"] == 5 and stats["images"] == 9
    assert stats["largest_batch"] == 7 and stats["queue_depth"] == 0


def test_micro_batcher_keeps_kinds_apart(serve_module):
    model = FakeModel()
    batcher = serve_module.MicroBatcher(model, model.max_batch, wait_s=0.3)

    async def scenario():
        futures = [batcher.submit(np.ones((1, 1, 2, 2), np.uint8), True),
                   batcher.submit(np.ones((1, 1, 2, 2), np.float32), False),  # normalised input: another batch
                   batcher.submit(np.ones((1, 1, 2, 2), np.float32), False)]
        return await asyncio.gather(*futures)

    try:
        results = asyncio.run(scenario())
    finally:
        batcher.close()
    assert model.calls == [1, 2] and [r[1] for r in results] == [[[4.0, -4.0]]] * 3


def test_form_parser(serve_module):
    parse, bad = serve_module.form_files, serve_module.BadRequest
    body = (b'preamble\r\n--XX\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            b'--XX \r\ncontent-disposition: form-data; name="f"; filename="a b.png"\r\nContent-Type: image/png\r\n\r\n'
            b"\r\n-XX\r\nbytes\r\n\r\n--XX\r\nContent-Disposition: form-data; name=\"g\"; filename=\"\"\r\n\r\n"
            b"\r\n--XX--\r\nepilogue")
    assert parse(body, 'multipart/form-data; boundary="XX"') == [("a b.png", b"\r\n-XX\r\nbytes\r\n"), ("", b"")]
    for broken, words in [(b"no boundary here", "does not start with the boundary"),
                          (b'--XX\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\nabc', "closing"),
                          (b"--XX\r\nNoColon\r\n\r\nabc\r\n--XX--", "malformed part header"),
                          (b"--XX\r\n\r\nno headers\r\n--XX--", "no Content-Disposition")]:
        with pytest.raises(bad, match=words) as error:
            parse(broken, "multipart/form-data; boundary=XX")
        assert error.value.status == 400
    with pytest.raises(bad, match="no boundary"):
        parse(b"--XX--", "multipart/form-data")
    many = b"".join(b'--XX\r\nContent-Disposition: form-data; name="f"; filename="x"\r\n\r\n1\r\n' for _ in range(6))
    with pytest.raises(bad, match="more than 5 parts") as error:
        parse(many + b"--XX--", "multipart/form-data; boundary=XX", max_parts=5)
    assert error.value.status == 413
