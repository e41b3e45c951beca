"""The speedrun model and the techniques of its recipe (issue #18): whitening init, dirac
init, lookahead, alternating flip, translation, decoupled SGD, frozen BN scales, TTA (in
evaluation and inside the exported graph) and --val-fraction 0."""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from serving.api.oip import triton_name
from serving.catalog import load_model
from serving.page.card import card_markdown
from tests.training import fit_interrupted_in_second_epoch, tiny_config
from toolkit.data import DataOptions
from toolkit.data.carve import carve
from toolkit.errors import ToolkitError
from toolkit.evaluate import evaluate_run
from toolkit.evaluate.calibrators import Calibrator
from toolkit.export import export_run, package_run
from toolkit.export.bench import Timing
from toolkit.export.onnx_graph import ExportHead, export_classifier
from toolkit.models import NormalizedClassifier, create_model
from toolkit.run.checkpoint import Checkpoint
from toolkit.speedrun import WhiteningConv, _identity_conv
from toolkit.train import TrainConfig, fit, recipes, resume
from toolkit.train.batches import BatchAugment, alternating_flips
from toolkit.train.optim import (
    LOOKAHEAD_EVERY,
    Lookahead,
    freeze_bn_scales,
    lr_factor,
    make_optimizer,
)
from toolkit.tta import TTAClassifier, tta_views

META = {
    "model": "speedrun",
    "dataset": "cifar10",
    "input_size": [32, 32],
    "classes": list("0123456789"),
}
FAST = Timing(warmup=1, min_runs=2, max_runs=2, budget_s=0.0)


def _correlated_images(n: int = 400, seed: int = 0) -> torch.Tensor:
    """Images whose channels and neighbouring pixels are strongly correlated (like photos)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 17, 17, generator=g)
    smooth = nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False)
    mix = torch.tensor([[1.0], [0.8], [0.6]])
    return smooth * mix.view(1, 3, 1, 1) + 0.3 * torch.randn(n, 3, 32, 32, generator=g)


def _patch_covariance(x: torch.Tensor) -> torch.Tensor:
    flat = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    flat = flat - flat.mean(0)
    return flat.T @ flat / len(flat)


def test_the_whitening_layer_whitens_its_training_patches():
    images = _correlated_images()
    layer = WhiteningConv(3)
    before = _patch_covariance(nn.functional.unfold(images, 2).view(len(images), 12, 31, 31))
    assert before.diagonal().max() / before.diagonal().min() < 10  # not already white...
    assert (before - torch.diag(before.diagonal())).abs().max() > 0.3  # ...but correlated
    layer.init_from_images(images, eps=1e-8)
    with torch.no_grad():
        out = nn.functional.conv2d(images, layer.weight)  # the bias only shifts the mean
    assert out.shape == (len(images), 24, 31, 31)
    half = out[:, :12]
    assert torch.allclose(_patch_covariance(half), torch.eye(12), atol=0.05)
    assert torch.equal(out[:, 12:], -half)  # the negated copy the GELU needs
    assert "weight" not in dict(layer.named_parameters())  # a buffer: never trained
    assert "weight" in layer.state_dict()  # but saved with the checkpoint


def test_a_dirac_initialised_conv_passes_its_input_through():
    conv = _identity_conv(4, 8)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        y = conv(x)
    assert torch.allclose(y[:, :4], x, atol=1e-6)


def test_the_speedrun_net_builds_trains_one_step_and_freezes_the_whitening_bias():
    net = create_model("speedrun", width=8)
    net.prepare(_correlated_images(64))
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    net.start_epoch(4)
    assert not net.whiten.bias.requires_grad
    net.start_epoch(1)
    assert net.whiten.bias.requires_grad
    with pytest.raises(Exception, match="too small"):
        create_model("speedrun", input_size=8)


def test_lookahead_pulls_the_weights_to_their_ema_and_ends_on_it():
    p = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([p], lr=1.0)
    lookahead = Lookahead(optimizer, 0.9, total_steps=20)
    p.data.fill_(1.0)
    lookahead.after_step(LOOKAHEAD_EVERY)  # first pull: the EMA starts at these weights
    assert torch.equal(p.data, torch.ones(3))
    p.data.fill_(3.0)
    lookahead.after_step(7)  # not a pull step: nothing happens
    assert torch.equal(p.data, torch.full((3,), 3.0))
    lookahead.after_step(10)
    decay = 0.9**LOOKAHEAD_EVERY * (10 / 20) ** 3
    expected = 1.0 + (3.0 - 1.0) * (1 - decay)
    assert torch.allclose(p.data, torch.full((3,), expected))
    assert torch.equal(optimizer.state[p]["lookahead"], p.data)  # saved with the optimizer
    ema = p.data.clone()
    p.data.fill_(10.0)
    lookahead.after_step(20)  # the last step: the final weights are the EMA
    assert torch.equal(p.data, ema)


def test_lookahead_off_changes_nothing():
    p = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([p], lr=1.0)
    Lookahead(optimizer, 0.0, total_steps=5).after_step(5)
    assert not optimizer.state[p]


def test_alternating_flip_flips_every_image_in_alternate_epochs():
    flips = [alternating_flips(1000, seed=3, epoch=e) for e in range(1, 5)]
    for a, b in zip(flips, flips[1:], strict=False):
        assert torch.equal(a, ~b)
    assert torch.equal(flips[0], flips[2])
    assert 400 < int(flips[0].sum()) < 600
    assert not torch.equal(flips[0], alternating_flips(1000, seed=4, epoch=1))

    images = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)
    params = BatchAugment.draw(
        2, (2, 4), torch.Generator(), False, 0, flips=torch.tensor([True, False])
    )
    out = params.apply(images)
    assert torch.equal(out[0], images[0].flip(2)) and torch.equal(out[1], images[1])


def test_translate_shifts_by_at_most_its_padding():
    images = torch.rand(64, 3, 8, 8)
    params = BatchAugment.draw(64, (8, 8), torch.Generator().manual_seed(0), False, 0, 2)
    assert params.flip is None and int(params.dy.max()) <= 4 and int(params.dx.max()) <= 4
    out = params.apply(images)
    for i in range(64):
        dy, dx = int(params.dy[i]) - 2, int(params.dx[i]) - 2
        # The interior that stays inside the image moved by (dy, dx).
        shifted = out[i, :, max(0, -dy) : 8 - max(0, dy), max(0, -dx) : 8 - max(0, dx)]
        source = images[i, :, max(0, dy) : 8 + min(0, dy), max(0, dx) : 8 + min(0, dx)]
        assert torch.equal(shifted, source)


def _config(**overrides):
    values = dict(recipes.resolve("airbench94", "speedrun", {}), **overrides)
    return TrainConfig(model="speedrun", data=None, **values)


def test_decoupled_sgd_restates_the_step_and_bias_groups():
    net = create_model("speedrun", width=4)
    config = _config()
    optimizer = make_optimizer(config, net)
    others, biases = optimizer.param_groups
    gain = 1 + 1 / (1 - 0.85)
    assert others["lr"] == pytest.approx(11.5 * 1024 / (1024 * gain))
    assert biases["lr"] == pytest.approx(others["lr"] * 64)
    # The decay per step (lr x weight_decay) is the same for both groups.
    assert others["lr"] * others["weight_decay"] == pytest.approx(
        biases["lr"] * biases["weight_decay"]
    )
    bn = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(p) for p in biases["params"]} == {id(p) for m in bn for p in m.parameters()}
    assert optimizer.defaults["nesterov"]


def test_frozen_bn_scales_do_not_move():
    net = create_model("resnet9", width=4)
    freeze_bn_scales(net)
    optimizer = make_optimizer(_config(bias_lr_scale=1.0), net)
    scales = [m.weight.clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    nn.functional.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    optimizer.step()
    after = [m.weight for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(scales, after, strict=True))


def test_the_other_recipes_leave_the_new_techniques_off():
    for model in ("mlp", "net", "resnet10", "lenet5", "resnet9"):
        for recipe in recipes.FALLBACK:
            v = recipes.resolve(recipe, model, {})
            assert not v["decoupled"] and not v["alt_flip"] and not v["freeze_bn_scale"]
            assert (v["bias_lr_scale"], v["lookahead"], v["translate"], v["tta"]) == (1, 0, 0, 0)
    v = recipes.resolve("default", "speedrun", {})
    assert v["label_smoothing"] == 0.2 and v["tta"] == 2 and v["alt_flip"]


def test_a_config_from_before_the_new_options_still_loads():
    config = _config()
    old = {k: v for k, v in config.__dict__.items() if k not in recipes.COMMON or k == "cutout"}
    old["data"] = {}
    restored = TrainConfig.from_dict(old)
    assert restored.lookahead == 0.0 and restored.tta == 0 and not restored.decoupled


def test_tta_views_are_the_image_its_shifts_and_their_mirrors():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views, weights = tta_views(x, 2)
    assert views.shape == (6, 1, 4, 4) and sum(weights) == pytest.approx(1.0)
    assert weights == [0.25, 0.125, 0.125, 0.25, 0.125, 0.125]
    assert torch.equal(views[0], x[0])
    assert torch.equal(views[1, 0, 1:, 1:], x[0, 0, :3, :3])  # shifted down-right by 1 px
    assert torch.equal(views[2, 0, :3, :3], x[0, 0, 1:, 1:])  # up-left
    assert torch.equal(views[3:], views[:3].flip(3))
    assert tta_views(x, 1)[1] == [0.5, 0.5]
    # The shifts are the crops of the 1-px reflect-padded image (airbench's views).
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    assert torch.equal(views[1:3], torch.cat([padded[:, :, :4, :4], padded[:, :, 2:, 2:]]))


def test_tta_averages_the_views_logits():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = torch.rand(4, 3, 8, 8)
    views, weights = tta_views(x, 2)
    with torch.no_grad():
        expected = sum(w * net(v) for w, v in zip(weights, views.split(4), strict=True))
        assert torch.allclose(TTAClassifier(net, 2)(x), expected, atol=1e-6)
        assert torch.allclose(TTAClassifier(net, 0)(x), net(x))


def test_the_exported_tta_graph_matches_torch():
    torch.manual_seed(0)
    net = create_model("speedrun", width=4)
    net.prepare(torch.randn(32, 3, 32, 32))
    net.eval()
    classifier = TTAClassifier(NormalizedClassifier(net, [0.5] * 3, [0.25] * 3), 2)
    head = ExportHead(classifier, Calibrator("temperature", 1.5)).eval()
    model = export_classifier(head, (3, 32, 32), META, 17)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    logits, probs = session.run(None, {"image": x})
    with torch.no_grad():
        expected, expected_probs = head(torch.from_numpy(x))
        plain = NormalizedClassifier(net, [0.5] * 3, [0.25] * 3)(torch.from_numpy(x))
    assert np.abs(logits - expected.numpy()).max() < 1e-4
    assert np.abs(probs - expected_probs.numpy()).max() < 1e-4
    assert np.abs(logits - plain.numpy()).max() > 1e-3  # the views really are in the graph


def test_val_fraction_zero_carves_nothing():
    labels = torch.arange(10).repeat(5)
    kept, held = carve(labels, 0.0, seed=0)
    assert torch.equal(kept, torch.arange(50)) and len(held) == 0
    with pytest.raises(Exception, match="test-fraction"):
        carve(labels, 0.0, seed=0, what="test")


def _train_without_val(tmp_path, cifar_folder, epochs: int, width: int):
    data = DataOptions(
        data_dir=str(cifar_folder), data_root=str(tmp_path / "data"), val_fraction=0.0
    )
    config = TrainConfig.from_recipe(
        "speedrun",
        data,
        model_options={"width": width},
        epochs=epochs,
        batch_size=64,
        device="cpu",
    )
    return fit(config, run_dir=tmp_path / "run").run_dir


def test_val_fraction_zero_trains_on_all_of_train_and_keeps_the_final_weights(
    tmp_path, cifar_folder
):
    run = _train_without_val(tmp_path, cifar_folder, epochs=2, width=4)
    written = json.loads((run / "config.json").read_text())
    assert written["sizes"]["val"] == 0 and written["sizes"]["train"] == 300
    assert written["selection"].startswith("none")
    assert written["prepare_seconds"] > 0
    best, last = Checkpoint.load(run / "best.pt"), Checkpoint.load(run / "last.pt")
    assert best.epoch == 2 and best.best_epoch == 2  # the final weights, no selection
    assert torch.equal(best.state_dict["head.weight"], last.state_dict["head.weight"])
    assert math.isnan(best.metrics["val_acc"])  # no made-up val number


@pytest.mark.slow
def test_speedrun_trains_end_to_end_and_serves_its_tta(tmp_path, cifar_folder):
    run = _train_without_val(tmp_path, cifar_folder, epochs=3, width=8)
    record = evaluate_run(run, device="cpu")
    tta = record["tta"]
    assert tta["level"] == 2 and tta["views"] == 6
    assert tta["accuracy_without"] == pytest.approx(record["accuracy"])
    assert 0.0 <= tta["accuracy"] <= 1.0 and "loss" in tta
    assert record["calibration"]["temperature"] == 1.0  # no val: not calibrated

    report = export_run(run, timing=FAST, tta=True)
    assert report["verification"]["passed"]
    assert report["metadata"]["tta"] == 2
    assert report["metadata"]["val_accuracy"] is None  # no val: JSON null, never NaN
    assert report["metadata"]["test_accuracy"] == pytest.approx(tta["accuracy"])
    assert report["verification"]["torch_accuracy"] == pytest.approx(tta["accuracy"])


def test_a_tta_model_ships_with_its_own_accuracy_and_an_int8_twin(tmp_path, cifar_folder):
    """Packaged for the app, the picker and the card show the served graph's accuracy (with
    its TTA views, not the plain net's), the INT8 twin its own; both load and agree."""
    config = tiny_config(
        cifar_folder,
        tmp_path,
        "speedrun",
        recipe="airbench94",  # every image gets the views (the default recipe's are selective)
        epochs=1,
        lr=None,
        model_options={"width": 4},
    )
    run = fit(config, run_dir=tmp_path / "run").run_dir
    record = evaluate_run(run, device="cpu")
    report = export_run(run, timing=FAST, tta=True, int8=True)
    fp32 = load_model(package_run(run, tmp_path / "artifacts"))
    int8 = load_model(package_run(run, tmp_path / "artifacts", variant="int8"))
    assert int8.folder.name == fp32.folder.name + "-int8"  # beside it, by default

    assert fp32.test_accuracy == pytest.approx(record["tta"]["accuracy"])
    assert int8.test_accuracy == pytest.approx(report["int8"]["accuracy"])
    # The graph serves the views' average: its calibrator was fitted on those val logits.
    served = json.loads((run / "calibration-tta2.json").read_text())
    assert served["tta"] == 2 and fp32.info["calibrator"] == served["calibrator"]
    assert json.loads((run / "calibration.json").read_text())["tta"] == 0  # evaluate's
    shipped = (int8.folder / "model.onnx").read_bytes()
    assert shipped == (run / "export" / "model.int8.onnx").read_bytes()
    card = card_markdown(fp32)
    assert "| test-time augmentation | 6 views (mirror and 1-px shifts) averaged" in card
    assert f"{record['accuracy']:.2%} test accuracy without them" in card
    assert " speedrun int8 · " in int8.label and " speedrun · " in fp32.label
    # Served side by side, the two answer to different Triton names.
    assert triton_name(int8.classifier.metadata) == triton_name(fp32.classifier.metadata) + "_int8"
    int8_card = card_markdown(int8)
    agreement = report["int8"]["top1_agreement_vs_torch"]
    assert f"| INT8 ONNX = torch top-1 | {agreement:.2%} |" in int8_card
    assert "| ONNX = torch top-1 |" not in int8_card  # that is the fp32 file's figure
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a, b = fp32.classifier.predict_arrays(images), int8.classifier.predict_arrays(images)
    assert a.shape == b.shape == (4, 10) and np.allclose(a.sum(1), 1, atol=1e-4)
    batch = fp32.classifier.to_input(images)
    logits = [m.classifier.run_outputs(batch, ["logits"])["logits"] for m in (fp32, int8)]
    # The same model in 8 bits (this 1-epoch net's logits are all within ±1: compare shapes).
    assert np.corrcoef(logits[0].ravel(), logits[1].ravel())[0, 1] > 0.8
    # Each with its own calibrator: the INT8 one fitted on the INT8 model's own val logits.
    assert int8.info["calibrator"] == report["int8"]["calibration"]["fitted"]["calibrator"]
    for served, probs, own in zip((fp32, int8), (a, b), logits, strict=True):
        expected = Calibrator.from_record(served.info).probs(torch.from_numpy(own)).numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert int8.metrics["calibration"] == report["int8"]["calibration"]["test"]

    # A report without an INT8 section (a later plain export beside a stale INT8 file) is
    # refused rather than shipped with another model's figures.
    report_file = run / "export" / "export-report.json"
    plain = {k: v for k, v in json.loads(report_file.read_text()).items() if k != "int8"}
    report_file.write_text(json.dumps(plain))
    with pytest.raises(ToolkitError, match=r"without an INT8 model; run `toolkit export .*--int8`"):
        package_run(run, tmp_path / "artifacts", "stale-int8", variant="int8")
    assert not (tmp_path / "artifacts" / "stale-int8").exists()
    with pytest.raises(ValueError, match="unknown variant 'fp16'"):
        package_run(run, tmp_path / "artifacts", variant="fp16")


def test_a_resumed_speedrun_run_is_exact(tmp_path, cifar_folder):
    """Lookahead EMA (in the optimizer state), the whitening init (only on a new run) and
    the alternating flips all survive a stop after epoch 1: same weights as one go."""
    config = tiny_config(
        cifar_folder,
        tmp_path,
        "speedrun",
        recipe="airbench94",
        epochs=2,
        batch_size=32,
        lr=None,
        model_options={"width": 4},
    )
    assert config.lookahead and config.alt_flip and config.translate
    straight = fit(config, run_dir=tmp_path / "straight").run_dir
    fit_interrupted_in_second_epoch(config, tmp_path / "resumed")
    first = Checkpoint.load(tmp_path / "resumed" / "last.pt")
    assert any("lookahead" in s for s in first.optimizer["state"].values())
    resume(tmp_path / "resumed")
    a = Checkpoint.load(straight / "last.pt")
    b = Checkpoint.load(tmp_path / "resumed" / "last.pt")
    for key, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[key]), key


def test_the_triangle_schedule_rises_to_its_peak_and_falls_to_its_end():
    factor = lr_factor(_config(epochs=10), steps_per_epoch=10)  # 100 steps, peak at 23
    assert factor(0) == pytest.approx(0.2)
    assert factor(23) == pytest.approx(1.0)
    assert factor(100) == pytest.approx(0.07)
    assert factor(11) < factor(12) and factor(60) > factor(61)
