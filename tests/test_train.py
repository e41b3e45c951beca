"""Training: the run folder, exact resume, recipes, augmentation, divergence."""

import json

import pytest
import torch

from tests.training import fit_interrupted_in_second_epoch, tiny_config
from toolkit.data import DataOptions, Split, load_data
from toolkit.errors import ToolkitError
from toolkit.models import MODELS
from toolkit.options import declared
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import read_metrics
from toolkit.run.state import best_row
from toolkit.train import recipes
from toolkit.train.batches import BatchAugment, Normalizer
from toolkit.train.config import TrainConfig
from toolkit.train.optim import lr_factor
from toolkit.train.trainer import fit, resume


def test_run_folder_has_everything(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "metrics.csv", "train.log", "best.pt", "last.pt", "tensorboard"} <= names
    config = json.loads((trained_run / "config.json").read_text())
    assert config["model"] == "net" and config["num_params"] == 18_354
    assert config["dataset_info"]["classes"][0] == "airplane"
    assert config["sizes"] == {"train": 270, "val": 30, "test": 100}
    rows = read_metrics(trained_run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["val_acc"] > 0.5  # the synthetic classes are easy: far above 10 %
    assert any((trained_run / "tensorboard").iterdir())
    assert "epoch 4" in (trained_run / "train.log").read_text()


def test_checkpoint_rebuilds_the_model_with_weights_only(trained_run):
    raw = torch.load(trained_run / "best.pt", weights_only=True)  # no pickle code execution
    ckpt = Checkpoint.load(trained_run / "best.pt")
    assert raw["epoch"] == ckpt.best_epoch == ckpt.epoch
    net = ckpt.build_net()
    bundle = load_data(DataOptions(**json.loads((trained_run / "config.json").read_text())["data"]))
    normalize = Normalizer(ckpt.dataset["mean"], ckpt.dataset["std"], torch.device("cpu"))
    with torch.no_grad():
        acc = (net(normalize(bundle.val.images)).argmax(1) == bundle.val.labels).float().mean()
    assert acc.item() == pytest.approx(ckpt.best_val_acc)


def test_a_checkpoint_round_trips_through_its_bytes(trained_run, tmp_path):
    ckpt = Checkpoint.load(trained_run / "last.pt")
    (tmp_path / "copy.pt").write_bytes(ckpt.to_bytes())
    again = Checkpoint.load(tmp_path / "copy.pt")
    assert again.history == ckpt.history and again.config == ckpt.config
    assert all(torch.equal(again.state_dict[k], v) for k, v in ckpt.state_dict.items())


def test_resume_is_exact(cifar_folder, tmp_path):
    """2 epochs in one go == 1 epoch, stop, resume for the second (CPU, deterministic)."""
    config = tiny_config(
        cifar_folder, tmp_path, epochs=2, augment=True, model_options={"dropout": 0.2}
    )
    straight = fit(config, run_dir=tmp_path / "straight").run_dir
    fit_interrupted_in_second_epoch(config, tmp_path / "resumed")
    resumed = resume(tmp_path / "resumed")
    assert resumed.epochs_done == 2

    a = Checkpoint.load(straight / "last.pt")
    b = Checkpoint.load(tmp_path / "resumed" / "last.pt")
    for key, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[key]), key
    assert (
        read_metrics(straight)[1]["train_loss"]
        == read_metrics(tmp_path / "resumed")[1]["train_loss"]
    )


def test_best_checkpoint_is_the_best_val_epoch(trained_run):
    rows = read_metrics(trained_run)
    best = max(rows, key=lambda r: r["val_acc"])
    assert Checkpoint.load(trained_run / "best.pt").epoch == best["epoch"]


def test_the_best_epoch_is_the_first_with_the_highest_val_accuracy():
    """One rule for fit (which epoch best.pt holds) and reproduce (reading metrics.csv): a
    run stuck at 0 % still has a best epoch, its first, so its best.pt is evaluated."""
    rows = [{"epoch": e, "val_acc": acc} for e, acc in [(1, 0.0), (2, 0.0), (3, 0.0)]]
    assert best_row(rows)["epoch"] == 1
    rows += [{"epoch": 4, "val_acc": 0.5}, {"epoch": 5, "val_acc": 0.5}]
    assert best_row(rows)["epoch"] == 4
    assert best_row([]) is None


def test_every_recipe_sets_exactly_the_fields_declared_as_recipe_options():
    expected = {o.name for o in declared(TrainConfig) if o.flag.recipe}
    for recipe in recipes.RECIPES:
        for model in MODELS:
            if recipe in recipes.SPEEDRUN_RECIPES and model != "speedrun":
                continue  # one model's recipes (a clear error elsewhere: test_muon)
            assert set(recipes.resolve(recipe, model, {})) == expected, (recipe, model)


def test_divergence_names_the_epoch_and_last_good_checkpoint(cifar_folder, tmp_path):
    config = tiny_config(cifar_folder, tmp_path, lr=1e6, schedule="none", epochs=3)
    with pytest.raises(ToolkitError, match=r"diverged in epoch \d.*last.pt"):
        fit(config, run_dir=tmp_path / "run")


def test_seed_recipe_is_the_reference():
    net = recipes.resolve("seed", "net", {})
    assert (net["optimizer"], net["lr"], net["batch_size"], net["epochs"]) == ("sgd", 1e-2, 64, 300)
    assert not net["augment"] and net["momentum"] == 0 and net["schedule"] == "none"
    assert recipes.resolve("seed", "resnet10", {})["lr"] == 3e-3
    lenet = recipes.resolve("seed", "lenet5", {"l2": 0.01})
    assert (lenet["optimizer"], lenet["lr"], lenet["batch_size"], lenet["epochs"]) == (
        "adam",
        1e-3,
        128,
        100,
    )
    assert (lenet["schedule"], lenet["step_size"], lenet["gamma"], lenet["l2"]) == (
        "step",
        20,
        0.5,
        0.01,
    )


def test_explicit_flags_override_the_recipe_and_bad_values_are_refused():
    assert recipes.resolve("default", "net", {"epochs": 3, "lr": None})["epochs"] == 3
    with pytest.raises(ToolkitError, match="onecycle"):
        recipes.resolve("default", "net", {"schedule": "exponential"})
    with pytest.raises(ToolkitError, match="seed"):
        recipes.resolve("fast", "net", {})


def test_step_schedule_halves_every_step_size_epochs():
    config = TrainConfig.from_recipe(
        "lenet5", DataOptions(), schedule="step", step_size=20, gamma=0.5, epochs=100
    )
    factor = lr_factor(config, steps_per_epoch=10)
    assert [factor(e * 10) for e in (0, 19, 20, 40, 99)] == [1, 1, 0.5, 0.25, 0.5**4]


def test_onecycle_warms_up_then_anneals_to_zero():
    config = TrainConfig.from_recipe("net", DataOptions(), schedule="onecycle", epochs=4)
    factor = lr_factor(config, steps_per_epoch=25)
    values = [factor(s) for s in range(100)]
    assert values.index(max(values)) == 25 and max(values) == 1.0
    assert values[0] < 0.1 and values[-1] < 0.02


def test_batch_augmentation_crops_and_flips_but_keeps_content():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    generator = torch.Generator().manual_seed(0)

    def random_crop_flip(batch):
        params = BatchAugment.draw(len(batch), batch.shape[-2:], generator, True, 0)
        return params.apply(batch)

    out = random_crop_flip(images)
    assert out.shape == images.shape
    # every output row is a (possibly flipped) window of the reflect-padded input row
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4), mode="reflect")
    for n in range(2):
        for row in out[n, 0]:
            windows = padded[n, 0].unfold(1, 8, 1).reshape(-1, 8)
            assert any(torch.equal(row, w) or torch.equal(row.flip(0), w) for w in windows)
    # over many draws both flips and several offsets happen
    flips, shifts = set(), set()
    for _ in range(40):
        one = random_crop_flip(images[:1])[0, 0]
        flips.add(bool(one[0, 0] > one[0, -1]))
        shifts.add(float(one.mean()))
    assert flips == {True, False} and len(shifts) > 5


def test_data_path_without_augmentation_is_the_plain_tensor_pipeline():
    """In-memory batches equal the per-image ToTensor + Normalize pipeline."""
    from torchvision.transforms import functional as TF

    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ours = Normalizer(mean, std, torch.device("cpu"))(images)
    reference = torch.stack(
        [TF.normalize(TF.to_tensor(img.permute(1, 2, 0).numpy()), mean, std) for img in images]
    )
    assert torch.allclose(ours, reference, atol=1e-6)


def test_training_labels_are_untouched_by_augmentation(cifar_folder, tmp_path):
    bundle = load_data(DataOptions(data_dir=str(cifar_folder), data_root=str(tmp_path)))
    split = Split(bundle.train.images.clone(), bundle.train.labels.clone())
    fit(tiny_config(cifar_folder, tmp_path, epochs=1), run_dir=tmp_path / "r", data=bundle)
    assert torch.equal(split.labels, bundle.train.labels)
    assert torch.equal(split.images, bundle.train.images)


def test_unwritable_run_folder_fails_before_training(cifar_folder, tmp_path):
    target = tmp_path / "file-not-folder"
    target.write_text("x")
    with pytest.raises(ToolkitError, match="cannot write to run folder"):
        fit(tiny_config(cifar_folder, tmp_path), run_dir=target / "run")


def test_a_short_default_run_trains_without_augmentation():
    """--epochs 3 or less: no crop + flip (chosen on val, see recipes.SHORT_RUN_EPOCHS);
    --augment still forces them, and the seed recipe and longer runs keep theirs."""
    assert recipes.resolve("default", "net", {})["augment"]
    assert not recipes.resolve("default", "net", {"epochs": recipes.SHORT_RUN_EPOCHS})["augment"]
    assert recipes.resolve("default", "net", {"epochs": 4})["augment"]
    assert recipes.resolve("default", "net", {"epochs": 2, "augment": True})["augment"]
    config = TrainConfig.from_options("net", epochs=2)
    assert not config.augment and "--no-augment" not in config.command_flags()


def test_a_short_default_sgd_run_peaks_higher():
    """--epochs 3 or less: twice the recipe's lr (chosen on val, recipes.SHORT_RUN_EPOCHS);
    --lr still wins, and longer runs, other recipes, AdamW and other schedules keep theirs."""

    def lr(model="net", recipe="default", **overrides):
        return recipes.resolve(recipe, model, overrides)["lr"]

    assert lr() == 0.05 and lr(epochs=recipes.SHORT_RUN_EPOCHS + 1) == 0.05
    assert lr(epochs=recipes.SHORT_RUN_EPOCHS) == lr(epochs=1) == 0.1
    assert lr("mlp", epochs=2) == 0.02
    assert lr(epochs=2, lr=0.03) == 0.03
    assert lr(recipe="seed", epochs=2) == 0.01
    assert lr("resnet10", epochs=2) == 3e-3  # AdamW: not measured, left alone
    assert lr(epochs=2, optimizer="adamw") == lr(epochs=2, schedule="cosine") == 0.05
    assert lr("resnet9", epochs=2) == 0.4  # its warm-up and linear decay: not measured
    assert TrainConfig.from_options("net", epochs=2).lr == 0.1


def test_the_default_recipe_trains_the_small_cnns_filters_with_muon():
    """net, net2 and lenet5, short runs or long: Muon for the conv filters at the values
    chosen on val (benchmarks/small_muon.md); --optimizer and --muon-* still win, other
    models and recipes keep theirs."""

    def chosen(model="net", recipe="default", **overrides):
        values = recipes.resolve(recipe, model, overrides)
        return values["optimizer"], values["muon_lr"], values["muon_momentum"]

    muon = ("muon", 0.05, 0.8)
    assert chosen(epochs=recipes.SHORT_RUN_EPOCHS) == chosen("lenet5", epochs=1) == muon
    assert chosen("net2", epochs=2) == chosen() == chosen("lenet5", epochs=30) == muon
    assert chosen("mlp", epochs=2)[0] == chosen("resnet9", epochs=2)[0] == "sgd"  # not measured
    assert chosen("resnet10", epochs=2)[0] == "adamw"
    assert chosen(recipe="seed", epochs=2)[0] == chosen(recipe="seed")[0] == "sgd"
    assert chosen(epochs=2, optimizer="sgd")[0] == chosen(optimizer="sgd")[0] == "sgd"
    assert chosen(epochs=2, muon_lr=0.1) == ("muon", 0.1, 0.8)
    config = TrainConfig.from_options("net", epochs=2)
    assert config.optimizer == "muon" and "--optimizer" not in " ".join(config.command_flags())
