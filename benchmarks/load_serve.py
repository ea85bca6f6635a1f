"""Load benchmark of examples/serve.py: locust (headless) clients against a local server, per artifact and client count.

Usage (needs ``pip install locust``, which is not a dependency of the project; localhost only):

    python benchmarks/load_serve.py --label improved \
        --artifact conv4=/tmp/serve-conv4/pruned.pt \
        --artifact vgg16-int8=/tmp/serve-vgg16/export/vgg16-pruned-int8.onnx \
        --clients 8,32 --duration 60 --out benchmarks/results/cpu-serve-load
    # the same against another version of the service, e.g. the committed one:
    git show HEAD:examples/serve.py > /tmp/serve_baseline.py
    python benchmarks/load_serve.py --label baseline --serve /tmp/serve_baseline.py ...

For each artifact it starts ``serve.py ARTIFACT`` on a free port of 127.0.0.1 (``--serve-args`` are
passed on), waits for ``GET /health``, sends ``--warmup`` requests one by one, and records the server's
resident memory (VmRSS). Then, for each client count, it runs ``locust --headless`` with that many
clients (``benchmarks/load_serve_locust.py``: a closed loop, each client POSTs one PNG of the model's
input size, random pixels with a fixed seed, as multipart/form-data, and waits for the answer), for
``--duration`` seconds, and records: requests/s (answered 200 with one prediction, over the time from
the first request's start to the last one's end), latency p50/p90/p99/max over every request, errors
(any other answer or a failed connection), the server's RSS before and after, the CPU seconds the
server used, and the machine's load average. The server is stopped after its artifact's runs.

Results go to ``OUT.json`` (merged: each ``--label`` keeps its own entry, so a baseline and an
improved run can be recorded one after the other) and ``OUT.md`` (a table of every label), with the
command, the commit, the CPU, the versions and the date.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().with_name("load_serve_locust.py")
DEFAULT_SERVE = ROOT / "examples" / "serve.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_info() -> dict:
    model, flags = None, ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    return {"model": model or platform.processor(), "cores": os.cpu_count(), "avx512_vnni": "avx512_vnni" in flags,
            "avx512f": "avx512f" in flags, "machine": platform.machine()}


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for dist in ("torch", "onnxruntime", "fastapi", "starlette", "uvicorn", "python-multipart", "pillow", "locust",
                 "httptools", "uvloop"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = None
    return found


def http_json(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 10):
    req = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def png_body(shape, seed: int = 0) -> tuple[bytes, str]:
    """One random PNG of the model's (C, H, W), as a multipart/form-data body, and its Content-Type."""
    import io

    from PIL import Image

    channels, height, width = shape
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0], "L") if channels == 1 else Image.fromarray(pixels, "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="load.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + buffer.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def percentile(sorted_values, q: float) -> float:
    """The q-quantile (0..1) by linear interpolation, as numpy's default."""
    return float(np.percentile(np.asarray(sorted_values), q * 100)) if sorted_values else float("nan")


class Server:
    def __init__(self, serve: Path, artifact: Path, extra: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, str(serve), str(artifact), "--host", "127.0.0.1", "--port", str(self.port), *extra]
        self.command = cmd
        # its own session, as a service manager would start it (and so its own scheduler autogroup on Linux)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, seconds: float = 180) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                status, health = http_json(self.url + "/health", timeout=2)
                if status == 200:
                    return health
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer /health within {seconds} s")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self.log.close()


def run_locust(url: str, clients: int, duration: float, body_file: Path, ctype: str, work: Path,
               max_requests: int) -> dict:
    times = work / f"times-{clients}.json"
    env = {**os.environ, "LOAD_SERVE_BODY": str(body_file), "LOAD_SERVE_CTYPE": ctype,
           "LOAD_SERVE_TIMES": str(times), "LOAD_SERVE_MAX_REQUESTS": str(max_requests)}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
           "-u", str(clients), "-r", str(clients), "--run-time", f"{int(duration)}s", "--stop-timeout", "10",
           "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    t0, children0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    # its own session too: the clients stand for other machines, so they do not share the server's CPU share
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 120, check=False,
                          start_new_session=True)
    wall, children1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    if proc.returncode != 0 or not times.is_file():
        raise RuntimeError(f"locust failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(times.read_text())
    records = data["records"]
    ok = [r for r in records if r[2]]
    latencies = sorted(r[1] for r in records)
    span = (max(r[0] + r[1] / 1e3 for r in records) - min(r[0] for r in records)) if records else float("nan")
    return {"clients": clients, "duration_s": round(span, 2), "locust_wall_s": round(wall, 1),
            "client_cpu_s": round(client_cpu, 1),
            "requests": len(records), "ok": len(ok), "errors": len(records) - len(ok), "error_kinds": data["errors"],
            "requests_per_s": round(len(ok) / span, 1) if records else 0.0,
            "latency_ms": {"mean": round(statistics.fmean(latencies), 2) if latencies else None,
                           **{name: round(percentile(latencies, q), 2) for name, q in
                              (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
                           "max": round(latencies[-1], 2) if latencies else None},
            "locust_warnings": [line for line in proc.stderr.splitlines() if "CPU usage" in line][:3]}


def bench_artifact(name: str, artifact: Path, args, work: Path) -> dict:
    server = Server(args.serve, artifact, shlex.split(args.serve_args), work / f"server-{name}.log")
    try:
        health = server.wait()
        shape = health["input_shape"]
        body, ctype = png_body(shape)
        body_file = work / f"body-{name}.bin"
        body_file.write_bytes(body)
        for _ in range(args.warmup):
            status, answer = http_json(server.url + "/predict", body, {"Content-Type": ctype})
            assert status == 200 and len(answer["predictions"]) == 1, answer
        rss_start = rss_mb(server.proc.pid)
        runs = []
        for clients in args.clients:
            health0 = http_json(server.url + "/health")[1].get("batching") or {}
            before, cpu0, load0 = rss_mb(server.proc.pid), cpu_seconds(server.proc.pid), os.getloadavg()
            result = run_locust(server.url, clients, args.duration, body_file, ctype, work, args.max_requests)
            after, cpu1, load1 = rss_mb(server.proc.pid), cpu_seconds(server.proc.pid), os.getloadavg()
            result.update(rss_before_mb=round(before, 1), rss_after_mb=round(after, 1),
                          rss_growth_pct=round(100 * (after - before) / before, 1),
                          server_cpu_s=round(cpu1 - cpu0, 1), loadavg_before=[round(x, 2) for x in load0],
                          loadavg_after=[round(x, 2) for x in load1])
            try:
                result["health_after"] = http_json(server.url + "/health")[1]
            except OSError as exc:
                result["health_after"] = {"error": str(exc)}
            batching = result["health_after"].get("batching") or {}
            if batching and health0:
                batches = batching["batches"] - health0["batches"]
                result["mean_batch"] = round((batching["images"] - health0["images"]) / batches, 2) if batches else None
            result["server_cpu_ms_per_request"] = round(1e3 * result["server_cpu_s"] / result["ok"], 3) \
                if result["ok"] else None
            runs.append(result)
            lat = result["latency_ms"]
            print(f"  {name} {clients:>3} clients: {result['requests_per_s']:8.1f} req/s, p50 {lat['p50']} ms, "
                  f"p99 {lat['p99']} ms, errors {result['errors']}, RSS {before:.0f} -> {after:.0f} MB, "
                  f"CPU server {result['server_cpu_s']} s client {result['client_cpu_s']} s, load {load1[0]:.2f}"
                  + (f", mean batch {result.get('mean_batch')}" if batching else ""), flush=True)
        return {"artifact": str(artifact), "input_shape": shape, "kind": health.get("kind"),
                "max_batch": health.get("max_batch"), "server_command": server.command[1:],
                "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_mb(server.proc.pid), 1), "runs": runs}
    finally:
        server.stop()


def table(results: dict) -> str:
    lines = ["| service | artifact | clients | requests/s | p50 ms | p99 ms | errors | RSS before -> after MB (growth) "
             "| server CPU ms / request | mean batch | load avg (1 min) after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, entry in results.items():
        for name, art in entry["artifacts"].items():
            for run in art["runs"]:
                lat = run["latency_ms"]
                lines.append(f"| {label} | {name} | {run['clients']} | {run['requests_per_s']:.1f} | {lat['p50']:.1f} "
                             f"| {lat['p99']:.1f} | {run['errors']} | {run['rss_before_mb']:.0f} -> "
                             f"{run['rss_after_mb']:.0f} ({run['rss_growth_pct']:+.1f}%) "
                             f"| {run['server_cpu_ms_per_request']} | {run.get('mean_batch') or '-'} "
                             f"| {run['loadavg_after'][0]:.2f} |")
    return "\n".join(lines)


def write_markdown(path: Path, data: dict):
    parts = ["# examples/serve.py under load (locust, headless, localhost)", "",
             "Written by `benchmarks/load_serve.py`; every figure is in the JSON beside this file.", ""]
    for label, entry in data.items():
        parts += [f"## {label}", "", f"- command: `{entry['command']}`", f"- commit: {entry['commit']}",
                  f"- date: {entry['date']}", f"- service: `{entry['serve']}` with `{entry['serve_args']}`",
                  f"- CPU: {entry['cpu']['model']}, {entry['cpu']['cores']} cores, "
                  f"avx512_vnni {'yes' if entry['cpu']['avx512_vnni'] else 'no'}",
                  f"- load average before: {entry['loadavg_before']} (`uptime`: {entry['uptime']})",
                  "- data: one random PNG of the model's input size per request (seed 0), multipart/form-data",
                  f"- versions: {', '.join(f'{k} {v}' for k, v in entry['versions'].items() if v)}", ""]
    parts += ["## Table", "", table(data), ""]
    path.write_text("\n".join(parts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", action="append", required=True, metavar="NAME=PATH",
                        help="an artifact to serve (repeatable), e.g. conv4=/tmp/serve-conv4/pruned.pt")
    parser.add_argument("--clients", default="8,32", help="comma-separated concurrent client counts (default 8,32)")
    parser.add_argument("--duration", type=float, default=60, help="seconds per client count (default 60)")
    parser.add_argument("--warmup", type=int, default=20, help="sequential requests before measuring (default 20)")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop a run after this many requests")
    parser.add_argument("--serve", type=Path, default=DEFAULT_SERVE,
                        help="the service script (default: examples/serve.py)")
    parser.add_argument("--serve-args", default="--log-level warning", help="passed to the service")
    parser.add_argument("--label", default="current", help="name of this configuration in the results")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md (merged by --label)")
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    if not 1 <= args.duration <= 600 or any(not 1 <= c <= 256 for c in args.clients):
        parser.error("--duration must be 1..600 s and every client count 1..256")
    artifacts = {}
    for item in args.artifact:
        name, _, path = item.partition("=")
        if not path:
            name, path = Path(item).stem, item
        if not Path(path).is_file():
            parser.error(f"no artifact at {path}")
        artifacts[name] = Path(path)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    entry = {"command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "commit": git_commit(),
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_info(),
             "uptime": uptime, "loadavg_before": [round(x, 2) for x in os.getloadavg()], "versions": versions(),
             "serve": str(args.serve), "serve_args": args.serve_args, "clients": args.clients,
             "duration_s": args.duration, "artifacts": {}}
    print(f"{args.label}: {entry['cpu']['model']}, load {entry['loadavg_before']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="load-serve-") as tmp:
        for name, path in artifacts.items():
            entry["artifacts"][name] = bench_artifact(name, path, args, Path(tmp))
    entry["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        json_path = args.out.with_suffix(".json")
        data = json.loads(json_path.read_text()) if json_path.is_file() else {}
        data[args.label] = entry
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        write_markdown(args.out.with_suffix(".md"), data)
        print(f"wrote {json_path} and {args.out.with_suffix('.md')}")
    print(table({args.label: entry}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
