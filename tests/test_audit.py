"""`toolkit audit` on a tiny folder with planted problems: every finding type, every column of
issues.csv, the report, the clean split files round-tripping into training, --model with a
run and with a model.onnx, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.synthetic import write_image_folder
from toolkit.audit import AuditOptions, audit_data, find_audit
from toolkit.audit.findings import COLUMNS
from toolkit.cli import app
from toolkit.data import DataOptions
from toolkit.errors import ToolkitError
from toolkit.train.precision import cpu_has_native_bf16

CLASSES = ("apple", "bean", "cherry")
runner = CliRunner()


def photo_like(label: int, rng) -> np.ndarray:
    """A 32×32 picture with a layout of its own (smooth random shapes) in its class's colour:
    unlike stripes, two pictures of one class are not near-duplicates of each other."""
    shapes = Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).resize((32, 32), 3)
    hue = np.array([(label * 97 + 40) % 256, (label * 57 + 90) % 256, (label * 31 + 150) % 256])
    light = np.asarray(shapes, dtype=np.float32)[..., None] / 255
    noise = rng.normal(0, 6, (32, 32, 3))
    return np.clip(hue * (0.35 + 0.65 * light) + noise, 0, 255).astype(np.uint8)


def write_photos(root: Path, per_class: dict) -> None:
    rng = np.random.default_rng(7)
    for split, count in per_class.items():
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(photo_like(label, rng)).save(root / split / name / f"{i:04d}.png")


def plant(root: Path) -> dict:
    """Known problems in a synthetic folder; returns what was planted, by path."""
    write_photos(root, {"train": 40, "test": 12})
    train, test = root / "train", root / "test"
    shutil.copy(train / "apple" / "0000.png", test / "apple" / "copied.png")  # leak, exact
    shutil.copy(train / "bean" / "0001.png", train / "bean" / "again.png")  # within train
    with Image.open(train / "cherry" / "0002.png") as image:  # leak, re-encoded: near
        image.save(test / "cherry" / "reencoded.jpg", quality=90)
    flipped = []
    for i in range(3, 7):  # cherries filed as apples
        target = train / "apple" / f"cherry-{i}.png"
        shutil.move(train / "cherry" / f"{i:04d}.png", target)
        flipped.append(target.relative_to(root).as_posix())
    checker = (np.indices((32, 32)).sum(0) // 2 % 2 * 255).astype(np.uint8)
    Image.fromarray(np.stack([checker] * 3, axis=-1)).save(train / "bean" / "checker.png")
    mislabelled = []
    for i in range(2):  # test cherries filed as beans
        target = test / "bean" / f"cherry-{i}.png"
        shutil.move(test / "cherry" / f"{i:04d}.png", target)
        mislabelled.append(target.relative_to(root).as_posix())
    (test / "bean" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (32, 32), (128, 128, 128)).save(train / "bean" / "blank.png")
    speckle = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(speckle).save(train / "apple" / "tiny.png")
    return {
        "exact_cross": ("test/apple/copied.png", "train/apple/0000.png"),
        "exact_within": ("train/bean/again.png", "train/bean/0001.png"),
        "near_cross": ("test/cherry/reencoded.jpg", "train/cherry/0002.png"),
        "flipped": flipped,
        "mislabelled_test": mislabelled,
        "broken": "test/bean/broken.png",
        "blank": "train/bean/blank.png",
        "tiny": "train/apple/tiny.png",
        "outlier": "train/bean/checker.png",
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    truth = plant(root / "photos")
    return root / "photos", truth


FAST = dict(cv_model="net", folds=2, epochs=6, batch_size=32)


@pytest.fixture(scope="module")
def audited(planted, tmp_path_factory):
    root, truth = planted
    out = tmp_path_factory.mktemp("audit") / "a"
    splits = out.parent / "clean-splits"
    result = audit_data(
        DataOptions(data_dir=str(root), data_root=str(out.parent / "data-root")),
        AuditOptions(out=str(out), write_splits=str(splits), **FAST),
    )
    rows = list(csv.DictReader((out / "issues.csv").open(encoding="utf-8")))
    return result, rows, truth, splits


def _find(rows, issue, path):
    return [r for r in rows if r["issue"] == issue and r["path"] == path]


def test_issues_csv_has_every_column_and_the_planted_problems(audited):
    result, rows, truth, _ = audited
    assert tuple(rows[0]) == COLUMNS
    (exact,) = _find(rows, "exact_duplicate", truth["exact_cross"][0])
    assert exact["related_path"] == truth["exact_cross"][1]
    assert (exact["split"], exact["related_split"]) == ("test", "train")
    assert float(exact["score"]) == 1.0
    (within,) = _find(rows, "exact_duplicate", truth["exact_within"][0])
    assert within["related_path"] == truth["exact_within"][1]
    (near,) = _find(rows, "near_duplicate", truth["near_cross"][0])
    assert near["related_path"] == truth["near_cross"][1]
    assert float(near["score"]) >= AuditOptions().near_threshold
    # Precision: of the many pictures of one class, only the planted copies pair up.
    paired = {r["path"] for r in rows if r["issue"] in ("near_duplicate", "exact_duplicate")}
    planted = {truth[k][0] for k in ("exact_cross", "exact_within", "near_cross")}
    assert paired == planted
    (broken,) = _find(rows, "unreadable", truth["broken"])
    assert broken["split"] == "test"
    assert "blank" in _find(rows, "odd_image", truth["blank"])[0]["detail"]
    assert "tiny" in _find(rows, "odd_image", truth["tiny"])[0]["detail"]
    # The checkerboard is the farthest of all from its neighbours; whether it passes the
    # fence depends on the spread of a 160-image set (the rule is a robust z-score).
    outputs = np.load(result.folder / "outputs.npz")
    farthest = outputs["path"][outputs["outlier_score"].argmax()]
    assert farthest == truth["outlier"]
    outliers = {r["path"] for r in rows if r["issue"] == "outlier"}
    assert len(outliers) <= 3, outliers
    labels = {r["path"]: r for r in rows if r["issue"] == "label"}
    found = [labels[p] for p in truth["flipped"] if p in labels]
    assert len(found) >= 2, sorted(labels)
    assert all(r["given_label"] == "apple" and r["suggested_label"] == "cherry" for r in found)
    # Precision: clean images are rarely accused.
    assert len(labels) <= len(truth["flipped"]) + 3, sorted(labels)
    counts = result.summary["counts"]
    assert counts["test_images_leaking_from_train"] == 2
    assert counts["by_issue"]["unreadable"]["test"] == 1


def test_summary_records_settings_timing_and_fingerprint(audited):
    result, *_ = audited
    summary = json.loads((result.folder / "summary.json").read_text())
    assert summary["settings"]["folds"] == 2 and summary["settings"]["labels_checked"] == [
        "train",
        "val",
        "test",
    ]
    assert set(summary["seconds"]) >= {"load", "pixels", "models", "neighbours", "labels", "total"}
    assert summary["class_balance"]["train"]["apple"] == 40 + 4 + 1  # + the flipped, the tiny
    data_root = result.folder.parent / "data-root"
    assert find_audit(summary["fingerprint"], data_root).folder == result.folder
    assert find_audit("0" * 40, data_root) is None


def test_the_report_shows_pairs_and_labels_as_pictures(audited):
    result, *_ = audited
    page = (result.folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 10
    cross = page.index("Duplicates across splits")
    assert cross < page.index("Suspected label errors")
    assert "apple</span> → <b>cherry</b>" in page
    assert "broken.png" in page


def test_clean_splits_leave_out_the_flagged_images_and_train(audited, tmp_path):
    _, rows, truth, splits = audited
    test_lines = (splits / "test.txt").read_text().splitlines()
    assert not any("copied.png" in line or "reencoded" in line for line in test_lines)
    assert (splits / "classes.txt").read_text().split() == list(CLASSES)
    train_lines = (splits / "train.txt").read_text().splitlines()
    doubted = [r["path"] for r in rows if r["issue"] == "label" and r["split"] == "train"]
    assert doubted and not any(p.split("/")[-1] in line for p in doubted for line in train_lines)
    assert any("0000.png" in line for line in train_lines)  # the kept side of a pair stays
    done = runner.invoke(
        app,
        [
            "train",
            "net",
            "--splits",
            str(splits),
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--run-dir",
            str(tmp_path / "run"),
        ],
    )
    assert done.exit_code == 0, done.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["sizes"]["test"] == len(test_lines)
    assert config["test_is_carved"] is False


# --- a trained model instead of cross-validation, and what evaluation makes of the audit ----


@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory):
    """`net` trained on the planted folder (its own data root, where audits register)."""
    from toolkit.train import TrainConfig, fit

    root, _ = planted
    base = tmp_path_factory.mktemp("planted-run")
    config = TrainConfig.from_recipe(
        "net",
        DataOptions(data_dir=str(root), data_root=str(base / "data"), bad_files="skip"),
        epochs=8,
        batch_size=32,
        lr=0.05,
        augment=False,
        label_smoothing=0.0,
        device="cpu",
    )
    return fit(config, run_dir=base / "run").run_dir


def _audit_with(model: Path, root: Path, run: Path, out: Path):
    data_root = json.loads((run / "config.json").read_text())["data"]["data_root"]
    return audit_data(
        DataOptions(data_dir=str(root), data_root=data_root),
        AuditOptions(out=str(out), model=str(model)),
    )


def test_a_run_as_the_model_checks_val_and_test_labels_only(planted, planted_run, tmp_path):
    root, truth = planted
    result = _audit_with(planted_run, root, planted_run, tmp_path / "audit")
    assert result.summary["settings"]["labels_checked"] == ["val", "test"]
    labels = {f.path: f for f in result.findings if f.issue == "label"}
    assert all(f.split == "test" for f in labels.values())  # the source has no val/
    found = [labels[p] for p in truth["mislabelled_test"] if p in labels]
    assert found and {f.suggested_label for f in found} == {"cherry"}
    leaks = {f.path for f in result.findings if f.leaks_into_train}
    assert {truth["exact_cross"][0], truth["near_cross"][0]} <= leaks


def test_a_model_trained_on_other_resized_images_is_refused(planted, planted_run, tmp_path):
    root, _ = planted
    data_root = json.loads((planted_run / "config.json").read_text())["data"]["data_root"]
    data = DataOptions(data_dir=str(root), data_root=data_root, interpolation="bicubic")
    with pytest.raises(ToolkitError, match="--interpolation bilinear --crop-fraction 1; audit"):
        audit_data(data, AuditOptions(out=str(tmp_path / "audit"), model=str(planted_run)))


def test_evaluate_reports_both_accuracies_and_marks_doubtful_failures(
    planted, planted_run, tmp_path
):
    from toolkit.evaluate import evaluate_run

    root, truth = planted
    run = tmp_path / "run"
    shutil.copytree(planted_run, run)
    data_root = Path(json.loads((run / "config.json").read_text())["data"]["data_root"])
    shutil.rmtree(data_root / "audits", ignore_errors=True)  # another test's audit
    before = evaluate_run(run)["audit"]
    assert before["audit"] is None and "toolkit audit" in before["note"]
    _audit_with(run, root, run, tmp_path / "audit")
    summary = evaluate_run(run)
    audit = summary["audit"]
    assert audit["excluded"]["leaked_from_train"] == 2
    assert audit["excluded"]["label_doubted"] >= 1
    plain = audit["accuracy"]["plain"]
    assert plain["whole"] == pytest.approx(summary["accuracy"])
    # The doubted images are mislabelled, so the model is "wrong" on them: without them the
    # accuracy rises.
    assert plain["without_flagged"] > plain["whole"]
    failures = json.loads((run / "eval" / "failures.json").read_text())
    marked = [f for f in failures if "label_doubt" in f]
    assert marked and all(f["label_doubt"]["suggested"] == "cherry" for f in marked)
    done = runner.invoke(app, ["evaluate", str(run)])
    assert done.exit_code == 0, done.output
    assert "without flagged" in done.output
    # A new run of the same data hears about the leaked test images once, in its log.
    config = json.loads((run / "config.json").read_text())
    done = runner.invoke(
        app,
        [
            "train",
            "net",
            "--data-dir",
            config["data"]["data_dir"],
            "--data-root",
            str(data_root),
            "--bad-files",
            "skip",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--run-dir",
            str(tmp_path / "again"),
        ],
    )
    assert done.exit_code == 0, done.output
    log = (tmp_path / "again" / "train.log").read_text()
    assert log.count("2 test image(s) repeating a training image") == 1

    from serving.catalog import load_failures

    shutil.copytree(run / "eval" / "failures", tmp_path / "artifact" / "failures")
    (tmp_path / "artifact" / "failures.json").write_text(json.dumps(failures))
    loaded = load_failures(tmp_path / "artifact")
    captions = [f.caption for f in loaded]
    assert any("label likely wrong — the audit suggests cherry" in c for c in captions)
    # The model card states what the audit found, and that none was run when none was.
    from serving.page.card import audit_rows

    [(name, text)] = audit_rows({"audit": audit}, loaded)
    assert name == "data audit" and text.startswith("2 test images repeat a training image")
    assert f"{len(marked)} of the known failures are likely label errors" in text
    assert audit_rows({"audit": before}, []) == [("data audit", "none run on this data")]
    assert audit_rows({}, []) == []
    assert any("label likely wrong" not in c for c in captions) or len(marked) == len(failures)


def test_a_model_onnx_gives_the_runs_outputs(planted, planted_run, tmp_path):
    from toolkit.export import export_run

    root, _ = planted
    run = tmp_path / "run"
    shutil.copytree(planted_run, run)
    export_run(run)
    by_run = _audit_with(run, root, run, tmp_path / "a")
    by_onnx = _audit_with(run / "export" / "model.onnx", root, run, tmp_path / "b")
    a = np.load(by_run.folder / "outputs.npz")
    b = np.load(by_onnx.folder / "outputs.npz")
    # The checkpoint predicts under --amp auto: bf16 on a CPU that has it natively (its 8-bit
    # mantissa moved probabilities by up to 0.0016 here), fp32 elsewhere, as the graph does.
    atol = 5e-3 if cpu_has_native_bf16() else 1e-4
    np.testing.assert_allclose(a["probs"], b["probs"], atol=atol)
    np.testing.assert_allclose(a["neighbour_similarity"], b["neighbour_similarity"], atol=atol)
    labels = lambda r: {f.path for f in r.findings if f.issue == "label"}  # noqa: E731
    assert labels(by_run) == labels(by_onnx)


def test_a_memory_mapped_source_gives_the_same_findings(planted, planted_run, tmp_path):
    root, _ = planted
    results = []
    for name, memory_gb in (("in-ram", None), ("mapped", 1e-6)):
        data = DataOptions(data_dir=str(root), data_root=str(tmp_path / name), memory_gb=memory_gb)
        options = AuditOptions(out=str(tmp_path / f"audit-{name}"), model=str(planted_run))
        results.append((audit_data(data, options).folder / "issues.csv").read_text())
    assert any((tmp_path / "mapped").rglob("*.npy"))
    assert results[0] == results[1]


def test_the_python_api_audits_with_the_clis_options(tmp_path):
    from toolkit.api import audit

    write_photos(tmp_path / "data", {"train": 8, "test": 4})
    result = audit(
        tmp_path / "data", out=tmp_path / "out", data_root=str(tmp_path / "root"), **FAST
    )
    assert (result.folder / "report.html").is_file()
    assert result.summary["settings"]["folds"] == FAST["folds"]
    assert result.summary["counts"]["images"] == {"train": 24, "val": 0, "test": 12}


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-folder", "does not exist"),
        ("one-class", "a classifier needs at least 2"),
        ("garbage-model", "cannot use --model"),
        ("missing-model", "neither a run folder nor a model.onnx"),
        ("other-classes-model", "audit with a model of this data"),
        ("bad-folds", "--folds must be at least 2"),
        ("bad-threshold", "--near-threshold must be in (0, 1]"),
        ("out-not-empty", "is not empty; pass another --out"),
        ("official-write-splits", "audit a class-folder copy (--data-dir)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, message, tmp_path, trained_run):
    folder = tmp_path / "data"
    args = ["audit", str(folder), "--out", str(tmp_path / "out")]
    if case != "no-folder":
        write_image_folder(folder, classes=CLASSES, per_class={"train": 6})
    if case == "one-class":
        for name in CLASSES[1:]:
            shutil.rmtree(folder / "train" / name)
    if case == "garbage-model":
        (tmp_path / "model.onnx").write_bytes(b"not a model")
        args += ["--model", str(tmp_path / "model.onnx")]
    if case == "missing-model":
        args += ["--model", str(tmp_path / "nowhere")]
    if case == "other-classes-model":  # a CIFAR-10 run for a folder of three fruits
        args += ["--model", str(trained_run)]
    if case == "bad-folds":
        args += ["--folds", "1"]
    if case == "bad-threshold":
        args += ["--near-threshold", "1.5"]
    if case == "out-not-empty":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    if case == "official-write-splits":
        args = ["audit", "--dataset", "cifar10", "--no-download", "--write-splits", "x"]
    done = runner.invoke(app, args)
    assert done.exit_code == 2, done.output
    lines = done.output.strip().splitlines()
    assert lines[0].startswith("error:"), done.output
    assert message in " ".join(done.output.split()), done.output
    assert len(" ".join(lines)) < 400
