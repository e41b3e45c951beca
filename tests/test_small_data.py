"""Small own datasets must not fail silently: recipes fitted to the data, --balance for
imbalanced folders, the fine-tuning recipe's pieces, and a run at chance reported as such."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from tests.synthetic import write_image_folder
from tests.training import tiny_config
from toolkit.cli import app
from toolkit.data import DataOptions
from toolkit.evaluate.chance import learned_nothing
from toolkit.models import create_model
from toolkit.train.balance import class_weights, sample_weights
from toolkit.train.batches import BatchAugment, epoch_batches
from toolkit.train.config import TrainConfig
from toolkit.train.fit_data import MIN_STEPS, MIN_STEPS_PER_EPOCH, fit_to_data
from toolkit.train.optim import lr_factors, make_optimizer
from toolkit.train.trainer import fit

CLASSES = ("a", "b", "c")


def _recipe(model: str, **flags) -> TrainConfig:
    return TrainConfig.from_recipe(model, DataOptions(), **flags)


# --- recipes fitted to the data --------------------------------------------------------------


def test_a_large_batch_recipe_gets_enough_steps_on_a_small_folder():
    fitted = fit_to_data(_recipe("speedrun", recipe="airbench94"), 405)  # 10 steps of 1024
    assert fitted.batch_size == 405 // MIN_STEPS_PER_EPOCH == 50
    steps = math.ceil(405 / 50)
    assert fitted.epochs == math.ceil(MIN_STEPS / steps) and fitted.epochs * steps >= MIN_STEPS
    assert fitted.fitted_to_data["changed"] == {
        "batch_size": [1024, 50],
        "epochs": [10, fitted.epochs],
    }
    assert "405 training images" in fitted.fitted_to_data["why"]


def test_what_the_flags_set_and_the_seed_recipe_are_kept():
    kept = fit_to_data(_recipe("speedrun", recipe="airbench94", batch_size=512, epochs=3), 405)
    assert (kept.batch_size, kept.epochs, kept.fitted_to_data) == (512, 3, None)
    assert fit_to_data(_recipe("net", recipe="seed"), 405).fitted_to_data is None
    big = fit_to_data(_recipe("speedrun", recipe="airbench94"), 45_000)  # as it was made
    assert (big.batch_size, big.epochs, big.fitted_to_data) == (1024, 10, None)
    # Muon's 8 epochs of batch 2000 are 184 steps on 45,000: under MIN_STEPS, kept all the same.
    muon = fit_to_data(_recipe("speedrun"), 45_000)  # speedrun's default
    assert (muon.batch_size, muon.epochs, muon.fitted_to_data) == (2000, 8, None)


# --- a run that learned nothing --------------------------------------------------------------


def test_chance_level_predictions_are_named():
    labels = torch.arange(3).repeat(40)
    one_class = torch.zeros(120, dtype=torch.long)
    assert "answers 'a' for 100%" in learned_nothing(one_class, labels, CLASSES)
    shuffled = labels[torch.randperm(120, generator=torch.Generator().manual_seed(0))]
    assert "cannot be told from always answering" in learned_nothing(shuffled, labels, CLASSES)
    assert learned_nothing(labels, labels, CLASSES) is None  # perfect
    nearly = labels.clone()
    nearly[:20] = (nearly[:20] + 1) % 3  # 83 % right
    assert learned_nothing(nearly, labels, CLASSES) is None


def test_a_run_at_chance_says_so_in_train_and_evaluate(tmp_path):
    folder = write_image_folder(tmp_path / "photos", CLASSES, {"train": 40, "test": 10}, size=16)
    # A learning rate of (almost) zero: the net keeps its initial answers. Half of train is
    # val, so both val and test have the 30 images an accuracy verdict needs.
    args = [
        *("--data-dir", str(folder), "--data-root", str(tmp_path / "data")),
        *("--device", "cpu", "--val-fraction", "0.5"),
    ]
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "net", "--lr", "1e-12", "--epochs", "1", "--run-dir", str(run), *args]
    )
    assert result.exit_code == 0, result.output
    assert "no sign this model learned anything: on val" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["evaluate", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "no sign this model learned anything: on test" in " ".join(result.output.split())
    record = json.loads((run / "eval" / "metrics.json").read_text())
    assert record["learned_nothing"]


def test_a_run_that_learned_is_not_flagged(trained_run):
    config = json.loads((trained_run / "config.json").read_text())
    assert config["fitted_to_data"] is None  # batch and epochs were given
    from toolkit.evaluate import evaluate_run

    assert evaluate_run(trained_run, device="cpu")["learned_nothing"] is None


# --- --balance -------------------------------------------------------------------------------


def test_class_weights_and_sampling_weights_even_out_the_classes():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)
    weights = class_weights(labels, 4)
    assert weights[:3].tolist() == pytest.approx([100 / 270, 100 / 27, 100 / 3])
    assert weights[3] == 0  # a class with no training image
    assert (weights[:3] * labels.bincount()).tolist() == pytest.approx([100 / 3] * 3)
    draws = epoch_batches(100, 100, torch.Generator().manual_seed(0), 1, sample_weights(labels, 3))
    drawn = labels[torch.cat(draws)].bincount(minlength=3)
    assert drawn.min() > 20  # about a third each, where plain order gives class 2 one image


@pytest.mark.parametrize("balance", ["weights", "sampler"])
def test_balance_is_recorded_and_trains(balance, tmp_path):
    folder = write_image_folder(
        tmp_path / "skewed", CLASSES, {"train": 30, "test": 6}, size=16
    )  # then thinned: 30 / 10 / 4 training images
    for name, keep in (("b", 10), ("c", 4)):
        for extra in sorted((folder / "train" / name).iterdir())[keep:]:
            extra.unlink()
    config = tiny_config(folder, tmp_path / "data", balance=balance, epochs=1)
    run = fit(config, run_dir=tmp_path / "run").run_dir
    assert json.loads((run / "config.json").read_text())["balance"] == balance


def test_an_unknown_balance_is_refused():
    with pytest.raises(Exception, match="unknown --balance 'classes'"):
        _recipe("net", balance="classes")


# --- the fine-tuning recipe's pieces ---------------------------------------------------------


def test_resized_crops_stay_inside_the_image_and_cover_the_asked_area():
    generator = torch.Generator().manual_seed(0)
    params = BatchAugment.draw(500, (32, 32), generator, True, 0, resized_crop=0.35)
    width, height, cx, cy = params.box.unbind(1)
    assert (width * height).min() >= 0.35 * 0.99 and (width * height).max() <= 1.0
    assert ((cx.abs() + width) <= 1 + 1e-6).all() and ((cy.abs() + height) <= 1 + 1e-6).all()
    assert params.dy is None  # replaces the padded crop
    # The whole image at aspect 1 is the image itself.
    whole = BatchAugment(box=torch.tensor([[1.0, 1.0, 0.0, 0.0]]), pad=0)
    image = torch.rand(1, 3, 8, 8)
    assert torch.allclose(whole.apply(image), image, atol=1e-5)


def test_the_head_trains_alone_first_and_the_backbone_slower():
    # The recipe's own values were chosen on val (benchmarks/finetune_values.md).
    shipped = _recipe("timm/test_resnet", recipe="finetune", epochs=3)
    assert (shipped.freeze_epochs, shipped.backbone_lr_scale, shipped.lr) == (0, 1.0, 1e-3)
    config = _recipe(
        "timm/test_resnet", recipe="finetune", epochs=3, freeze_epochs=1, backbone_lr_scale=0.1
    )
    net = create_model("timm/test_resnet", num_classes=3, input_size=32)
    optimizer = make_optimizer(config, net)
    body, head = optimizer.param_groups
    assert head.get("head") and {id(p) for p in head["params"]} == {
        id(net.fc.weight),
        id(net.fc.bias),
    }
    assert body["lr"] == pytest.approx(config.lr * 0.1) and head["lr"] == config.lr
    body_factor, head_factor = lr_factors(config, 10, optimizer)
    assert body_factor(5) == 0 and head_factor(5) > 0  # epoch 1: the head alone
    assert body_factor(15) == head_factor(15) > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resized-crop", "1.5"], "--resized-crop must be in [0, 1] (0: off), got 1.5"),
        (["--freeze-epochs", "3"], "--freeze-epochs must be at least 0 and less than --epochs (3)"),
        (["--backbone-lr-scale", "0"], "--backbone-lr-scale must be positive, got 0.0"),
        (["--balance", "classes"], "unknown --balance 'classes'; choose one of: none, weights"),
        (["--image-size", "160x"], "--image-size must be N or WIDTHxHEIGHT"),
    ],
)
def test_bad_fine_tuning_options_are_one_line_and_exit_2(flags, message, tmp_path):
    result = CliRunner().invoke(
        app, ["train", "net", "--epochs", "3", "--data-root", str(tmp_path), *flags]
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
