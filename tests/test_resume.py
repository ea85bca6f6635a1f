"""Kill a real `compress run` process at chosen moments (SIGKILL, as a reclaimed machine would),
resume it, and check that it ends bit for bit where an unbroken run ends, with no temporary file left.

The moments are set through ``COMPRESSOR_KILL_AT`` (``compressor.files.failpoint``): a training
step, the rename that commits a file (its complete temporary file is then left behind), and
SMOEA's commit of its weights before its state.
"""
import os
import subprocess
import sys

import pytest
import torch

BASE = ["run", "--model", "conv4", "--dataset", "synthetic", "--batch-size", "64", "--budget-macs", "0.5"]
L1 = BASE + ["--method", "l1", "--epochs", "2", "--finetune-epochs", "2"]  # 15 steps per epoch
SMOEA = BASE + ["--method", "smoea", "--epochs", "1", "--finetune-epochs", "1", "--population", "4",
                "--generations", "2", "--group-size", "2", "--search-samples", "64", "--step-epochs", "1"]


def compress(args, kill_at=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("COMPRESSOR_KILL_AT", None)
    if kill_at:
        env["COMPRESSOR_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "compressor.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def weights(run_dir):
    return torch.load(run_dir / "pruned.pt", weights_only=True)["state_dict"]


def assert_same_run(a, b):
    assert (a / "plan.json").read_text() == (b / "plan.json").read_text()
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def leftovers(run_dir):
    return [p.name for p in run_dir.rglob("*") if p.name.endswith(".partial") or p.name == ".state"]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    runs = {}
    for name, args in (("l1", L1), ("smoea", SMOEA)):
        out = tmp_path_factory.mktemp("unbroken") / name
        done = compress(args + ["--out", str(out)])
        assert done.returncode == 0, done.stderr
        runs[name] = out
    return runs


@pytest.mark.parametrize("kind, kill_at, extra", [
    ("l1", "train-step@20", []),                             # dense training, epoch 2 of 2
    ("l1", "rename-train.pt", []),                           # the first epoch's state, written but not committed
    ("l1", "rename-dense.pt", []),                           # dense.pt written but not committed
    ("l1", "train-step@40", []),                             # fine-tuning, epoch 1
    ("l1", "train-step@22", ["--checkpoint-every", "4"]),    # mid-epoch, after a step-level save
    ("l1", "rename-metrics.json", []),                       # everything done but the last file
    ("smoea", "smoea-weights-written@2", []),                # block 1 trained: its weights committed, its state not yet
    ("smoea", "train-step@18", []),                          # SMOEA's training between blocks
])
def test_killed_run_resumes_to_the_same_result(tmp_path, unbroken, kind, kill_at, extra):
    args = (L1 if kind == "l1" else SMOEA) + extra + ["--out", str(tmp_path / "run")]
    killed = compress(args, kill_at)
    assert killed.returncode == -9, killed.stderr  # it really died at that point
    assert not (tmp_path / "run" / "metrics.json").exists()
    resumed = compress(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(unbroken[kind], tmp_path / "run")
    assert leftovers(tmp_path / "run") == []


@pytest.mark.parametrize("kill_at, reported, resumes", [
    ("epoch-line", "train epoch 1/2:", "train: resuming at epoch 2/2"),              # dense training's first epoch
    ("epoch-line@3", "finetune epoch 1/2:", "finetune: resuming at epoch 2/2"),       # fine-tuning's first epoch
], ids=["dense", "finetune"])
def test_a_reported_epoch_is_never_trained_again(tmp_path, unbroken, kill_at, reported, resumes):
    """Reported means durable: killed the moment an epoch's line is out, the run resumes after that epoch."""
    args = L1 + ["--out", str(tmp_path / "run")]
    killed = compress(args, kill_at)
    assert killed.returncode == -9, killed.stderr
    last = killed.stdout.strip().splitlines()[-1]
    assert last.startswith(reported) and last.endswith(", saved"), killed.stdout  # the line was out, and said so
    resumed = compress(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    out = resumed.stdout + resumed.stderr
    assert resumes in out, out
    assert reported not in out, out  # the reported epoch is not trained (or reported) a second time
    assert_same_run(unbroken["l1"], tmp_path / "run")
    assert leftovers(tmp_path / "run") == []


def test_resume_without_saved_progress_says_so_and_runs(tmp_path, unbroken):
    out = tmp_path / "run"
    done = compress(L1 + ["--out", str(out), "--resume"])
    assert done.returncode == 0, done.stderr
    assert "nothing saved" in done.stdout
    assert_same_run(unbroken["l1"], out)
    again = compress(L1 + ["--out", str(out), "--resume"])  # a finished run is not run again
    assert again.returncode == 0 and "finished run" in again.stdout


def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "run"
    assert compress(L1 + ["--out", str(out)], "train-step@3").returncode == -9
    other = compress(L1 + ["--out", str(out), "--resume", "--seed", "5"])
    assert other.returncode == 2 and "--seed 5 (the run had 0)" in other.stderr


PSAP = BASE + ["--method", "psap", "--epochs", "1", "--finetune-epochs", "1", "--steps", "2", "--step-epochs", "1",
               "--protect-z", "0"]
SENSITIVITY = BASE + ["--method", "sensitivity", "--epochs", "1", "--finetune-epochs", "0", "--steps", "2",
                      "--step-epochs", "2", "--levels", "0.5"]
FFR = BASE + ["--method", "ffr", "--epochs", "1", "--finetune-epochs", "0", "--ffr-epochs", "2"]


@pytest.mark.parametrize("args, kill_at, expect", [
    # PSAP's masked training, step 2: step 1 (and its gradient watch) is loaded, step 2 trains again
    (PSAP, "train-step@38", "psap step 1/2: finished before the interruption"),
    (SENSITIVITY, "train-step@38", "step 1: resuming at epoch 2"),  # sensitivity's training between steps
    (FFR, "train-step@38", "ffr: resuming at epoch 2"),             # FFR's regularised training, epoch 2
], ids=["psap", "sensitivity", "ffr"])
def test_criteria_training_resumes_to_the_same_result(tmp_path, args, kill_at, expect):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert compress(args + ["--out", str(whole)]).returncode == 0
    assert compress(args + ["--out", str(cut)], kill_at).returncode == -9
    resumed = compress(args + ["--out", str(cut), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert expect in resumed.stdout + resumed.stderr
    assert_same_run(whole, cut)
    assert leftovers(cut) == []


def test_run_lock_is_not_held_by_forked_workers(tmp_path):
    """The run's lock is this process's own: a forked child (a DataLoader worker) does not keep it, so another
    process may take the directory as soon as the run that held it has let go, even while the child lives."""
    import multiprocessing
    import subprocess
    import sys

    from compressor.resume import RunState

    def take_lock():
        code = ("import sys; from compressor.resume import RunState; from compressor.errors import CompressorError\n"
                f"try:\n    RunState({str(tmp_path)!r}).lock(); print('took it')\n"
                "except CompressorError as e:\n    print('refused')")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip()

    state = RunState(tmp_path)
    state.lock()
    child = multiprocessing.get_context("fork").Process(target=__import__("time").sleep, args=(60,))
    child.start()
    try:
        assert take_lock() == "refused"
        state.close(finished=False)
        assert child.is_alive() and take_lock() == "took it"
    finally:
        child.kill()
        child.join()
