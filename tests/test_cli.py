"""The CLI as a user types it: verbs, run folders, one red line and exit 2 on bad input."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tests.training import interrupt_at_epoch
from toolkit.cli import app
from toolkit.data import DataOptions
from toolkit.options import declared
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import read_metrics
from toolkit.train.config import ModelOptions, TrainConfig

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_the_command_freezes_its_objects_at_exit():
    # Spares the interpreter's last collections (about 1 s after a training run).
    script = "import atexit, gc, toolkit.cli; atexit._run_exitfuncs(); print(gc.get_freeze_count())"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 0


def test_models_lists_names_and_reference_parameter_counts():
    result = invoke("models")
    assert result.exit_code == 0
    for name in ("mlp", "net", "net2", "resnet10", "lenet5"):
        assert name in result.output
    assert "18,354" in result.output and "159,594" in result.output


def test_train_writes_a_run_folder_with_the_resolved_options(cifar_folder, tmp_path):
    run = tmp_path / "run"
    result = invoke(
        "train",
        "net",
        "--data-dir",
        cifar_folder,
        "--data-root",
        tmp_path,
        "--epochs",
        2,
        "--batch-size",
        32,
        "--width",
        32,
        "--dropout",
        0.3,
        "--l2",
        0.001,
        "--device",
        "cpu",
        "--run-dir",
        run,
    )
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["model_options"] == {"width": 32, "dropout": 0.3}
    assert (config["l2"], config["epochs"], config["batch_size"]) == (0.001, 2, 32)
    # A 2-epoch run of the default recipe trains without crop + flip (recipes.SHORT_RUN_EPOCHS).
    assert config["recipe"] == "default" and config["augment"] is False
    assert (run / "best.pt").is_file() and "best val acc" in result.output


def test_seed_recipe_through_the_cli(cifar_folder, tmp_path):
    run = tmp_path / "seed"
    result = invoke(
        "train",
        "lenet5",
        "--recipe",
        "seed",
        "--batch-norm",
        "--l2",
        0.01,
        "--epochs",
        1,
        "--data-dir",
        cifar_folder,
        "--data-root",
        tmp_path,
        "--device",
        "cpu",
        "--run-dir",
        run,
    )
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert (config["optimizer"], config["lr"], config["batch_size"]) == ("adam", 0.001, 128)
    assert (config["l2"], config["schedule"], config["augment"]) == (0.01, "step", False)
    assert config["model_options"] == {"batch_norm": True}


def test_resume_through_the_cli(cifar_folder, tmp_path):
    run = tmp_path / "run"
    args = ["net", "--data-dir", cifar_folder, "--data-root", tmp_path, "--epochs", 2]
    with interrupt_at_epoch(2):  # Ctrl-C as epoch 2 starts
        first = invoke("train", *args, "--device", "cpu", "--run-dir", run)
    assert first.exit_code == 130, first.output
    assert f"continue with: toolkit train --resume {run}" in first.output
    assert [r["epoch"] for r in read_metrics(run)] == [1]

    result = invoke("train", "--resume", run)
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    assert Checkpoint.load(run / "last.pt").epoch == 2


def test_train_has_a_flag_for_every_declared_option():
    """The flags are derived from the config fields: none is missing, none is extra."""
    output = invoke("train", "--help").output
    for cls in (DataOptions, TrainConfig, ModelOptions):
        for option in declared(cls):
            assert option.spelling in output, option.name


def test_serve_passes_its_arguments_to_the_server_command_line():
    result = invoke("serve", "--help")
    assert result.exit_code == 0, result.output
    assert "usage: toolkit serve" in result.output
    for flag in ("--artifacts", "--host", "--port", "--auth", "--max-upload-mb"):
        assert flag in result.output
    bad = invoke("serve", "--max-upload-mb", "0")
    assert bad.exit_code == 2 and "--max-upload-mb must be positive" in bad.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "resnet50"], "unknown model 'resnet50'; choose one of: mlp, net"),
        (["train", "net", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["train", "net", "--optimizer", "lbfgs"], "unknown optimizer 'lbfgs'"),
        (["train", "speedrun", "--micro-batch", "-1"], "--micro-batch must be zero"),
        (["train", "lenet5", "--width", "8"], "does not support --width"),
        (["train", "net", "--data-dir", "/nonexistent/data"], "does not exist"),
        (["train", "--resume", "/nonexistent/run"], "not found"),
        (
            ["train", "net", "--resume", "/some/run", "--epochs", "9", "--compile"],
            "--resume continues a run with its own options; drop MODEL, --epochs, --compile",
        ),
        (["evaluate", "/nonexistent/run"], "does not exist"),
        (["train"], "name a model"),
    ],
)
def test_bad_input_is_one_red_line_and_exit_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_package_needs_an_evaluated_and_exported_run(trained_run, tmp_path):
    result = invoke("package", trained_run, "--artifacts", tmp_path / "artifacts")
    assert result.exit_code == 2
    assert "toolkit evaluate" in result.output and "toolkit export" in result.output


def test_error_messages_are_printed_verbatim_not_as_markup():
    result = invoke("evaluate", "/nonexistent/[bold]run[/bold]")
    assert result.exit_code == 2
    assert "/nonexistent/[bold]run[/bold]" in result.output
