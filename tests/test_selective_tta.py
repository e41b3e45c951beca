"""Selective TTA (issue #25): the views only for the images the plain pass is least sure of,
in torch and inside the exported graph (an If), evaluated and served alike."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from rich.console import Console

from serving.page.card import report_rows, tta_choice_rows, tta_rows
from tests.test_speedrun import FAST, META
from tests.training import tiny_config
from toolkit.errors import ToolkitError
from toolkit.evaluate import evaluate_run
from toolkit.evaluate.calibrators import Calibrator
from toolkit.export import export_run, print_report
from toolkit.export.branches import PREFIX
from toolkit.export.onnx_graph import ExportHead, export_classifier
from toolkit.export.opset import SELECTIVE_TTA_OPSET
from toolkit.export.quantize import quantize_int8
from toolkit.export.recalibrate import with_calibrator
from toolkit.models import NormalizedClassifier, create_model
from toolkit.train import fit
from toolkit.tta import TTAClassifier


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    net = create_model("speedrun", width=4)
    net.prepare(torch.randn(32, 3, 32, 32))
    return NormalizedClassifier(net.eval(), [0.5] * 3, [0.25] * 3).eval()


def _images(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32))


def _split_threshold(classifier, x) -> tuple[float, torch.Tensor]:
    """A threshold with some images on each side, and which ones are below it."""
    with torch.no_grad():
        confidence = classifier(x).softmax(1).amax(1)
    below = confidence.median().item()
    return below, confidence < below


def test_unsure_images_get_the_views_the_sure_ones_keep_their_plain_logits(classifier):
    x = _images()
    below, unsure = _split_threshold(classifier, x)
    assert 0 < unsure.sum() < len(x)
    with torch.no_grad():
        selective = TTAClassifier(classifier, 2, below)(x)
        every = TTAClassifier(classifier, 2)(x)
        plain = classifier(x)
    assert torch.allclose(selective[unsure], every[unsure], atol=1e-6)
    assert torch.equal(selective[~unsure], plain[~unsure])
    assert not torch.allclose(selective[unsure], plain[unsure], atol=1e-4)
    assert not TTAClassifier(classifier, 2, 1.0).selective  # 1: every image, the old graph


def test_the_exported_if_serves_what_torch_evaluates(classifier):
    x = _images()
    below, unsure = _split_threshold(classifier, x)
    head = ExportHead(TTAClassifier(classifier, 2, below)).eval()
    model = export_classifier(head, (3, 32, 32), META, SELECTIVE_TTA_OPSET)
    assert "If" in {node.op_type for node in model.graph.node}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = head(x)[0].numpy()
        plain = classifier(x).numpy()
    logits = session.run(None, {"image": x.numpy()})[0]
    assert np.abs(logits - expected).max() < 1e-4
    # One sure image alone takes the If's other branch: its plain logits.
    sure = x[~unsure][:1].numpy()
    alone = session.run(None, {"image": sure})[0]
    assert np.abs(alone - plain[~unsure.numpy()][:1]).max() < 1e-4


def test_a_new_calibrator_behind_the_if_leaves_its_logits_alone(classifier):
    """Refitting the calibration of a selective graph (INT8 export, benchmarks.calibration)
    keeps the nodes the If's branches read from around them: the same logits, bit for bit."""
    x = _images()
    below, _ = _split_threshold(classifier, x)
    head = ExportHead(TTAClassifier(classifier, 2, below)).eval()
    old = export_classifier(head, (3, 32, 32), META, SELECTIVE_TTA_OPSET)
    new = with_calibrator(old, Calibrator("temperature", 0.5), {"temperature": 0.5})
    runs = [
        ort.InferenceSession(m.SerializeToString()).run(None, {"image": x.numpy()})
        for m in (old, new)
    ]
    np.testing.assert_array_equal(runs[1][0], runs[0][0])
    expected = torch.from_numpy(runs[1][0] / 0.5).softmax(1).numpy()
    np.testing.assert_allclose(runs[1][1], expected, atol=1e-5)


def test_int8_quantizes_the_views_inside_the_if_too(classifier):
    """onnxruntime's quantizer leaves an If's branches in fp32 (with fp32 copies of their
    weights); toolkit.export.branches quantizes the views' branch as a model of its own."""
    x = _images(64, seed=1)
    below, _ = _split_threshold(classifier, x)
    head = ExportHead(TTAClassifier(classifier, 2, below)).eval()
    fp32 = export_classifier(head, (3, 32, 32), META, SELECTIVE_TTA_OPSET)
    int8 = quantize_int8(fp32, x.numpy(), vnni=True)
    onnx.checker.check_model(int8)
    (views,) = [
        a.g
        for node in int8.graph.node
        if node.op_type == "If"
        for a in node.attribute
        if any(inner.op_type == "Conv" for inner in a.g.node)
    ]
    made_by = {out: inner.op_type for inner in views.node for out in inner.output}
    convs = [inner for inner in views.node if inner.op_type == "Conv"]
    assert convs and all(made_by.get(c.input[1]) == "DequantizeLinear" for c in convs)
    assert all(t.name.startswith(PREFIX) for t in views.initializer)  # none shadows an outer one
    weights = {t.name for t in int8.graph.initializer}
    assert not any(name.endswith("conv1.weight") for name in weights)  # no fp32 copies left
    session = ort.InferenceSession(int8.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": x.numpy()})[0].shape == (64, 10)

    # No calibration image unsure, nothing to calibrate the views on: they stay fp32.
    never = ExportHead(TTAClassifier(classifier, 2, 1e-6)).eval()
    fp32 = export_classifier(never, (3, 32, 32), META, SELECTIVE_TTA_OPSET)
    int8 = quantize_int8(fp32, x.numpy(), vnni=True)
    onnx.checker.check_model(int8)
    views = [a.g for n in int8.graph.node if n.op_type == "If" for a in n.attribute]
    assert not any(inner.op_type == "QuantizeLinear" for g in views for inner in g.node)


@pytest.fixture(scope="module")
def selective_run(tmp_path_factory, cifar_folder):
    tmp_path = tmp_path_factory.mktemp("selective")
    config = tiny_config(
        cifar_folder,
        tmp_path,
        "speedrun",
        epochs=1,
        batch_size=64,
        lr=None,
        tta_below=0.5,
        model_options={"width": 4},
    )
    assert config.tta == 2 and config.tta_below == 0.5
    return fit(config, run_dir=tmp_path / "run").run_dir


def test_a_selective_run_is_evaluated_with_its_threshold(selective_run):
    tta = evaluate_run(selective_run, device="cpu")["tta"]
    assert tta["below"] == 0.5 and 0.0 <= tta["with_views"] <= 1.0
    with pytest.raises(ToolkitError, match="--opset 18"):  # before any slow work
        export_run(selective_run, timing=FAST, tta=True, opset=17)


@pytest.mark.slow
def test_a_selective_run_exports_with_its_threshold(selective_run):
    run = selective_run
    tta = evaluate_run(run, device="cpu")["tta"]
    report = export_run(run, timing=FAST, tta=True)
    assert report["verification"]["passed"]
    assert report["metadata"]["tta_below"] == 0.5
    assert report["metadata"]["test_accuracy"] == pytest.approx(tta["accuracy"])
    model = onnx.load(run / "export" / "model.onnx")
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {18}
    record = json.loads((run / "calibration-tta2-below0.5.json").read_text())
    assert record["tta_below"] == 0.5
    console = Console(record=True, width=200)
    print_report(report, console)  # the MACs counted are one pass: not every image's cost
    assert "M MACs/image it is sure of (the others also run the views)" in console.export_text()


def test_the_model_card_says_which_images_get_the_views():
    metrics = {"tta": {"views": 6, "with_views": 0.23, "accuracy_without": 0.9}}
    text = dict(tta_rows({"tta": 2, "tta_below": 0.7}, metrics))["test-time augmentation"]
    assert "6 views (mirror and 1-px shifts)" in text
    assert "below 0.7 (23% of the test images)" in text
    every = dict(tta_rows({"tta": 2}, metrics))["test-time augmentation"]
    assert "below" not in every


def _row(variant: str, precision: str, val: float, ms: float) -> dict:
    return {
        "variant": variant,
        "precision": precision,
        "val_accuracy": val,
        "test_accuracy": val,
        "batch1_ms": ms,
    }


TTA_ROWS = [
    _row("plain", "fp32", 0.8966, 1.75),
    _row("plain", "int8", 0.8932, 1.11),
    _row("all 6 views", "fp32", 0.9082, 10.93),
    _row("all 6 views", "int8", 0.9074, 6.29),
    _row("6 views below p=0.570", "fp32", 0.9080, 5.12),
    _row("6 views below p=0.570", "int8", 0.9074, 4.57),
]


def test_the_served_tta_is_the_fastest_fp32_graph_within_the_tolerance_with_its_int8_twin():
    from benchmarks.tta_serving import choose

    choice, twin = choose(TTA_ROWS)
    assert choice["variant"] == "6 views below p=0.570" and choice["precision"] == "fp32"
    assert twin["variant"] == choice["variant"] and twin["precision"] == "int8"
    # a tighter tolerance leaves only the best graph; plain is never within 1 pt of it
    assert choose(TTA_ROWS, tolerance=0.0001)[0]["variant"] == "all 6 views"
    assert choose(TTA_ROWS, tolerance=0.012)[0]["variant"] == "plain"


def test_the_model_card_shows_the_tta_choice_in_its_own_precision():
    choice = {"rule": "the fastest", "timing": "batch 1", "cpu": "AMD EPYC"}
    choice["chosen"] = "6 views below p=0.570"
    info = {"tta": 2, "tta_choice": {**choice, "served": "all 6 views", "rows": TTA_ROWS}}
    fp32 = dict(tta_choice_rows(info, "fp32"))["TTA variants"]
    assert "all 6 views **(this graph)**: 90.82% val, 10.9 ms" in fp32  # what it serves
    assert "6 views below p=0.570: 90.80% val, 5.1 ms" in fp32 and "6.3 ms" not in fp32
    assert fp32.endswith("(ms: batch 1, AMD EPYC). Rule: the fastest → 6 views below p=0.570")
    assert "4.6 ms" in dict(tta_choice_rows(info, "int8"))["TTA variants"]
    assert tta_choice_rows({"tta": 2}, "fp32") == []
    assert tta_choice_rows({"tta_choice": {"rows": "edited"}}, "fp32") == []


def test_the_card_counts_the_views_an_unsure_image_costs():
    report = {"stats": {"macs_per_image": 1000}}
    assert dict(report_rows(report))["MACs per image"] == "1,000"
    selective = dict(report_rows(report, unsure_passes=7))["MACs per image"]
    assert selective == "1,000 for an image it is sure of, 7,000 for one it is not"


def test_a_shipped_folder_gets_the_table_with_its_own_graph_named(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import benchmarks.tta_serving as tta_serving

    best = SimpleNamespace(best_val_acc=0.9)
    monkeypatch.setattr(tta_serving.Checkpoint, "load", staticmethod(lambda path: best))
    rows = [
        {
            **r,
            "tta": 0 if r["variant"] == "plain" else 2,
            "below": 0.57 if "p=" in r["variant"] else 1.0,
        }
        for r in TTA_ROWS
    ]
    report = {"run": "runs/x", "tolerance": 0.002, "cpu": {"model": "AMD EPYC"}, "rows": rows}
    report["choice"] = rows[4]
    served, other = tmp_path / "selective", tmp_path / "every-view"
    for folder, below in ((served, 0.57), (other, 1.0)):
        folder.mkdir()
        (folder / "model.json").write_text(
            json.dumps({"val_accuracy": 0.9, "tta": 2, "tta_below": below})
        )
    tta_serving.write_choice([served, other], report)
    block = json.loads((served / "model.json").read_text())["tta_choice"]
    assert block["served"] == block["chosen"] == "6 views below p=0.570"
    assert json.loads((other / "model.json").read_text())["tta_choice"]["served"] == "all 6 views"
    best.best_val_acc = 0.8  # another run's folder is refused, not labelled
    with pytest.raises(SystemExit, match="was not exported from runs/x/best.pt"):
        tta_serving.write_choice([served], report)
