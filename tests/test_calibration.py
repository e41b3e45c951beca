"""Calibration: ECE/NLL/Brier on known answers, the temperature fitted on val only and carried
into the ONNX graph, the "not sure" threshold, and T = 1 changing nothing."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from toolkit.data import Split
from toolkit.evaluate import evaluate_run
from toolkit.evaluate.calibrate import calibrate_run, checkpoint_logits
from toolkit.evaluate.calibration import (
    brier_score,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    scaled_probs,
    selective_result,
    selective_threshold,
)
from toolkit.evaluate.calibrators import Calibrator
from toolkit.export import Timing, export_run
from toolkit.export.onnx_graph import ExportHead, torch_to_onnx
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.state import load_run_data

FAST = Timing(warmup=1, min_runs=2, max_runs=2, budget_s=0.0)


def probs_of(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- the measures, on hand-checked numbers ----------------------------------------------------


def test_ece_nll_and_brier_on_a_hand_made_case():
    # Two predictions at 0.9 (one right, one wrong) and two at 0.6 (both right):
    # |0.5 - 0.9| * 2/4 + |1.0 - 0.6| * 2/4 = 0.4.
    probs = probs_of([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 1, 0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4, abs=1e-6)
    nll = -(math.log(0.9) + math.log(0.05) + 2 * math.log(0.6)) / 4
    assert negative_log_likelihood(probs, labels) == pytest.approx(nll, abs=1e-6)
    right, wrong = 0.1**2 + 2 * 0.05**2, 0.9**2 + 0.95**2 + 0.05**2
    brier = (right + wrong + 2 * (0.4**2 + 0.3**2 + 0.1**2)) / 4
    assert brier_score(probs, labels) == pytest.approx(brier, abs=1e-6)


def test_a_perfectly_calibrated_set_has_zero_ece():
    # 0.75 confident, right 3 times out of 4.
    probs = probs_of([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0)


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_the_fitted_temperature_recovers_a_known_one(true_temperature):
    """Labels drawn from softmax(z): logits z * T are mis-calibrated by exactly T."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 10, generator=generator) * 3
    labels = torch.multinomial(z.softmax(1), 1, generator=generator).flatten()
    fitted = fit_temperature(z * true_temperature, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.03)
    before = expected_calibration_error(scaled_probs(z * true_temperature), labels)
    after = expected_calibration_error(scaled_probs(z * true_temperature, fitted), labels)
    assert after < 0.01 < before


def test_the_selective_threshold_keeps_the_most_at_the_target_accuracy():
    confidence = [0.99, 0.95, 0.9, 0.8, 0.7, 0.6]
    right = [True, True, False, True, True, False]
    probs = probs_of([[c, 1 - c] for c in confidence])
    labels = torch.tensor([0 if r else 1 for r in right])
    # Accuracy of the top n: 1, 1, 2/3, 3/4, 4/5, 4/6: the most kept at >= 75 % is n = 5.
    chosen = selective_threshold(probs, labels, target=0.75)
    assert chosen == {"threshold": pytest.approx(0.7), "coverage": 5 / 6, "accuracy": 0.8}
    assert isinstance(chosen["accuracy"], float)
    assert selective_threshold(probs, labels, target=1.0)["threshold"] == pytest.approx(0.95)
    wrong_first = probs_of([[0.99, 0.01], [0.6, 0.4]])
    nothing = selective_threshold(wrong_first, torch.tensor([1, 0]), target=0.9)
    assert nothing == {"threshold": None, "coverage": 0.0, "accuracy": None}
    elsewhere = selective_result(probs, labels, 0.85)  # the 0.99, 0.95 and 0.9 ones
    assert elsewhere == {"coverage": 0.5, "accuracy": pytest.approx(2 / 3)}


def test_a_threshold_never_splits_equal_confidences():
    probs = probs_of([[0.9, 0.1], [0.8, 0.2], [0.8, 0.2]])
    labels = torch.tensor([0, 0, 1])  # keeping both 0.8s gives 2/3; one alone is no threshold
    assert selective_threshold(probs, labels, target=0.75)["threshold"] == pytest.approx(0.9)


# --- a run's calibration ----------------------------------------------------------------------


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / trained_run.name))


def test_the_temperature_is_fitted_on_val_and_never_on_test(run):
    """Give the test split random labels: a calibration that looked at test would change."""
    ckpt = Checkpoint.load(run / "best.pt")
    data = load_run_data(run, ckpt)
    shuffled = data.test.labels[torch.randperm(len(data.test), generator=torch.Generator())]
    leaky = dataclasses.replace(data, test=Split(data.test.images, shuffled))
    record = calibrate_run(run, ckpt, leaky, device="cpu")

    val_logits = checkpoint_logits(ckpt, data.val.images, "cpu")
    assert record["temperature"] == fit_temperature(val_logits, data.val.labels)
    test_logits = checkpoint_logits(ckpt, data.test.images, "cpu")
    assert record["temperature"] != pytest.approx(fit_temperature(test_logits, shuffled), rel=0.1)
    assert record["fitted_on"] == "val" and record["val_images"] == len(data.val) == 30
    stored = json.loads((run / "calibration.json").read_text())
    assert (stored["checkpoint_epoch"], stored["fingerprint"]) == (ckpt.epoch, ckpt.fingerprint)


def test_a_run_without_val_is_not_calibrated(run):
    (run / "calibration.json").unlink(missing_ok=True)  # another test may have fitted one
    ckpt = Checkpoint.load(run / "best.pt")
    data = load_run_data(run, ckpt)
    empty = Split(data.val.images[:0], data.val.labels[:0])
    record = calibrate_run(run, ckpt, dataclasses.replace(data, val=empty), device="cpu")
    assert record["temperature"] == 1.0 and record["fitted_on"] is None
    assert record["selective"]["threshold"] is None and "no val split" in record["note"]


def test_evaluate_reports_raw_and_calibrated_probabilities(run):
    summary = evaluate_run(run, device="cpu")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    c = metrics["calibration"]
    assert c == summary["calibration"] and c["fitted_on"] == "val"
    for kind in ("raw", "calibrated"):
        assert set(c[kind]) == {"ece", "nll", "brier", "bins"} and len(c[kind]["bins"]) == 15
        assert sum(b["count"] for b in c[kind]["bins"]) == metrics["n"] == 100
    # The calibrated NLL is the point of the temperature; on test it should not be worse
    # than a little above the raw one even on this tiny val split.
    assert c["calibrated"]["nll"] < c["raw"]["nll"] * 1.1
    assert c["selective"]["target_accuracy"] == 0.95 and "coverage" in c["selective"]
    assert (run / "eval" / "reliability_diagram.png").read_bytes().startswith(b"\x89PNG")
    # Fitted once: the record evaluate wrote is the one a second reader gets.
    before = (run / "calibration.json").read_bytes()
    evaluate_run(run, device="cpu")
    assert (run / "calibration.json").read_bytes() == before


def test_the_exported_probabilities_are_the_calibrated_ones(run):
    report = export_run(run, timing=FAST)
    calibration = json.loads((run / "calibration.json").read_text())
    temperature = calibration["temperature"]
    assert temperature != pytest.approx(1.0, abs=1e-3)  # or this test would prove nothing
    meta = report["metadata"]
    assert meta["temperature"] == temperature and meta["calibrated_on"] == "val"
    assert meta["confidence_threshold"] == calibration["selective"]["threshold"]
    assert report["verification"]["max_abs_prob_diff"] < 1e-4

    session = ort.InferenceSession(str(run / "export" / "model.onnx"))
    x = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    logits, probs = session.run(["logits", "probs"], {"image": x})
    expected = Calibrator.from_record(calibration).probs(torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert (
        meta["calibration_method"]
        == calibration["method"]
        == report["metadata"]["calibrator"]["method"]
    )
    with torch.no_grad():
        plain = Checkpoint.load(run / "best.pt").build_classifier()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, plain, atol=1e-4)  # logits are not scaled


def test_a_temperature_of_one_exports_the_graph_of_old(trained_run):
    classifier = Checkpoint.load(trained_run / "best.pt").build_classifier()
    plain = torch_to_onnx(ExportHead(classifier), (3, 32, 32), 17)
    one = torch_to_onnx(ExportHead(classifier, Calibrator("temperature", 1.0)), (3, 32, 32), 17)
    scaled = torch_to_onnx(ExportHead(classifier, Calibrator("temperature", 1.7)), (3, 32, 32), 17)

    def ops(model: onnx.ModelProto) -> list[str]:
        return [node.op_type for node in model.graph.node]

    assert ops(one) == ops(plain)
    assert len(ops(scaled)) == len(ops(plain)) + 1  # the one division by T
