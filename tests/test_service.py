"""examples/serve.py in a subprocess on a free localhost port: real PNG requests, answers checked against PyTorch."""
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
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


@pytest.fixture(scope="module")
def server(model_and_artifact):
    _, path = model_and_artifact
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(SERVE), str(path), "--port", str(port), "--threads", "1",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
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
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


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
