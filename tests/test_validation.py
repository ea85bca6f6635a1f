"""Bad numbers are refused in one line, by the CLI and the API alike, before any data is read.

Each case names the CLI flag and value, the API call that takes the same number, and the
words of the message. The CLI must return 2 with exactly ``compress: error: <API message>``
on stderr and no traceback; the run directory must not exist afterwards (the refusal came
before anything was prepared, read or trained).
"""
import math

import pytest

from compressor import criteria
from compressor.bench.run import bench
from compressor.cli import main
from compressor.errors import CompressorError
from compressor.export.run import export
from compressor.pipeline import RunConfig, run
from compressor.train import TrainConfig

NAN, INF = float("nan"), float("inf")

# (CLI flag, CLI value, API keyword, API value, words in the message)
RUN_CASES = [
    ("--epochs", "-1", "epochs", -1, "--epochs must be at least 0, got -1"),
    ("--finetune-epochs", "-2", "finetune_epochs", -2, "--finetune-epochs must be at least 0, got -2"),
    ("--lr", "-1", "lr", -1.0, "--lr must be greater than 0, got -1.0"),
    ("--lr", "0", "lr", 0.0, "--lr must be greater than 0"),
    ("--lr", "nan", "lr", NAN, "--lr must be a finite number, got nan"),
    ("--lr", "inf", "lr", INF, "--lr must be a finite number, got inf"),
    ("--finetune-lr", "-0.5", "finetune_lr", -0.5, "--finetune-lr must be greater than 0"),
    ("--finetune-lr", "nan", "finetune_lr", NAN, "--finetune-lr must be a finite number"),
    ("--batch-size", "0", "batch_size", 0, "--batch-size must be at least 1, got 0"),
    ("--batch-size", "-3", "batch_size", -3, "--batch-size must be at least 1"),
    ("--label-smoothing", "1", "label_smoothing", 1.0, "--label-smoothing must lie in [0, 1), got 1.0"),
    ("--label-smoothing", "-0.1", "label_smoothing", -0.1, "--label-smoothing must lie in [0, 1)"),
    ("--label-smoothing", "nan", "label_smoothing", NAN, "--label-smoothing must be a finite number"),
    ("--val-fraction", "1", "val_fraction", 1.0, "--val-fraction must lie in [0, 1), got 1.0"),
    ("--val-fraction", "-inf", "val_fraction", -INF, "--val-fraction must be a finite number"),
    ("--max-ratio", "1.5", "max_ratio", 1.5, "--max-ratio must lie in (0, 1), got 1.5"),
    ("--max-ratio", "0", "max_ratio", 0.0, "--max-ratio must lie in (0, 1)"),
    ("--max-ratio", "nan", "max_ratio", NAN, "--max-ratio must be a finite number"),
    ("--round-to", "0", "round_to", 0, "--round-to must be at least 1, got 0"),
    ("--seed", "-1", "seed", -1, "--seed must lie in [0, 4294967295], got -1"),
    ("--budget-macs", "nan", "budget", NAN, "--budget-macs must be a finite number"),
    ("--budget-macs", "inf", "budget", INF, "--budget-macs must be a finite number"),
    ("--budget-macs", "0", "budget", 0.0, "--budget-macs must lie in (0, 1], got 0.0"),
]

# criterion options: (CLI flag, CLI value, method, its config's field, API value, words); the CLI refuses them
# whatever the --method, since every criterion's config is built from the flags given
CRITERION_CASES = [
    ("--levels", "0.5,1.5", "sensitivity", "levels", "0.5,1.5", "--levels must lie in (0, 1), got 1.5"),
    ("--levels", "nan", "sensitivity", "levels", "nan", "--levels must be a finite number"),
    ("--levels", ",", "sensitivity", "levels", ",", "--levels needs at least one damage level"),
    ("--levels", "a,b", "sensitivity", "levels", "a,b", "--levels takes numbers separated by commas"),
    ("--steps", "0", "psap", "steps", 0, "--steps must be at least 1, got 0"),
    ("--step-epochs", "-1", "sensitivity", "step_epochs", -1, "--step-epochs must be at least 0"),
    ("--psap-threshold", "1", "psap", "threshold", 1.0, "--psap-threshold must lie in (0, 1)"),
    ("--psap-threshold", "nan", "psap", "threshold", NAN, "--psap-threshold must be a finite number"),
    ("--protect-z", "-1", "psap", "protect_z", -1.0, "--protect-z must be at least 0"),
    ("--protect-z", "inf", "psap", "protect_z", INF, "--protect-z must be a finite number"),
    ("--ffr-length", "nan", "ffr", "length", NAN, "--ffr-length must be a finite number"),
    ("--ffr-curvature", "-1", "ffr", "curvature", -1.0, "--ffr-curvature must be at least 0"),
    ("--ffr-warmup", "inf", "ffr", "warmup", INF, "--ffr-warmup must be a finite number"),
    ("--ffr-epochs", "-1", "ffr", "epochs", -1, "--ffr-epochs must be at least 0"),
    ("--ffr-floor", "2", "ffr", "floor", 2.0, "--ffr-floor must lie in [0, 1]"),
    ("--group-size", "0", "smoea", "group_size", 0, "--group-size must be at least 1"),
    ("--population", "2", "smoea", "population", 2, "--population must be at least 4"),
    ("--generations", "-1", "smoea", "generations", -1, "--generations must be at least 0"),
    ("--mutation", "1.5", "smoea", "mutation", 1.5, "--mutation must lie in [0, 1]"),
    ("--mutation", "nan", "smoea", "mutation", NAN, "--mutation must be a finite number"),
    ("--search-samples", "0", "smoea", "search_samples", 0, "--search-samples must be at least 1"),
]

# export options: refused by `compress run --export`, `compress export` and export() alike
EXPORT_CASES = [
    ("--opset", "16", "opset", 16, "--opset must lie in [17, "),
    ("--opset", "99", "opset", 99, "--opset must lie in [17, "),
    ("--min-batch", "0", "min_batch", 0, "--min-batch must be at least 1, got 0"),
    ("--opt-batch", "-1", "opt_batch", -1, "--opt-batch must be at least 1"),
    ("--max-batch", "8", "max_batch", 8, "need 1 <= min batch <= opt batch <= max batch, got 1, 32, 8"),
    ("--workspace-gib", "0", "workspace_gib", 0.0, "--workspace-gib must be greater than 0"),
    ("--workspace-gib", "nan", "workspace_gib", NAN, "--workspace-gib must be a finite number"),
    (None, None, "precision", "int4", "--trt-precision must be one of fp32, fp16, int8"),
    (None, None, "verify_batch", 0, "verify_batch must be at least 1"),
    (None, None, "min_agreement", 1.5, "min_agreement must lie in [0, 1]"),
]

# benchmark options: refused by `compress run --bench`, `compress bench` and bench() alike
BENCH_CASES = [
    ("--warmup", "-1", "warmup", -1, "--warmup must be at least 0, got -1"),
    ("--min-iters", "0", "min_iters", 0, "--min-iters must be at least 1"),
    ("--min-seconds", "-1", "min_seconds", -1.0, "--min-seconds must be at least 0"),
    ("--min-seconds", "nan", "min_seconds", NAN, "--min-seconds must be a finite number"),
    ("--batch-sizes", "0,4", "batch_sizes", "0,4", "--batch-sizes must be positive"),
    ("--batch-sizes", "1,x", "batch_sizes", "1,x", "--batch-sizes takes whole numbers"),
    (None, None, "batch_sizes", [1, 0], "--batch-sizes must be at least 1, got 0"),
]


def _cli(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("compress: error: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err[len("compress: error: "):].rstrip("\n")


def _api(call) -> str:
    with pytest.raises(CompressorError) as info:
        call()
    return str(info.value)


def _ids(cases):
    return [f"{c[2]}={c[3]!r}" for c in cases]


@pytest.mark.parametrize("flag, text, key, value, words", RUN_CASES, ids=_ids(RUN_CASES))
def test_run_refuses_bad_numbers_before_any_work(tmp_path, capsys, flag, text, key, value, words):
    out = tmp_path / "r"
    api = _api(lambda: run(RunConfig(dataset="synthetic", out=str(out), **{key: value})))
    assert words in api and not out.exists()
    cli = _cli(["run", "--dataset", "synthetic", "--out", str(out), f"{flag}={text}"], capsys)  # = for "-inf"
    assert cli == api and not out.exists()
    # the card's form (no command) says the same
    assert _cli(["--dataset", "synthetic", "--out", str(out), f"{flag}={text}"], capsys) == api


@pytest.mark.parametrize("flag, text, method, key, value, words", CRITERION_CASES,
                         ids=[f"{c[2]}.{c[3]}={c[4]!r}" for c in CRITERION_CASES])
def test_criterion_options_are_refused_by_their_config_and_the_cli(tmp_path, capsys, flag, text, method, key, value,
                                                                   words):
    out = tmp_path / "r"
    api = _api(lambda: run(RunConfig(dataset="synthetic", out=str(out), method=method,
                                     criterion=criteria.config_class(method)(**{key: value}))))
    assert words in api and not out.exists()
    for chosen in (method, "l1"):  # refused whichever method runs: the flag's own range is wrong
        assert _cli(["run", "--dataset", "synthetic", "--method", chosen, "--out", str(out), f"{flag}={text}"],
                    capsys) == api
        assert not out.exists()


@pytest.mark.parametrize("flag, text, key, value, words", EXPORT_CASES, ids=_ids(EXPORT_CASES))
def test_export_refuses_bad_numbers_before_any_work(tmp_path, capsys, flag, text, key, value, words):
    missing = tmp_path / "no-run"  # the numbers are checked before the source is even looked for
    api = _api(lambda: export(missing, "onnx", **{key: value}))
    assert words in api
    if flag is None:
        return  # an API-only option, or one argparse already limits to its choices
    assert _cli(["export", str(missing), flag, text], capsys) == api
    out = tmp_path / "r"  # and `run --export` refuses it before training
    assert _cli(["run", "--dataset", "synthetic", "--out", str(out), "--export", "onnx", flag, text], capsys) == api
    assert not out.exists()


@pytest.mark.parametrize("flag, text, key, value, words", BENCH_CASES, ids=_ids(BENCH_CASES))
def test_bench_refuses_bad_numbers_before_any_work(tmp_path, capsys, flag, text, key, value, words):
    missing = tmp_path / "no-run"
    api = _api(lambda: bench(missing, **{key: value}))
    assert words in api
    if flag is None:
        return
    assert _cli(["bench", str(missing), flag, text], capsys) == api
    out = tmp_path / "r"
    assert _cli(["run", "--dataset", "synthetic", "--out", str(out), "--bench", flag, text], capsys) == api
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["--levels", "1.5"], "--levels must lie in (0, 1), got 1.5"),
    (["--levels", "inf"], "--levels must be a finite number"),
    (["--val-fraction", "1"], "--val-fraction must lie in [0, 1), got 1.0"),
    (["--val-fraction", "nan"], "--val-fraction must be a finite number"),
    (["--seed", "-1"], "--seed must lie in [0, 4294967295], got -1"),
])
def test_analyze_refuses_bad_numbers_before_reading_the_checkpoint(tmp_path, capsys, argv, words):
    # the source does not exist: the number is refused before the checkpoint is looked for
    assert words in _cli(["analyze", str(tmp_path / "no-run"), *argv], capsys)


@pytest.mark.parametrize("kwargs, words", [
    ({"epochs": 1.5}, "--epochs must be a whole number, got 1.5"),
    ({"batch_size": "64"}, "--batch-size must be a whole number, got '64'"),
    ({"lr": "0.1"}, "--lr must be a number, got '0.1'"),
    ({"seed": True}, "--seed must be a whole number, got True"),
    ({"seed": 2**32}, "--seed must lie in [0, 4294967295]"),
    ({"budget_metric": "flops"}, "budget metric must be one of"),
    ({"schedule": "linear"}, "--schedule must be one of onecycle, cosine"),
    ({"method": "psap", "criterion": "threshold=0.4"}, "psap takes a PSAPConfig as its criterion settings"),
])
def test_run_config_refuses_wrong_types_and_names(tmp_path, kwargs, words):
    out = tmp_path / "r"
    assert words in _api(lambda: run(RunConfig(dataset="synthetic", out=str(out), **kwargs)))
    assert words in _api(lambda: RunConfig(**kwargs).validate()) and not out.exists()


@pytest.mark.parametrize("method, kwargs, words", [
    ("sensitivity", {"damage": "blur"}, "--damage must be one of zero, noise"),
    ("smoea", {"crossover": "three-point"}, "--crossover must be one of uniform, two-point"),
    ("sensitivity", {"levels": ["a"]}, "--levels must be a number, got 'a'"),
    ("smoea", {"population": 4.5}, "--population must be a whole number, got 4.5"),
])
def test_criterion_configs_refuse_wrong_types_and_names(method, kwargs, words):
    assert words in _api(lambda: criteria.config_class(method)(**kwargs))


def test_good_configs_pass_validation():
    assert RunConfig().validate() == RunConfig()
    RunConfig(epochs=0, finetune_epochs=0, lr=1e-4, label_smoothing=0.0, val_fraction=0.0, max_ratio=0.999,
              seed=2**32 - 1, budget=1.0).validate()
    from compressor.criteria.sensitivity import SensitivityConfig
    from compressor.criteria.smoea import SMOEAConfig

    assert SensitivityConfig(levels="0.1, 0.9").levels == (0.1, 0.9)
    RunConfig(method="smoea", criterion=SMOEAConfig(mutation=0.0)).validate()


@pytest.mark.parametrize("kwargs, words", [
    ({"epochs": -1}, "TrainConfig.epochs must be at least 0"),
    ({"epochs": 1, "lr": NAN}, "TrainConfig.lr must be a finite number"),
    ({"epochs": 1, "lr": 0.0}, "TrainConfig.lr must be greater than 0"),
    ({"epochs": 1, "batch_size": 0}, "TrainConfig.batch_size must be at least 1"),
    ({"epochs": 1, "weight_decay": -1e-4}, "TrainConfig.weight_decay must be at least 0"),
    ({"epochs": 1, "momentum": 0.0}, "TrainConfig.momentum must lie in (0, 1)"),
    ({"epochs": 1, "label_smoothing": INF}, "TrainConfig.label_smoothing must be a finite number"),
    ({"epochs": 1, "seed": -1}, "TrainConfig.seed must be at least 0"),
    ({"epochs": 1, "schedule": "step"}, "TrainConfig.schedule must be one of onecycle, cosine"),
])
def test_train_config_refuses_bad_numbers(kwargs, words):
    assert words in _api(lambda: TrainConfig(**kwargs))


def test_nan_is_never_in_range():
    from compressor.checks import number

    for low, high in ((0, 1), (0, None), (None, 1)):
        with pytest.raises(CompressorError, match="finite"):
            number("x", math.nan, low=low, high=high)
    assert number("x", 0.5, low=0, high=1) == 0.5 and number("n", None, integer=True, optional=True) is None
