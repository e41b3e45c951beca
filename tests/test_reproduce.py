"""`toolkit reproduce`: the plan, real tiny runs on synthetic data, the report, resume.

The expected flags and reference figures below are typed from SEED_EXPERIMENTS.md, not read
from toolkit.experiments, so a wrong table entry fails here.
"""

from __future__ import annotations

import csv
import json
import shlex
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

import toolkit.reproduce.runner
import toolkit.seams
import toolkit.train.trainer
from tests.synthetic import write_split_files
from toolkit.atomic import atomic_write_json
from toolkit.cli import app
from toolkit.data import DataOptions
from toolkit.errors import ToolkitError
from toolkit.export.bench import Timing
from toolkit.reproduce import build_plan, plan_lines, reproduce, run_state
from toolkit.reproduce.plan import check_same_config
from toolkit.reproduce.report import first_reaching
from toolkit.run.folder import METRIC_COLUMNS, read_metrics, write_csv_rows
from toolkit.run.state import best_row
from toolkit.train.recipes import DEFAULT
from toolkit.train.trainer import RunResult

runner = CliRunner()
FAST = Timing(warmup=1, min_runs=2, max_runs=2, budget_s=0.0)
PNG = b"\x89PNG\r\n\x1a\n"

# experiment -> (model, flags after --epochs N) as SEED_EXPERIMENTS.md and issue 6 name them
CIFAR10 = {
    "mlp": ("mlp", ""),
    "net": ("net", ""),
    "net2": ("net2", ""),
    "resnet10": ("resnet10", ""),
    "resnet10-l2": ("resnet10", "--l2 0.001"),
    "net-dropout": ("net", "--dropout 0.3 --width 32"),
    "net-bn": ("net", "--batch-norm --width 32"),
    "resnet10-dropout": ("resnet10", "--dropout 0.3"),
    "resnet10-bn": ("resnet10", "--batch-norm"),
    "speedrun": ("speedrun", ""),  # beyond the seeds: the default recipe only
}
DEFAULT_ONLY = {"speedrun"}
STL10 = {
    "lenet5": ("lenet5", ""),
    "lenet5-l2": ("lenet5", "--l2 0.01"),
    "lenet5-bn": ("lenet5", "--batch-norm"),
}
REPORTED = {"net": "60 %", "resnet10-l2": "68 %", "net-bn": "62 %", "lenet5-l2": "48.61 %"}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def expected_command(dataset, name, table, recipe, epochs, source_flag, source, out):
    """Only what differs from the defaults: cifar10, the default recipe, its own epochs."""
    model, flags = table[name]
    parts = [f"toolkit train {model}"]
    parts += [f"--dataset {dataset}"] if dataset != "cifar10" else []
    parts += [f"{source_flag} {source}"]
    parts += [f"--recipe {recipe}"] if recipe != "default" else []
    parts += [f"--epochs {epochs}"]
    parts += [flags] if flags else []
    parts += [f"--run-dir {out}/runs/{name}-{recipe}"]
    return " ".join(parts)


# --- the plan --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset, table, source_flag",
    [("cifar10", CIFAR10, "--data-dir"), ("stl10", STL10, "--splits")],
)
def test_dry_run_prints_every_experiment_under_both_recipes(tmp_path, dataset, table, source_flag):
    source, out = tmp_path / "data", tmp_path / "report"
    result = invoke(
        "reproduce", "--dataset", dataset, "--epochs", 3, source_flag, source, "--out", out,
        "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    commands = [line for line in lines if line.startswith("toolkit train")]
    expected = [
        expected_command(dataset, name, table, recipe, 3, source_flag, source, out)
        for recipe in ("default", "seed")
        for name in table
        if recipe == "default" or name not in DEFAULT_ONLY
    ]
    assert commands == expected
    for name, figure in REPORTED.items():
        if name in table:
            comment = next(
                line for line in lines if line.startswith("# ") and f" {name}-seed:" in line
            )
            assert f"reference: {figure}" in comment
    if dataset == "cifar10":  # the row beyond the seeds names where its figure is from
        comment = next(line for line in lines if " speedrun-default:" in line)
        assert "reference: 94 % (airbench94's published figure" in comment
    assert not out.exists()  # a dry run trains and writes nothing


def test_recipes_differ_and_epochs_override_both(tmp_path):
    data = DataOptions(data_dir=str(tmp_path))
    plan = {r.name: r.config for r in build_plan("cifar10", "both", tmp_path, data, epochs=4)}
    assert {c.epochs for c in plan.values()} == {4}
    seed, default = plan["resnet10-seed"], plan["resnet10-default"]
    assert (seed.optimizer, seed.lr, seed.momentum, seed.batch_size) == ("sgd", 0.003, 0.0, 64)
    assert (seed.augment, seed.schedule, seed.l2) == (False, "none", 0.0)
    assert default.augment and (default.lr, default.batch_size) != (0.003, 64)
    assert plan["resnet10-l2-seed"].l2 == 0.001 == plan["resnet10-l2-default"].l2
    assert plan["net-dropout-seed"].model_options == {"width": 32, "dropout": 0.3}
    # Without --epochs each recipe keeps its own budget: the reference's 100 for seed lenet5.
    own = {r.name: r.config.epochs for r in build_plan("stl10", "both", tmp_path)}
    assert own["lenet5-seed"] == 100 and own["lenet5-default"] == DEFAULT["lenet5"]["epochs"]
    stl = {r.name: r.config for r in build_plan("stl10", "seed", tmp_path, only=["lenet5-l2"])}
    assert list(stl) == ["lenet5-l2-seed"]
    assert (stl["lenet5-l2-seed"].optimizer, stl["lenet5-l2-seed"].l2) == ("adam", 0.01)


@pytest.mark.parametrize("dataset", ["cifar10", "stl10"])
def test_plan_commands_build_exactly_the_planned_config(tmp_path, monkeypatch, dataset):
    """Each printed command, run through `toolkit train`, asks fit for the planned config."""
    data = DataOptions(
        splits=str(tmp_path / "s"), data_root=str(tmp_path / "r"), image_size=48, bad_files="skip"
    )
    plan = build_plan(dataset, "both", tmp_path / "out", data, epochs=2, device="cpu")
    asked = []

    def fake_fit(config, run_dir=None, **kwargs):
        asked.append((config, run_dir))
        return RunResult(Path(run_dir), 0.5, 1, 2, 1.0, 10, 10)

    monkeypatch.setattr(toolkit.train.trainer, "fit", fake_fit)
    for run in plan:
        result = invoke(*shlex.split(run.command())[1:])
        assert result.exit_code == 0, result.output
    assert asked == [(run.config, run.run_dir) for run in plan]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'; choose one of: cifar10, stl10"),
        (["--recipe", "modern"], "unknown recipe 'modern'; choose one of: seed, default, both"),
        (["--only", "resnet50"], "unknown cifar10 experiment(s) resnet50; choose from: mlp"),
        (["--dataset", "stl10", "--only", "net"], "unknown stl10 experiment(s) net"),
        (["--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_bad_input_is_one_red_line_and_exit_2(args, message):
    result = invoke("reproduce", "--dry-run", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


# --- run state -------------------------------------------------------------------------------


def test_best_epoch_and_time_to_reference_are_read_from_the_history():
    history = [
        {"epoch": 1, "val_acc": 0.40, "seconds": 10.0},
        {"epoch": 2, "val_acc": 0.65, "seconds": 12.0},
        {"epoch": 3, "val_acc": 0.65, "seconds": 11.0},
        {"epoch": 4, "val_acc": 0.70, "seconds": 9.0},
    ]
    assert best_row(history)["epoch"] == 4
    assert best_row(history[:3])["epoch"] == 2  # a tie keeps the first, as fit's best.pt does
    assert first_reaching(history, 0.60) == (2, 22.0)
    assert first_reaching(history, 0.70) == (4, 42.0)
    assert first_reaching(history, 0.71) is None
    assert first_reaching(history, None) is None


def write_run_state(run, val_accs, fingerprint="f" * 40) -> None:
    """metrics.csv with these val accuracies and the config.json fields run_state reads."""
    rows = [[e, 1.0, 0.5, 1.0, acc, 0.01, 1.0, 100.0] for e, acc in enumerate(val_accs, 1)]
    write_csv_rows(run.run_dir / "metrics.csv", METRIC_COLUMNS, rows)
    atomic_write_json(run.run_dir / "config.json", {"dataset_info": {"fingerprint": fingerprint}})


def evaluation_of(epoch, fingerprint="f" * 40) -> dict:
    return {"split": "test", "checkpoint_epoch": epoch, "dataset": {"fingerprint": fingerprint}}


def export_of(epoch, fingerprint="f" * 40) -> dict:
    return {"checkpoint": {"epoch": epoch, "fingerprint": fingerprint}}


def test_a_stale_evaluation_or_export_counts_as_missing(tmp_path):
    (run,) = build_plan("cifar10", "seed", tmp_path, epochs=2, only=["net"])
    write_run_state(run, [0.3, 0.4])
    assert run_state(run).describe() == "trained; to evaluate and export"
    atomic_write_json(run.run_dir / "eval" / "metrics.json", evaluation_of(1))
    atomic_write_json(run.run_dir / "export" / "export-report.json", export_of(2))
    state = run_state(run)
    assert (state.trained, state.evaluated, state.exported) == (True, False, True)
    assert state.describe() == "trained; to evaluate"
    atomic_write_json(run.run_dir / "eval" / "metrics.json", evaluation_of(2))
    assert run_state(run).finished
    # Of the same epoch but of other data (the files changed and the run was redone).
    atomic_write_json(run.run_dir / "eval" / "metrics.json", evaluation_of(2, "0" * 40))
    atomic_write_json(run.run_dir / "export" / "export-report.json", export_of(2, "0" * 40))
    state = run_state(run)
    assert (state.evaluated, state.exported) == (False, False)


def test_a_run_stuck_at_zero_val_accuracy_is_finished_like_any_other(tmp_path):
    """fit writes best.pt at epoch 1 when val accuracy never rises; reproduce must read the
    same epoch from metrics.csv, or it re-evaluates and re-exports that run forever."""
    (run,) = build_plan("cifar10", "seed", tmp_path, epochs=2, only=["net"])
    write_run_state(run, [0.0, 0.0])
    atomic_write_json(run.run_dir / "eval" / "metrics.json", evaluation_of(1))
    atomic_write_json(run.run_dir / "export" / "export-report.json", export_of(1))
    assert run_state(run).best_epoch == 1 and run_state(run).finished


# --- a real tiny reproduce run ----------------------------------------------------------------


CIFAR_RUNS = ["net-default", "net-seed"]


@pytest.fixture(scope="module")
def cifar_report(tmp_path_factory, cifar_folder):
    """`toolkit reproduce` through the CLI: net under both recipes, 1 epoch each."""
    root = tmp_path_factory.mktemp("reproduce")
    args = ["reproduce", "--data-dir", cifar_folder, "--data-root", root / "data", "--epochs", 1]
    args += ["--only", "net", "--device", "cpu", "--out", root / "out"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return root, result.output, args


def read_results(out: Path) -> dict[str, dict]:
    with open(out / "results.csv", newline="") as f:
        return {Path(r["run"]).name: r for r in csv.DictReader(f)}


def test_reproduce_writes_normal_run_folders_and_a_complete_report(cifar_report):
    root, output, _ = cifar_report
    out = root / "out"
    results = read_results(out)
    assert sorted(results) == sorted(CIFAR_RUNS)
    report = (out / "report.md").read_text()
    for name in CIFAR_RUNS:
        run, row = out / "runs" / name, results[name]
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        export = json.loads((run / "export" / "export-report.json").read_text())
        history = read_metrics(run)
        assert metrics["split"] == "test" and float(row["test_acc"]) == metrics["accuracy"]
        assert int(row["epochs"]) == len(history) == 1
        assert float(row["train_seconds"]) == pytest.approx(sum(r["seconds"] for r in history))
        assert float(row["best_val_acc"]) == max(r["val_acc"] for r in history)
        assert int(row["onnx_bytes"]) == (run / "export" / "model.onnx").stat().st_size
        bs1 = [
            r["p50_ms"]
            for r in export["latency"]
            if (r["format"], r["runtime"], r["batch"]) == ("onnx fp32", "ORT CPU", 1)
        ]
        assert float(row["onnx_bs1_ms"]) == pytest.approx(bs1[0])
        assert f"### net ({row['recipe']})" in report
        assert (out / "failures" / f"{name}.png").read_bytes().startswith(PNG)
    assert {r["params"] for r in results.values()} == {"18354"}
    assert {r["reference_acc"] for r in results.values()} == {"0.6"}
    amp = json.loads((out / "runs" / CIFAR_RUNS[0] / "config.json").read_text())["engine"]["amp"]
    precision = "fp32" if amp == "off" else amp  # what --amp auto chose on this CPU
    assert f"Hardware: runs trained on **cpu, {precision}**;" in report
    for png in ("tradeoff.png", "val_curves.png", "confusion_matrices.png"):
        assert (out / png).read_bytes().startswith(PNG)
        assert f"![]({png})" in report
    for section in (
        "## Which split each number is on",
        "## Time to the reference's accuracy",
        "**Over-fitting**",
        "**Against the reference**",
    ):
        assert section in report
    assert "Not finished" not in report
    assert "reproduce results" in output and "report:" in output


def test_a_second_call_skips_finished_runs(cifar_report, monkeypatch):
    root, _, args = cifar_report

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was trained, evaluated or exported again")

    for step in ("fit", "resume", "evaluate_run", "export_run"):
        monkeypatch.setattr(toolkit.reproduce.runner, step, must_not_run)
    (root / "out" / "report.md").unlink()
    dry = invoke(*args, "--dry-run")
    assert dry.exit_code == 0 and dry.output.count("(finished)") == 2, dry.output
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert (root / "out" / "report.md").is_file()  # regenerated from the run folders
    assert sorted(read_results(root / "out")) == sorted(CIFAR_RUNS)


def test_a_run_trained_with_other_options_is_refused(cifar_report, monkeypatch):
    root, _, args = cifar_report
    for step in ("fit", "resume"):
        monkeypatch.setattr(toolkit.reproduce.runner, step, lambda *a, **k: pytest.fail("trained"))
    changed = [("2" if a == 1 else a) for a in args]  # --epochs 2 instead of 1
    dry = invoke(*changed, "--dry-run")
    assert dry.exit_code == 0 and dry.output.count("(refused: ") == 2, dry.output
    result = invoke(*changed)
    assert result.exit_code == 2, result.output
    assert "was trained with other options (epochs differ)" in result.output


def test_stl10_split_files_end_to_end_with_an_interrupted_run_resumed(tmp_path, monkeypatch):
    splits = write_split_files(tmp_path / "stl", per_class={"train": 12, "val": 4, "test": 4})
    data = DataOptions(splits=str(splits), data_root=str(tmp_path / "data"))
    out = tmp_path / "out"
    kwargs = dict(epochs=2, device="cpu", only=["lenet5", "lenet5-l2"], timing=FAST)
    # lenet5: epochs 1-2, then Ctrl-C at the start of lenet5-l2's epoch 2
    calls = []

    def count_then_interrupt(epoch):
        calls.append(epoch)
        if len(calls) == 4:
            raise KeyboardInterrupt

    with toolkit.seams.EPOCH_START.installed(count_then_interrupt):
        first = reproduce("stl10", "default", out, data, **kwargs)
    assert (first.trained, first.interrupted) == (["lenet5-default"], "lenet5-l2-default")
    assert list(read_results(out)) == ["lenet5-default"]
    assert "lenet5-l2-default: interrupted at 1/2 epochs" in (out / "report.md").read_text()

    resumed_runs, real_resume = [], toolkit.reproduce.runner.resume

    def spy_resume(run_dir, **kw):
        resumed_runs.append(run_dir)
        return real_resume(run_dir, **kw)

    monkeypatch.setattr(toolkit.reproduce.runner, "resume", spy_resume)
    second = reproduce("stl10", "default", out, data, **kwargs)
    assert (second.skipped, second.resumed, second.interrupted) == (
        ["lenet5-default"],
        ["lenet5-l2-default"],
        None,
    )
    assert resumed_runs == [out / "runs" / "lenet5-l2-default"]  # continued, not restarted
    resumed = read_metrics(out / "runs" / "lenet5-l2-default")
    assert [r["epoch"] for r in resumed] == [1, 2]
    results = read_results(out)
    assert [results[n]["reference_acc"] for n in results] == ["0.4833", "0.4861"]
    report = (out / "report.md").read_text()
    assert "Not finished" not in report and "lenet5 --l2 0.01 vs lenet5 (default)" in report
    config = json.loads((out / "runs" / "lenet5-default" / "config.json").read_text())
    assert config["val_is_carved"] is False  # val.txt exists: no carve from train


def test_plan_lines_show_the_state_of_each_run(tmp_path):
    plan = build_plan("stl10", "seed", tmp_path, epochs=2, only=["lenet5"])
    lines = plan_lines(plan)
    assert lines[0].startswith("# [1/1] lenet5-seed: lenet5, seed recipe, 2 epochs")
    assert lines[0].endswith("(new)") and lines[1].startswith("toolkit train lenet5 ")


def test_a_run_folder_from_before_a_data_option_existed_still_matches(tmp_path):
    """config.json files written before `bad_files` existed mean its default, not a change."""
    (run,) = build_plan("cifar10", "seed", tmp_path, epochs=1, only=["net"])
    stored = asdict(run.config)
    del stored["data"]["bad_files"]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.json").write_text(json.dumps(stored))
    check_same_config(run)  # no error
    stored["data"]["image_size"] = 48
    (run.run_dir / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ToolkitError, match=r"other options \(data differ\)"):
        check_same_config(run)
