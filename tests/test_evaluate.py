"""Evaluation and comparison: the maths on hand-made cases, then the real run-folder outputs."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.data import DataOptions, Split, load_data
from toolkit.errors import ToolkitError
from toolkit.evaluate import compare_runs, compute_metrics, evaluate_run, select_failures
from toolkit.evaluate.calibrators import Calibrator
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import read_json

EVAL_FILES = (
    "metrics.json",
    "classification_report.txt",
    "classification_report.json",
    "confusion_matrix.csv",
    "confusion_matrix.png",
    "per_class.csv",
    "failures.json",
    "failures.png",
    "curves.png",
)


# --- helpers ---------------------------------------------------------------------------------


def copy_run(run: Path, dest: Path) -> Path:
    """A private copy of the session's run, so a test may change it (or write eval/ into it)."""
    return Path(shutil.copytree(run, dest / run.name))


def run_data(run: Path):
    cfg = read_json(run / "config.json")
    return load_data(DataOptions(**cfg["data"]), seed=cfg["seed"])


def read_confusion(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        header, *body = list(csv.reader(f))
    assert [row[0] for row in body] == header[1:], "row labels must be the class names"
    return header[1:], np.array([[int(v) for v in row[1:]] for row in body])


def independent_probs(
    run: Path, images: torch.Tensor, calibrator: Calibrator = Calibrator()
) -> torch.Tensor:
    """Softmax of best.pt through NormalizedClassifier: a second path to the same predictions
    (with the run's `calibrator`: the calibrated probabilities)."""
    with torch.no_grad():
        logits = Checkpoint.load(run / "best.pt").build_classifier()(images.float() / 255)
        return calibrator.probs(logits)


def is_png(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and min(image.size) > 0


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the trained run, evaluated once on test (shared by the read-only tests)."""
    run = copy_run(trained_run, tmp_path_factory.mktemp("evaluated"))
    return run, evaluate_run(run, device="cpu")


# --- the maths on constructed cases ----------------------------------------------------------


def test_compute_metrics_on_a_hand_checked_case():
    classes = ["a", "b", "c", "d"]
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = 10.0 * torch.nn.functional.one_hot(preds, 4).float()

    m = compute_metrics(labels, logits, classes)

    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    expected_cm = [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m["confusion"].tolist() == expected_cm
    by_class = {r["class"]: r for r in m["per_class"]}
    assert by_class["a"]["accuracy"] == pytest.approx(2 / 3)
    assert by_class["b"]["accuracy"] == pytest.approx(1 / 2)
    assert by_class["c"]["accuracy"] == pytest.approx(1.0)
    assert by_class["d"]["accuracy"] is None  # no images of d: not 0 %
    assert [r["support"] for r in m["per_class"]] == [3, 2, 1, 0]
    assert [r["correct"] for r in m["per_class"]] == [2, 1, 1, 0]
    # Cross-entropy by hand: a right row costs log(1 + 3e^-10), a wrong one log(e^10 + 3).
    expected_loss = (4 * math.log(1 + 3 * math.exp(-10)) + 2 * math.log(math.exp(10) + 3)) / 6
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-5)
    # F1: a = 2·1·(2/3)/(1+2/3) = 0.8, b = 0.5, c = 2·0.5·1/1.5 = 2/3, d = 0 (no support).
    assert m["report"]["a"]["f1-score"] == pytest.approx(0.8)
    assert m["report"]["c"]["precision"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3 + 0) / 4)
    assert "b" in m["report_text"] and "0.5000" in m["report_text"]


def test_compute_metrics_rejects_an_empty_split():
    with pytest.raises(ToolkitError, match="empty"):
        compute_metrics(torch.tensor([], dtype=torch.long), torch.zeros(0, 3), ["a", "b", "c"])


def test_select_failures_takes_the_most_confident_mistakes_per_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    # Probabilities chosen by hand (log makes softmax return them exactly).
    probs = torch.tensor(
        [
            [0.9, 0.05, 0.05],  # 0: right
            [0.2, 0.7, 0.1],  # 0: wrong (b, 0.7)
            [0.1, 0.1, 0.8],  # 0: wrong (c, 0.8)  <- most confident
            [0.3, 0.6, 0.1],  # 0: wrong (b, 0.6)  <- third, dropped with k=2
            [0.55, 0.4, 0.05],  # 1: wrong (a, 0.55)
            [0.1, 0.8, 0.1],  # 1: right
            [0.1, 0.1, 0.8],  # 2: right
        ]
    )
    failures = select_failures(labels, probs.log(), k=2)
    assert [(f["index"], f["true"], f["predicted"]) for f in failures] == [
        (2, 0, 2),
        (1, 0, 1),
        (4, 1, 0),
    ]
    assert [f["confidence"] for f in failures] == pytest.approx([0.8, 0.7, 0.55])


# --- evaluate_run on a real (tiny) run -------------------------------------------------------


def test_evaluate_writes_every_file_and_the_numbers_agree(evaluated):
    run, summary = evaluated
    out = run / "eval"
    assert summary["eval_dir"] == str(out) and summary["split"] == "test"
    for name in EVAL_FILES:
        assert (out / name).is_file(), name
    for name in ("confusion_matrix.png", "failures.png", "curves.png"):
        assert is_png(out / name), name

    metrics = json.loads((out / "metrics.json").read_text())
    classes, cm = read_confusion(out / "confusion_matrix.csv")
    ckpt = Checkpoint.load(run / "best.pt")
    assert classes == ckpt.dataset["classes"]
    assert metrics["n"] == summary["n"] == cm.sum() == 100  # 10 test images x 10 classes
    assert cm.sum(axis=1).tolist() == [10] * 10  # rows are the true classes
    assert metrics["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert summary["accuracy"] == metrics["accuracy"]
    for i, name in enumerate(classes):
        assert metrics["per_class_accuracy"][name] == pytest.approx(cm[i, i] / cm[i].sum())
    assert metrics["accuracy"] > 0.5  # the synthetic classes are learnable: far above 10 %

    report = json.loads((out / "classification_report.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics["accuracy"])
    assert report["macro avg"]["f1-score"] == pytest.approx(metrics["macro_f1"])
    assert all(name in (out / "classification_report.txt").read_text() for name in classes)

    with open(out / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == classes
    assert [int(r["correct"]) for r in rows] == np.diag(cm).tolist()
    assert [int(r["support"]) for r in rows] == cm.sum(axis=1).tolist()
    train_counts = metrics["data"]["class_counts"]["train"]
    assert [int(r["train_images"]) for r in rows] == [train_counts[c] for c in classes]
    assert sum(train_counts.values()) == read_json(run / "config.json")["sizes"]["train"]
    assert metrics["data"]["split_is_carved"] is False  # the folder has test/
    assert metrics["top5_accuracy"] == summary["top5_accuracy"]
    assert metrics["accuracy"] <= metrics["top5_accuracy"] <= 1


def test_top5_accuracy_by_hand_and_none_with_five_classes_or_fewer():
    labels = torch.tensor([0, 1, 2, 3])
    # class 0 ranks 1st, class 1 ranks 5th, class 2 ranks 6th, class 3 ranks 2nd
    order = [[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 1, 0], [0, 1, 3, 4, 5, 2], [0, 3, 1, 2, 4, 5]]
    logits = torch.zeros(4, 6)
    for row, ranking in enumerate(order):
        for rank, c in enumerate(ranking):
            logits[row, c] = 10.0 - rank
    assert compute_metrics(labels, logits, list("abcdef"))["top5_accuracy"] == 0.75
    assert compute_metrics(labels, logits[:, :5], list("abcde"))["top5_accuracy"] is None


def test_predictions_match_the_exported_style_classifier(evaluated):
    """The accuracy in metrics.json is what best.pt + its own mean/std really give."""
    run, summary = evaluated
    test = run_data(run).test
    probs = independent_probs(run, test.images)
    expected = (probs.argmax(1) == test.labels).float().mean().item()
    assert summary["accuracy"] == pytest.approx(expected)


def test_evaluation_uses_best_pt_not_last_pt(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    ckpt = torch.load(run / "best.pt", weights_only=True)
    # Make best.pt predict "cat" for every image, and make last.pt unreadable: only an
    # evaluation of best.pt can succeed *and* put all 100 test images in the cat column.
    head = [k for k in ckpt["state_dict"] if k.endswith("weight")][-1]
    ckpt["state_dict"][head].zero_()
    bias = ckpt["state_dict"][head.replace("weight", "bias")]
    bias.zero_()
    bias[3] = 5.0
    torch.save(ckpt, run / "best.pt")
    (run / "last.pt").write_bytes(b"not a checkpoint")

    summary = evaluate_run(run, device="cpu")

    classes, cm = read_confusion(run / "eval" / "confusion_matrix.csv")
    assert cm[:, 3].tolist() == [10] * 10 and cm.sum() == cm[:, 3].sum()
    assert summary["accuracy"] == pytest.approx(0.1)
    metrics = read_json(run / "eval" / "metrics.json")
    assert metrics["checkpoint_epoch"] == ckpt["epoch"] == ckpt["best_epoch"]
    assert metrics["per_class_accuracy"]["cat"] == 1.0
    assert metrics["per_class_accuracy"]["dog"] == 0.0


def test_failure_gallery_holds_real_mistakes(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    data = run_data(run)
    # Shift every test label by one class: the model's (mostly right) answers become
    # confident mistakes, so every class has at least two failures to choose from.
    shifted = (data.test.labels + 1) % 10
    data = dataclasses.replace(data, test=Split(data.test.images, shifted))
    evaluate_run(run, device="cpu", data=data)

    out = run / "eval"
    failures = json.loads((out / "failures.json").read_text())
    classes = data.spec.classes
    # The gallery's confidences are the served, calibrated ones.
    calibration = json.loads((run / "calibration.json").read_text())
    probs = independent_probs(run, data.test.images, Calibrator.from_record(calibration))
    conf, preds = probs.max(1)
    assert len(failures) == 2 * 10
    for f in failures:
        i = f["index"]
        assert f["true"] == classes[shifted[i]] and f["predicted"] == classes[preds[i]]
        assert f["true"] != f["predicted"]
        assert f["confidence"] == pytest.approx(conf[i].item(), abs=1e-5)
        png = out / f["file"]
        assert f["file"] == f"failures/{i}.png" and is_png(png)
        with Image.open(png) as image:  # the image saved is the split's image at that index
            assert np.array_equal(np.asarray(image), data.test.images[i].permute(1, 2, 0).numpy())
    for c, name in enumerate(classes):
        mine = [f for f in failures if f["true"] == name]
        wrong = [i for i in range(len(shifted)) if shifted[i] == c and preds[i] != c]
        best_two = sorted(wrong, key=lambda i: -conf[i].item())[:2]
        assert sorted(f["index"] for f in mine) == sorted(best_two), name
        assert mine[0]["confidence"] >= mine[1]["confidence"]
    assert sorted(p.name for p in (out / "failures").iterdir()) == sorted(
        Path(f["file"]).name for f in failures
    )


def test_stale_failure_images_are_removed(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    stale = run / "eval" / "failures" / "99999.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    evaluate_run(run, device="cpu")
    assert not stale.exists()


def test_val_split_writes_eval_val(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    summary = evaluate_run(run, split="val", device="cpu")
    out = run / "eval-val"
    assert summary["eval_dir"] == str(out) and not (run / "eval").exists()
    metrics = read_json(out / "metrics.json")
    cfg = read_json(run / "config.json")
    assert metrics["split"] == "val" and metrics["n"] == cfg["sizes"]["val"] == 30
    # The carve is the run's own: the best checkpoint's val accuracy is reproduced exactly.
    assert metrics["accuracy"] == pytest.approx(Checkpoint.load(run / "best.pt").best_val_acc)


def test_bad_inputs_raise_toolkit_errors(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    with pytest.raises(ToolkitError, match="unknown split 'train'"):
        evaluate_run(run, split="train", device="cpu")
    data = run_data(run)
    with pytest.raises(ToolkitError, match="not the data"):
        evaluate_run(run, device="cpu", data=dataclasses.replace(data, fingerprint="0" * 40))
    with pytest.raises(ToolkitError, match="image size differ"):
        evaluate_run(run, device="cpu", data=dataclasses.replace(data, image_size=64))
    with pytest.raises(ToolkitError, match="does not exist"):
        evaluate_run(tmp_path / "nowhere", device="cpu")
    (run / "best.pt").unlink()
    with pytest.raises(ToolkitError, match="best.pt' not found"):
        evaluate_run(run, device="cpu")
    assert not (run / "eval").exists()


# --- compare_runs ----------------------------------------------------------------------------


def test_compare_rows_and_files(evaluated, trained_run, tmp_path):
    run, summary = evaluated
    unevaluated = copy_run(trained_run, tmp_path / "copy")
    out = tmp_path / "cmp"
    rows = compare_runs([run, unevaluated], out_dir=out)

    with open(run / "metrics.csv", newline="") as f:
        history = list(csv.DictReader(f))
    first, second = rows
    assert first["model"] == "net" and first["params"] == 18_354  # the seed table's count
    assert first["epochs"] == 4 == len(history)
    assert first["train time (s)"] == pytest.approx(
        sum(float(r["seconds"]) for r in history), abs=0.01
    )
    assert first["best val acc"] == pytest.approx(max(float(r["val_acc"]) for r in history))
    assert first["checkpoint (KB)"] == pytest.approx(
        (run / "best.pt").stat().st_size / 1024, abs=0.1
    )
    assert first["test acc"] == pytest.approx(summary["accuracy"])
    assert second["test acc"] == ""  # never evaluated: no number is invented
    assert "width=16" in first["options"] and first["dataset"] == "cifar10 32px"

    md = (out / "comparison.md").read_text().splitlines()
    assert len(md) == 2 + 2 and md[0].startswith("| run | model |")
    assert md[2].endswith(f"| {summary['accuracy']:.2%} |") and md[3].endswith("| — |")
    assert md[2].count("|") == md[1].count("|") == 11  # 10 columns, none split by a stray |
    with open(out / "comparison.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["params"]) for r in table] == [18_354, 18_354]


def test_compare_ignores_a_stale_test_accuracy(evaluated, tmp_path):
    run = copy_run(evaluated[0], tmp_path)
    metrics = read_json(run / "eval" / "metrics.json")
    metrics["checkpoint_epoch"] += 1  # as if best.pt changed after the evaluation
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    assert compare_runs([run])[0]["test acc"] == ""


def test_compare_rejects_bad_run_folders(tmp_path):
    with pytest.raises(ToolkitError, match="at least one"):
        compare_runs([])
    with pytest.raises(ToolkitError, match="does not exist"):
        compare_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ToolkitError, match="best.pt' not found"):
        compare_runs([tmp_path / "empty"])


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_evaluate_and_compare(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert read_json(run / "eval" / "metrics.json")["split"] == "test"
    assert "accuracy" in result.output

    result = runner.invoke(app, ["compare", str(run), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp" / "comparison.md").is_file()
    assert (tmp_path / "cmp" / "comparison.csv").is_file()

    result = runner.invoke(app, ["evaluate", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
