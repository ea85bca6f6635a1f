import json
import subprocess
import sys

import pytest

from compressor.cli import main

FAST = ["--dataset", "synthetic", "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "64"]


def test_run_end_to_end_on_synthetic(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--model", "resnet20", "--method", "l1", "--budget-macs", "0.5", "--out", str(out), *FAST]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dense.pt", "metrics.json", "plan.json", "pruned.pt"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete" and m["model"] == "resnet20" and m["dataset"] == "synthetic"
    assert abs(m["macs"]["fraction"] - 0.5) <= 0.01
    assert m["params"]["pruned"] < m["params"]["dense"]
    for stage in ("dense", "pruned", "finetuned"):
        assert 0.0 <= m["accuracy"][stage]["test"] <= 1.0
    assert set(m["seconds"]) >= {"data", "train", "plan", "surgery", "finetune", "total"}
    assert m["widths"]["pruned"] != m["widths"]["dense"] and m["versions"]["torch-pruning"]
    assert m["command"][:2] == ["compress", "run"]
    assert "fine-tuned" in capsys.readouterr().out

    # the pruned checkpoint is what inspect reads back, at the same size
    assert main(["inspect", str(out / "pruned.pt")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["params"] == m["params"]["pruned"]

    # an existing run is never overwritten by accident, and is with --overwrite
    assert main(["run", "--model", "resnet20", "--out", str(out), *FAST]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["run", "--checkpoint", str(out / "dense.pt"), "--budget-params", "0.5", "--out", str(out),
                 "--overwrite", *FAST[:2], "--finetune-epochs", "0"]) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["config"]["epochs"] == 0 and m2["budget"]["metric"] == "params"


def test_run_with_a_factory_model(tmp_path):
    out = tmp_path / "tv"
    args = ["run", "--model", "torchvision.models:resnet18", "--budget-params", "0.5", "--out", str(out), *FAST]
    args[args.index("--epochs") + 1] = "0"
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "torchvision.models:resnet18" and abs(m["params"]["fraction"] - 0.5) <= 0.01


@pytest.mark.parametrize("args, words", [
    (["--model", "vgg17"], "unknown model 'vgg17'"),
    (["--method", "magic"], "unknown method 'magic'"),
    (["--budget-macs", "1.5"], "in (0, 1]"),
    (["--budget-macs", "0.0005", "--epochs", "0"], "reaches ["),
    (["--checkpoint", "missing.pt"], "no checkpoint at missing.pt"),
    (["--dataset", "nope"], "unknown data set 'nope'"),
    (["--device", "cuda:0"], None),
])
def test_bad_inputs_give_one_line(tmp_path, capsys, args, words):
    import torch

    if args[0] == "--device":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU, so --device cuda:0 is not an error here")
        words = "no CUDA GPU"
    argv = ["run", "--out", str(tmp_path / "r"), *FAST]
    for flag, value in zip(args[::2], args[1::2]):  # later flags win in argparse
        argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("\n") == 1


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "compressor.cli", "run", "--model", "nope"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown model 'nope'" in result.stderr


def test_run_then_export_and_bench(tmp_path):
    out = tmp_path / "full"
    args = ["run", "--model", "conv4", "--out", str(out), "--export", "onnx", "--bench", "--backends", "eager",
            "--batch-sizes", "1,2", "--min-iters", "3", "--min-seconds", "0", "--device", "cpu", *FAST]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["export"]["onnx"]["verification"]["top1_agreement"] >= 0.99
    bench = json.loads((out / "bench.json").read_text())
    assert {(r["model"], r["batch"]) for r in bench["rows"]} == {(m, b) for m in ("dense", "pruned") for b in (1, 2)}
    assert bench["command"][:2] == ["compress", "run"]


def test_export_trt_without_tensorrt_stops_before_training(tmp_path, capsys):
    from compressor.export import tensorrt

    if tensorrt.status()[0]:
        pytest.skip("TensorRT is usable here, so it is not missing")
    out = tmp_path / "r"
    assert main(["run", "--dataset", "synthetic", "--export", "onnx,trt", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install tensorrt" in err and "Traceback" not in err and not out.exists()


def test_criterion_options_reach_the_criterion(tmp_path):
    out = tmp_path / "psap"
    assert main(["run", "--model", "conv4", "--method", "psap", "--steps", "2", "--psap-threshold", "0.3",
                 "--protect-z", "1.5", "--budget-params", "0.5", "--out", str(out), *FAST]) == 0
    psap = json.loads((out / "metrics.json").read_text())["criterion"]["psap"]
    assert psap["threshold"] == 0.3 and psap["protect_z"] == 1.5
    assert psap["train"]["batch_size"] == 64 and len(psap["steps"]) == 2


@pytest.mark.parametrize("method", ["l1", "sensitivity", "smoea"])
def test_from_scratch_is_refused_where_the_criterion_does_not_train_from_random(tmp_path, capsys, method):
    assert main(["run", "--method", method, "--from-scratch", "--dataset", "synthetic",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--from-scratch needs a criterion" in err and "psap" in err and not (tmp_path / "r").exists()


CARD = ["--model", "vgg16", "--dataset", "cifar10", "--method", "ffr", "--budget-macs", "0.25", "--export", "onnx,trt",
        "--bench"]


@pytest.mark.parametrize("card", [["--method", "ffr", "--export", "trt"], CARD], ids=["short", "card"])
def test_options_without_a_command_mean_run(card):
    from compressor.cli import build_parser, with_command

    parser = build_parser()
    implicit, explicit = parser.parse_args(with_command(card)), parser.parse_args(["run", *card])
    assert implicit.command == "run" and vars(implicit) == vars(explicit)


def test_the_card_form_runs_a_job(tmp_path):
    out = tmp_path / "card"
    assert main(["--dataset", "synthetic", "--epochs", "0", "--finetune-epochs", "0", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete" and m["command"][:2] == ["compress", "--dataset"]  # as typed


def test_the_card_form_without_tensorrt_stops_before_training(tmp_path, capsys):
    from compressor.export import tensorrt

    if tensorrt.status()[0]:
        pytest.skip("TensorRT is usable here, so it is not missing")
    out = tmp_path / "r"
    assert main(["--method", "ffr", "--export", "trt", "--dataset", "synthetic", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install tensorrt" in err and "Traceback" not in err and not out.exists()


def test_bare_compress_names_the_commands(capsys):
    assert main([]) == 0  # asking for nothing is not a mistake: a short help on stdout
    shown = capsys.readouterr().out
    for command in ("run", "export", "bench", "analyze", "inspect"):
        assert f"\n    {command} " in shown
    assert "compress run " in shown and "COMMAND --help" in shown and "mean `run`" in shown
    with pytest.raises(SystemExit) as exited:  # --help still works
        main(["--help"])
    assert exited.value.code == 0 and "COMMAND" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["run", "export", "bench"])
def test_export_and_bench_flags_are_their_configs_defaults(command):
    """The flags are generated from ExportConfig / BenchConfig: unset, they give the API's defaults."""
    from compressor.bench.config import BenchConfig
    from compressor.cli import build_parser
    from compressor.export.config import ExportConfig

    args = build_parser().parse_args([command] + ([] if command == "run" else ["somewhere"]))
    if command in ("run", "export"):
        assert ExportConfig.from_args(args) == ExportConfig()
        assert {f.metadata["option"]["flag"] for f in ExportConfig.options()} >= {"--trt-precision", "--no-accuracy",
                                                                                 "--onnx-simplify", "--opset"}
    if command in ("run", "bench"):
        assert BenchConfig.from_args(args) == BenchConfig()
    given = build_parser().parse_args(["run", "--trt-precision", "int8", "--no-accuracy", "--onnx-simplify",
                                       "--precision", "fp32", "--batch-sizes", "2,4", "--rounds", "3"])
    export_config, bench_config = ExportConfig.from_args(given), BenchConfig.from_args(given)
    assert (export_config.precision, export_config.accuracy, export_config.simplify) == ("int8", False, True)
    assert (bench_config.precision, bench_config.batch_sizes, bench_config.rounds) == (("fp32",), (2, 4), 3)


def test_run_refuses_an_export_combination_before_training(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "--dataset", "synthetic", "--export", "onnx-int8", "--onnx-fp16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "drop --onnx-fp16" in err and err.count("\n") == 1 and not out.exists()
