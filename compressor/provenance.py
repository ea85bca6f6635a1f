"""Where a result came from: package versions, the git commit, the device's name.

Every result file (a run's metrics.json, bench.json, export.json, a study's compare.json)
records these, so they live apart from any one of the modules that write results.
"""
from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "commit": git_commit()}
    for dist in ("compressor", "torch", "torchvision", "torch-pruning", "onnx", "onnxruntime"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = None
    return found


def git_commit() -> str | None:
    """The commit that produced a result, marked -dirty when the tree had uncommitted changes."""
    here = Path(__file__).parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return (commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The one name of a device in every result: the GPU's name, or the CPU's model, cores and threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def stamp(command: list[str] | None, device: torch.device) -> dict:
    """The fields every result file starts with: the command, the date (UTC), the commit, the device, the versions."""
    return {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "device": device_name(device), "versions": versions()}
