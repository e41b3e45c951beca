"""`toolkit predict`: files, folders and globs in; one row per image out; bad files skipped with
their reason (exit 1); bad input one red line (exit 2); no torch; output written whole or not
at all.

Most tests use a tiny hand-built ONNX model with custom class names that classifies an image
by its mean colour, so every expected label is known without training anything.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from benchmarks.bad_uploads import png_claiming, truncated
from serving.classifier import OnnxClassifier
from serving.preprocess import PREPROCESSING
from serving.uploads import open_upload
from tests.conftest import real_cifar10
from toolkit import seams
from toolkit.cli import app
from toolkit.errors import ToolkitError
from toolkit.predict import accuracy, predict

ROOT = Path(__file__).resolve().parents[1]
# The colour model's classes: custom names, in the order of the RGB channels they follow.
CLASSES = ["rouge", "vert", "bleu"]
COLOURS = {"rouge": (210, 30, 20), "vert": (25, 200, 30), "bleu": (20, 40, 220)}

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["predict", *[str(a) for a in args]])


def colour_model(path: Path, classes=CLASSES, size=(16, 16)) -> Path:
    """A model.onnx as toolkit's export writes one (metadata included): probs = softmax of
    10 × each channel's mean, so a reddish image is classes[0], a greenish one classes[1]..."""
    import onnx
    from onnx import TensorProto, helper

    weights = helper.make_tensor("w", TensorProto.FLOAT, [3, 3], (10 * np.eye(3)).flatten())
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["mean", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "colour",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, *size])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3]),
        ],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {
        "classes": list(classes),
        "input_size": list(size),
        "dataset": "paints",
        "model": "colour",
        "preprocessing": PREPROCESSING,
    }
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_image(path: Path, colour, size=(20, 16), fmt=None) -> Path:
    noise = np.random.default_rng(len(str(path))).integers(-15, 15, (size[1], size[0], 3))
    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return colour_model(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture
def tree(tmp_path) -> Path:
    """tree/<class>/: two images per class (PNG, JPEG, BMP) and one nested a level deeper."""
    root = tmp_path / "tree"
    for name, colour in COLOURS.items():
        write_image(root / name / f"{name}-1.png", colour)
        write_image(root / name / f"{name}-2.jpg", colour)
    write_image(root / "bleu" / "more" / "bleu" / "deep.bmp", COLOURS["bleu"])
    (root / "rouge" / "notes.txt").write_text("not an image by name: left out of folders")
    (root / "vert" / ".DS_Store").write_bytes(b"\0\1")
    return root


# --- what is classified ----------------------------------------------------------------------


def test_folders_are_searched_recursively_and_rows_follow_the_colour(tree, model):
    rows = predict([tree], model, top_k=2, batch_size=2, workers=3)
    names = sorted(p.path.relative_to(tree).as_posix() for p in rows)
    assert names == [
        "bleu/bleu-1.png",
        "bleu/bleu-2.jpg",
        "bleu/more/bleu/deep.bmp",
        "rouge/rouge-1.png",
        "rouge/rouge-2.jpg",
        "vert/vert-1.png",
        "vert/vert-2.jpg",
    ]
    for p in rows:  # uneven batches over three threads: each row is still its own file's
        assert p.ok and p.top[0][0] == p.path.parent.name and p.top[0][1] > 0.9
        assert len(p.top) == 2 and p.top[0][1] >= p.top[1][1]
        assert p.true == p.path.parent.name and p.rank == 1


def test_files_and_globs_each_once(tree, model):
    png = tree / "rouge" / "rouge-1.png"
    rows = predict([png, str(tree / "*" / "*.jpg"), png], model)
    assert [p.path.name for p in rows] == ["rouge-1.png", "bleu-2.jpg", "rouge-2.jpg", "vert-2.jpg"]
    deep = predict([str(tree / "**" / "*.bmp")], model)
    assert [p.path.name for p in deep] == ["deep.bmp"]


@pytest.mark.parametrize(
    "sources, message",
    [
        (["missing-folder"], "'missing-folder' does not exist"),
        (["nothing-*.png"], "the pattern 'nothing-*.png' matches no image file"),
        ([], "name the images to classify"),
    ],
)
def test_sources_that_match_nothing_are_errors(tmp_path, model, monkeypatch, sources, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ToolkitError, match=re.escape(message)):
        predict(sources, model)
    result = invoke(*sources, "--model", model)
    assert result.exit_code == 2 and message in result.output


def test_a_folder_without_images_is_an_error(tmp_path, model):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.txt").write_text("hello")
    result = invoke(tmp_path / "docs", "--model", model)
    assert result.exit_code == 2 and "holds no image files" in result.output


# --- bad files -------------------------------------------------------------------------------


def test_bad_files_are_listed_with_their_reason_and_skipped(tree, model, tmp_path):
    bad = tree / "vert"
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("just some text, renamed\n")
    (bad / "cut.png").write_bytes(truncated("PNG"))
    (bad / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    os.mkfifo(bad / "pipe.png")  # a reader that opened it would wait forever
    out = tmp_path / "preds.csv"
    result = invoke(tree, "--model", model, "--out", out)
    assert result.exit_code == 1, result.output
    reasons = {
        "empty.png": "is empty (0 bytes)",
        "text.png": "is not a PNG, JPEG, GIF",
        "cut.png": "truncated",
        "bomb.png": "claims 10,000 megapixels",
        "pipe.png": "is not a regular file",
    }
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(reasons)
    for name, reason in reasons.items():
        assert any(name in line and reason in line for line in skipped), (name, skipped)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and not any(Path(r["path"]).name in reasons for r in rows)
    assert "7 images classified" in result.stderr and "5 skipped" in result.stderr


def test_exit_code_is_0_when_nothing_was_skipped(tree, model):
    result = invoke(tree, "--model", model)
    assert result.exit_code == 0, result.output


def test_the_python_function_returns_bad_files_with_their_error(tmp_path, model):
    write_image(tmp_path / "a.png", COLOURS["vert"])
    (tmp_path / "b.png").write_bytes(b"")
    good, bad = predict([tmp_path], model)
    assert good.ok and good.top[0][0] == "vert" and good.error is None
    assert not bad.ok and bad.top == () and "empty" in bad.error


# --- output ----------------------------------------------------------------------------------


def test_stdout_rows_and_stderr_summary(tree, model):
    result = invoke(tree / "bleu", "--model", model, "--top-k", 2)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all("(true: bleu)  bleu 9" in line for line in lines), lines
    assert all(len(line.split("%")) == 3 for line in lines)  # two labels, two percentages
    assert (
        "classified" not in result.stdout
        and "3 images classified by paints-colour" in result.stderr
    )


def test_csv_has_a_header_and_k_labels_capped_at_the_class_count(tree, model, tmp_path):
    out = tmp_path / "preds.csv"
    result = invoke(tree / "rouge", "--model", model, "--top-k", 10, "--out", out)
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "path",
        "true",
        "label_1",
        "prob_1",
        "label_2",
        "prob_2",
        "label_3",
        "prob_3",
    ]
    assert len(rows) == 3 and {r[1] for r in rows[1:]} == {"rouge"} and rows[1][2] == "rouge"
    probabilities = [float(x) for x in rows[1][3::2]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
    assert result.stdout == ""  # the rows went to the file


def test_jsonl_without_true_labels_outside_a_class_tree(tmp_path, model):
    write_image(tmp_path / "misc" / "a.png", COLOURS["bleu"])
    write_image(tmp_path / "misc" / "b.png", COLOURS["rouge"])
    out = tmp_path / "preds.jsonl"
    result = invoke(tmp_path / "misc", "--model", model, "--top-k", 1, "--out", out)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.png"]
    assert [list(r) for r in rows] == [["path", "top"]] * 2
    assert [r["top"][0]["label"] for r in rows] == ["bleu", "rouge"]
    assert len(rows[0]["top"]) == 1 and 0.9 < rows[0]["top"][0]["probability"] <= 1
    assert "accuracy" not in result.output


def test_accuracy_is_printed_for_a_class_folder_tree(tree, model):
    # A wrong label: mostly green, then red, so rouge is its second class.
    write_image(tree / "rouge" / "actually-green.png", (120, 210, 10))
    result = invoke(tree, "--model", model)
    assert result.exit_code == 0, result.output
    # 7 of 8 right at top-1, all at top-5, which three classes cap at top-3.
    assert "top-1 accuracy 87.50%, top-3 100.00%" in result.stderr
    rows = predict([tree], model)
    assert accuracy(rows, 1) == 7 / 8 and accuracy(rows, 2) == 1.0


def test_a_crash_mid_run_leaves_the_previous_output_and_no_temporary(tree, model, tmp_path):
    out = tmp_path / "preds.csv"
    out.write_text("the previous run's rows\n")

    def crash(done, total):
        assert done < total  # the crash comes mid-run, with files still to classify
        raise RuntimeError("power cut")

    with seams.PREDICT_BATCH.installed(crash):
        result = invoke(tree, "--model", model, "--out", out, "--batch-size", 2)
    assert isinstance(result.exception, RuntimeError)
    assert out.read_text() == "the previous run's rows\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv", "tree"]


def test_a_failed_write_keeps_the_previous_output(tree, model, tmp_path):
    out = tmp_path / "preds.jsonl"
    out.write_text("old\n")

    def disk_full(fd, tmp, write):
        os.write(fd, b'{"path": "half')  # part of the rows reached the disk, then it was full
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with seams.FILL_TEMP.installed(disk_full):
        result = invoke(tree, "--model", model, "--out", out)
    assert result.exit_code == 2 and "No space left on device" in result.output
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl", "tree"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top-k", 0], "--top-k must be 1 or more"),
        (["--batch-size", 0], "--batch-size must be 1 or more"),
        (["--out", "preds.txt"], "must end in .csv or .jsonl"),
        (["--out", "{file}/preds.csv"], "is a file, not a folder"),
        (["--out", "{tmp}/taken.csv"], "is a folder; name a .csv or .jsonl file"),
        (["--model", "{file}"], "is not a loadable ONNX model"),
        (["--model", "{tmp}"], "holds no model.onnx"),
        (["--model", "no-such-model"], "--model 'no-such-model' not found"),
    ],
)
def test_bad_options_are_one_red_line_and_exit_2(tree, model, tmp_path, args, message):
    file = tmp_path / "notes.txt"
    file.write_text("not a model, not a folder")
    (tmp_path / "taken.csv").mkdir()
    args = [str(a).format(file=file, tmp=tmp_path) for a in args]
    result = invoke(tree, "--model", model, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


# --- which model -----------------------------------------------------------------------------


def test_custom_class_names_come_from_the_model(tmp_path):
    names = ["pomme de terre", "épinard", "myrtille"]
    custom = colour_model(tmp_path / "veg" / "model.onnx", names)
    write_image(tmp_path / "img" / "x.png", (10, 200, 120))  # green, then blue, then red
    result = invoke(tmp_path / "img", "--model", tmp_path / "veg")  # an artifacts-style folder
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{tmp_path / 'img' / 'x.png'}  épinard 9")
    assert "myrtille" in result.stdout and "vert" not in result.stdout
    top = predict([tmp_path / "img"], custom)[0].top
    assert [label for label, _ in top] == ["épinard", "myrtille", "pomme de terre"]


def test_a_run_folder_is_read_through_its_export(tmp_path, model, tree):
    run = tmp_path / "runs" / "paints-colour"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    result = invoke(tree / "vert", "--model", run)
    assert result.exit_code == 2 and f"run `toolkit export {run}` first" in result.output
    (run / "export").mkdir()
    shutil.copy(model, run / "export" / "model.onnx")
    result = invoke(tree / "vert", "--model", run)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("(true: vert)  vert 9" in line for line in lines), lines


def test_the_default_is_the_most_accurate_shipped_model(tree, monkeypatch, tmp_path):
    shipped = [
        json.loads(p.read_text()) | {"key": p.parent.name}
        for p in (ROOT / "artifacts").glob("*/model.json")
    ]
    if not shipped:
        pytest.skip("no shipped models in artifacts/")
    # The served graph's own test accuracy (with its TTA views, when it has them), among the
    # fp32 models: an INT8 twin is never the default over its source.
    best = max((m for m in shipped if "precision" not in m), key=lambda m: m["test_accuracy"])[
        "key"
    ]
    monkeypatch.chdir(ROOT)
    result = invoke(tree / "rouge" / "rouge-1.png")
    assert result.exit_code == 0, result.output
    assert f"classified by {best}" in result.stderr
    monkeypatch.chdir(tmp_path)  # no artifacts/ here
    result = invoke(tree / "rouge" / "rouge-1.png")
    assert result.exit_code == 2 and "pass --model" in result.output


# --- torch-free ------------------------------------------------------------------------------


def test_predict_runs_without_importing_torch(tree, model, tmp_path):
    """The demo install has no torch: `toolkit predict` must not load it (nor onnx)."""
    code = (
        "import sys\n"
        "from toolkit.cli import app\n"
        "status = None\n"
        "try:\n"
        "    app(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    status = exc.code\n"
        "heavy = ('torch', 'torchvision', 'onnx', 'sklearn')\n"
        "print('loaded:', sorted(m for m in heavy if m in sys.modules), status)\n"
    )
    out = tmp_path / "preds.csv"
    command = [sys.executable, "-c", code, "predict", str(tree), "--model", str(model)]
    done = subprocess.run(
        [*command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip().splitlines()[-1] == "loaded: [] 0", done.stdout + done.stderr
    assert len(out.read_text().splitlines()) == 1 + 7


# --- real CIFAR-10 ---------------------------------------------------------------------------


def _shipped_resnet10() -> Path:
    path = ROOT / "artifacts" / "cifar10-resnet10" / "model.onnx"
    if not path.is_file():
        pytest.skip("the shipped cifar10-resnet10 is absent")
    return path


def test_real_images_match_the_classifier_one_at_a_time():
    """Threads and batches change nothing: the same probabilities as the app computes."""
    files = sorted((real_cifar10() / "test" / "cat").glob("*.jpg"))[:40]
    classifier = OnnxClassifier(_shipped_resnet10())
    rows = predict(files, classifier, top_k=10, batch_size=7, workers=2)
    for row, path in zip(rows, files, strict=True):
        expected = classifier.predict([open_upload(path)])[0]
        got = dict(row.top)
        assert row.path == path and row.true == "cat"
        assert [got[c] for c in classifier.classes] == pytest.approx(expected.tolist(), abs=1e-6)


@pytest.mark.slow
def test_real_test_split_accuracy_is_the_evaluated_one():
    """All 10,000 real test images give the accuracy `toolkit evaluate` measured for the
    shipped model (its metrics.json)."""
    model = _shipped_resnet10()
    expected = json.loads((model.parent / "metrics.json").read_text())["accuracy"]
    rows = predict([real_cifar10() / "test"], model)
    assert len(rows) == 10_000 and all(r.ok for r in rows)
    assert accuracy(rows, 1) == pytest.approx(expected, abs=1e-4)
