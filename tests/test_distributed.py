"""torchrun + DDP on gloo, two processes on this CPU, launched the way a user launches them.

Two cores cannot show a speedup; these tests show that the ranks agree, that two ranks equal
one process where they should, and that an elastic restart finishes the run.
"""
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import compressor

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not shutil.which("torchrun"),
                                reason="torch.distributed or torchrun is not available in this environment")

HERE = Path(__file__).parent
RUN = ["--model", "conv4", "--dataset", "synthetic", "--batch-size", "64", "--budget-macs", "0.5"]


def torchrun(args, procs=2, env=None, restarts=2, cwd=None, timeout=600):
    """Run torchrun in its own process group, so that a time-out ends its workers too.

    A failed rank makes torchrun restart them all (``--max-restarts``), and a restarted run resumes
    from its last saved epoch, so every assertion below still holds after a restart."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = ["torchrun", "--standalone", f"--nproc-per-node={procs}", f"--max-restarts={restarts}", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd or HERE.parent, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_one_step_on_two_ranks_equals_one_process(tmp_path):
    from tests.ddp_worker import one_step

    done = torchrun([str(HERE / "ddp_worker.py"), str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0["weights"]:  # DDP keeps the ranks bit for bit alike
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    alone = tmp_path / "alone"
    alone.mkdir()
    one_step(alone)  # the same step in this process, without torchrun
    single = torch.load(alone / "rank0.pt", weights_only=True)
    assert r0["loss"] == pytest.approx(single["loss"], rel=1e-5)
    for k in single["weights"]:
        torch.testing.assert_close(r0["weights"][k], single["weights"][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, options", [
    ("l1", []),
    ("psap", ["--steps", "2", "--step-epochs", "1"]),
    ("ffr", ["--ffr-epochs", "1"]),
    ("sensitivity", ["--levels", "0.5"]),
    ("smoea", ["--population", "4", "--generations", "1", "--group-size", "2", "--search-samples", "32",
               "--step-epochs", "0"]),
])
def test_a_run_under_torchrun_writes_one_run_that_loads(tmp_path, method, options):
    out = tmp_path / "run"
    done = torchrun(["-m", "compressor", "run", *RUN, "--epochs", "1", "--finetune-epochs", "1", "--method", method,
                     *options, "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    names = {p.name for p in out.iterdir()}  # the run's files (and a criterion's tables), no state, no partials
    assert {"dense.pt", "metrics.json", "plan.json", "pruned.pt"} <= names and not any(n[0] == "." for n in names)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["criterion"]["distributed"] == {"world": 2, "plans_equal_on_every_rank": True}
    model = compressor.load(out / "pruned.pt")
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert done.stdout.count("fine-tuned") == 1  # one rank reports


def test_a_worker_killed_mid_epoch_is_restarted_and_the_run_finishes(tmp_path):
    """torchrun keeps one store across its restarts; distributed.setup gives each restart its own keys,
    without which the restarted ranks read the killed round's gloo addresses and fail to connect or hang
    (docs/torchrun.md). The time-out ends such a hang well inside CI's budget instead of gloo's 30 minutes."""
    args = ["-m", "compressor", "run", *RUN, "--epochs", "2", "--finetune-epochs", "1", "--method", "l1"]
    whole = torchrun(args + ["--out", str(tmp_path / "whole")], timeout=180)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = torchrun(args + ["--out", str(tmp_path / "cut")], timeout=180,
                   env={"COMPRESSOR_KILL_AT": "train-step@20", "COMPRESSOR_KILL_RANK": "1"})
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert "exitcode: -9" in cut.stderr  # rank 1 really died mid-epoch
    assert "train: resuming at epoch 2/2" in cut.stdout
    a, b = (torch.load(tmp_path / d / "pruned.pt", weights_only=True)["state_dict"] for d in ("whole", "cut"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "whole" / "plan.json").read_text() == (tmp_path / "cut" / "plan.json").read_text()


def test_torchrun_needs_an_out_directory(tmp_path):
    done = torchrun(["-m", "compressor", "run", *RUN, "--epochs", "0", "--finetune-epochs", "0"], restarts=0,
                    cwd=tmp_path)
    assert done.returncode != 0 and "under torchrun, give --out" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_export_and_bench_under_torchrun_are_done_once(tmp_path):
    out = tmp_path / "run"
    assert torchrun(["-m", "compressor", "run", *RUN, "--epochs", "0", "--finetune-epochs", "0", "--out", str(out)],
                    procs=1).returncode == 0
    done = torchrun(["-m", "compressor", "export", str(out), "--formats", "onnx", "--no-accuracy"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 has nothing to do" in done.stdout and (out / "export" / "export.json").is_file()
    done = torchrun(["-m", "compressor", "bench", str(out), "--device", "cpu", "--backends", "eager", "--batch-sizes",
                     "1", "--warmup", "1", "--min-iters", "2", "--min-seconds", "0", "--rounds", "1"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((out / "bench.jsonl").read_text().splitlines()) == 2  # the settings line and one point, once


def test_sync_bn_is_refused_on_cpus(tmp_path):
    done = torchrun(["-m", "compressor", "run", *RUN, "--epochs", "1", "--finetune-epochs", "0", "--sync-bn",
                     "--out", str(tmp_path / "run")], restarts=0)
    assert done.returncode != 0 and "--sync-bn needs CUDA GPUs" in done.stderr
