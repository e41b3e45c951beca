"""The calibrators beyond one temperature, on small synthetic logits: they never change the
predicted class, the top-1 maps rise, the ONNX graph computes what torch computes, the
choice is made on val by cross-validation, and a shipped model's calibrator can be swapped
without touching its logits."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from serving.page.card import calibration_rows
from toolkit.evaluate.calibration import (
    expected_calibration_error,
    expected_threshold,
    fit_selective,
    negative_log_likelihood,
    selective_threshold,
)
from toolkit.evaluate.calibrators import (  # the private pair: the map's own guard
    METHODS,
    Calibrator,
    _piecewise_linear,
    _top1_knots,
    choose_calibrator,
    cross_validated,
    fit_calibrator,
    remap_top1,
)
from toolkit.export.onnx_graph import CalibratorHead, ExportHead, export_classifier, torch_to_onnx
from toolkit.export.recalibrate import with_calibrator

# Hand-made calibrators at their extremes, beside the fitted ones below.
EXTREME = [
    Calibrator("temperature", 0.3),
    Calibrator("ensemble", 2.0, params=(0.2, 0.3, 0.5)),
    Calibrator("top1-beta", 0.7, params=(0.05, 3.0, -4.0)),  # pushes every top-1 far down
    Calibrator("top1-map", 1.0, knots=((0.1, 0.1), (0.5, 0.11), (0.9, 0.12), (1.0, 1.0))),
]


def top1_distorted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels whose miscalibration no temperature fixes: labels are drawn from
    softmax(z) but the logits are z with every top-1 logit raised by 1.5 (overconfident by
    a step, however confident)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 10, generator=generator) * 2.5
    labels = torch.multinomial(z.softmax(1), 1, generator=generator).flatten()
    logits = z + 1.5 * nn.functional.one_hot(z.argmax(1), 10)
    return logits, labels


@pytest.fixture(scope="module")
def fitted() -> list[Calibrator]:
    logits, labels = top1_distorted(3000, seed=1)
    return [fit_calibrator(method, logits, labels) for method in METHODS]


def near_ties(n: int = 2000) -> torch.Tensor:
    """Logits with a close runner-up, where a careless rescaling would swap the two."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(n, 10, generator=generator) * 3
    top = logits.max(1, keepdim=True).values
    runner_up = torch.randint(0, 10, (n,), generator=generator)
    gap = torch.rand(n, generator=generator) * 1e-3
    logits[torch.arange(n), runner_up] = (top[:, 0] - gap).clamp(max=top[:, 0])
    return logits


def test_no_calibrator_changes_the_predicted_class(fitted):
    logits = torch.cat([near_ties(), top1_distorted(2000, seed=3)[0], torch.randn(50, 10) * 40])
    for calibrator in [*fitted, *EXTREME]:
        probs = calibrator.probs(logits)
        assert torch.equal(probs.argmax(1), logits.argmax(1)), calibrator.method
        assert torch.allclose(probs.sum(1), torch.ones(len(logits)), atol=1e-5)
        assert (probs >= 0).all()


def test_a_top1_map_where_confidences_round_to_one_still_sums_to_one():
    # A third of the images are certain in float32 (top-1 exactly 1.0) and 90 % right: the
    # map must still send 1.0 to 1.0, as no other class is left to take 1 − g.
    generator = torch.Generator().manual_seed(9)
    probs = torch.softmax(torch.randn(3000, 10, generator=generator), 1)
    probs[:1000] = nn.functional.one_hot(probs[:1000].argmax(1), 10).float()
    labels = probs.argmax(1)
    labels[torch.arange(0, 3000, 10)] = (labels[torch.arange(0, 3000, 10)] + 1) % 10
    knots = _top1_knots(probs, labels)
    assert knots[-1] == (1.0, 1.0) and knots[0] == (0.1, 0.1)
    mapped = remap_top1(probs, lambda c, rest: _piecewise_linear(c, knots))
    assert torch.allclose(mapped.sum(1), torch.ones(len(probs)), atol=1e-5)


def test_the_top1_maps_rise_with_the_confidence(fitted):
    # Logits (d, 0, ..., 0): the top-1 probability of the scaled softmax rises with d, here
    # from ~0.3 (above where the runner-up floor of remap_top1 takes over) to below where
    # float32 rounds it to 1.
    logits = torch.zeros(400, 10)
    logits[:, 0] = torch.linspace(2.0, 7.0, 400)
    for calibrator in fitted:
        top = calibrator.probs(logits).max(1).values
        assert (top[1:] >= top[:-1]).all(), calibrator.method
        if calibrator.method.startswith("top1"):
            assert (top[1:] > top[:-1]).sum() > 390, calibrator.method  # strictly, not flat
    a, b, _ = next(c for c in fitted if c.method == "top1-beta").params
    assert a > 0 and b > 0


def test_a_step_no_temperature_fixes_is_fixed_by_a_top1_map():
    val_logits, val_labels = top1_distorted(5000, seed=4)
    test_logits, test_labels = top1_distorted(20_000, seed=5)
    chosen, choice = choose_calibrator(val_logits, val_labels)
    assert chosen.method in ("top1-beta", "top1-map")
    assert choice["candidates"][chosen.method]["ece"] < choice["candidates"]["temperature"]["ece"]
    temperature = fit_calibrator("temperature", val_logits, val_labels)
    before = expected_calibration_error(temperature.probs(test_logits), test_labels)
    after = expected_calibration_error(chosen.probs(test_logits), test_labels)
    assert after < 0.6 * before
    nll_before = negative_log_likelihood(temperature.probs(test_logits), test_labels)
    assert negative_log_likelihood(chosen.probs(test_logits), test_labels) <= nll_before


def test_a_fold_with_no_finite_optimum_still_calibrates():
    """Found by a fine-tune at chance (6 val images, one answer for all): on a cross-validation
    fold of 5, the top1-beta map had no finite optimum and e^β overflowed, so `toolkit export`
    stopped. These are that fold's logits."""
    logits = torch.tensor(
        [
            [-0.1440, 0.2183, -0.1322],
            [-0.1595, 0.2196, -0.1287],
            [-0.1573, 0.2249, -0.1319],
            [-0.2203, 0.1721, -0.1242],
            [-0.2226, 0.1755, -0.1250],
        ]
    )
    labels = torch.tensor([0, 1, 1, 2, 2])
    calibrator = fit_calibrator("top1-beta", logits, labels)
    assert all(np.isfinite(calibrator.params))
    probs = calibrator.probs(logits)
    assert torch.isfinite(probs).all() and torch.equal(probs.argmax(1), logits.argmax(1))
    chosen, _ = choose_calibrator(torch.cat([logits, logits[:1]]), torch.cat([labels, labels[:1]]))
    assert torch.isfinite(chosen.probs(logits)).all()


def test_the_choice_is_the_best_cross_validated_ece_on_val_with_no_worse_nll():
    logits, labels = top1_distorted(2000, seed=6)
    chosen, choice = choose_calibrator(logits, labels)
    scores = choice["candidates"]
    held_out = cross_validated(chosen.method, logits, labels)
    assert scores[chosen.method]["ece"] == pytest.approx(
        expected_calibration_error(held_out, labels)
    )
    eligible = [
        m for m, s in scores.items() if s["nll_vs_temperature"] <= s["nll_vs_temperature_se"]
    ]
    assert chosen.method == min(eligible, key=lambda m: scores[m]["ece"])
    assert chosen == fit_calibrator(chosen.method, logits, labels)  # refitted on all of val
    assert chosen.method in choice["reason"]
    # Perfectly calibrated logits (labels drawn from softmax(z)): nothing beats T ≈ 1 by much.
    generator = torch.Generator().manual_seed(7)
    z = torch.randn(4000, 10, generator=generator) * 2
    honest = torch.multinomial(z.softmax(1), 1, generator=generator).flatten()
    calm, _ = choose_calibrator(z, honest)
    assert calm.temperature == pytest.approx(1.0, abs=0.08)


def test_records_round_trip_and_old_records_are_a_temperature(fitted):
    for calibrator in [*fitted, *EXTREME]:
        assert Calibrator.from_record({"calibrator": calibrator.record()}) == calibrator
    old = Calibrator.from_record({"temperature": 0.75, "fitted_on": "val"})
    assert old == Calibrator("temperature", 0.75)
    with pytest.raises(ValueError, match="unknown calibration method"):
        Calibrator("platt", 1.0)


def test_the_onnx_graph_computes_the_torch_calibrator(fitted):
    logits = torch.cat([near_ties(300), top1_distorted(300, seed=8)[0]])
    for calibrator in [*fitted, *EXTREME]:
        graph = torch_to_onnx(CalibratorHead(calibrator).eval(), (10,), 17, ("logits", ("probs",)))
        session = ort.InferenceSession(graph.SerializeToString())
        (probs,) = session.run(["probs"], {"logits": logits.numpy()})
        expected = calibrator.probs(logits).numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-5, err_msg=calibrator.method)
        assert np.array_equal(probs.argmax(1), logits.argmax(1).numpy())


def test_a_new_calibrator_replaces_the_old_one_and_leaves_the_logits_alone(fitted):
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    meta = {"classes": [f"c{i}" for i in range(10)], "input_size": [8, 8], "dataset": "toy"}
    meta |= {"model": "linear", "temperature": 0.5, "calibration_method": "temperature"}
    old = export_classifier(
        ExportHead(classifier, Calibrator("temperature", 0.5)), (3, 8, 8), meta, 17
    )
    new_calibrator = next(c for c in fitted if c.method == "top1-map")
    new = with_calibrator(old, new_calibrator, {"calibration_method": "top1-map"})

    x = np.random.default_rng(0).random((40, 3, 8, 8), dtype=np.float32) * 4
    before = ort.InferenceSession(old.SerializeToString()).run(None, {"image": x})
    after = ort.InferenceSession(new.SerializeToString()).run(None, {"image": x})
    np.testing.assert_array_equal(after[0], before[0])  # the logits, bit for bit
    expected = new_calibrator.probs(torch.from_numpy(after[0])).numpy()
    np.testing.assert_allclose(after[1], expected, atol=1e-5)
    assert not np.allclose(after[1], before[1], atol=1e-3)  # or this would prove nothing
    props = {p.key: p.value for p in new.metadata_props}
    assert props["calibration_method"] == "top1-map" and props["dataset"] == "toy"
    assert [o.name for o in new.graph.output] == ["logits", "probs"]


def test_the_not_sure_threshold_needs_val_and_the_calibrator_to_agree():
    # Calibrated confidences 0.99, 0.97, 0.9, 0.8 (means of the top n: 0.99, 0.98, 0.953,
    # 0.915); all four right, so val alone would keep them all at a 95 % target.
    confidence = [0.99, 0.97, 0.9, 0.8]
    probs = torch.tensor([[c, 1 - c] for c in confidence])
    labels = torch.zeros(4, dtype=torch.long)
    assert selective_threshold(probs, labels, 0.95)["threshold"] == pytest.approx(0.8)
    assert expected_threshold(probs, 0.95) == pytest.approx(0.9)
    fitted = fit_selective(probs, labels, 0.95)
    assert fitted["threshold"] == pytest.approx(0.9) and fitted["bound_by"] == "calibrated"
    assert (fitted["val_coverage"], fitted["val_accuracy"]) == (0.75, 1.0)
    # One wrong at 0.97: val needs the top one alone; the calibrator would keep three.
    wrong = torch.tensor([0, 1, 0, 0])
    fitted = fit_selective(probs, wrong, 0.95)
    assert fitted["threshold"] == pytest.approx(0.99) and fitted["bound_by"] == "val"
    assert expected_threshold(probs, 0.999) is None
    assert fit_selective(probs, labels, 0.999)["threshold"] is None


def test_the_card_states_the_method_and_old_models_read_as_a_temperature():
    new = {"calibrated_on": "val", "temperature": 0.7, "confidence_threshold": None}
    new |= {"calibration_method": "top1-beta", "calibration_description": "softmax(…), then β"}
    (row, *_) = calibration_rows(new, {})
    assert row == (
        "probabilities",
        "calibrated by top1-beta, fitted and chosen on the val split: softmax(…), then β",
    )
    old = {"calibrated_on": "val", "temperature": 0.7, "confidence_threshold": None}
    assert "calibrated by temperature" in calibration_rows(old, {})[0][1]
    assert "softmax(logits / 0.700)" in calibration_rows(old, {})[0][1]
