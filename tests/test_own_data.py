"""Your own images in: any class-folder tree, classes.txt split files, carved test splits,
class counts, memory-mapped decoding and fine-tuning with --init-from."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.synthetic import CIFAR_CLASSES, class_images, write_image_folder, write_split_files
from tests.training import tiny_config
from toolkit.data import DATASETS, DataOptions, MappedImages, load_data
from toolkit.errors import ToolkitError
from toolkit.models import create_model
from toolkit.train import fit
from toolkit.train.batches import epoch_batches
from toolkit.train.warm_start import load_matching_weights

FRUIT = ("pear", "apple", "plum")  # not sorted: the dataset's class order is
TWELVE = tuple(f"kind-{c}" for c in "abcdefghijkl")


def write_mixed_tree(root: Path, classes=FRUIT, per_class: int = 12) -> Path:
    """train/<class>/ only, no test/: PNG and JPEG files of odd sizes and modes."""
    for label, name in enumerate(classes):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i, array in enumerate(class_images(label, per_class, 24 + 7 * label, seed=label)):
            image = Image.fromarray(array)
            if i % 3 == 0:
                image.resize((40, 20)).save(folder / f"{i}.jpg", quality=90)
            elif i % 3 == 1:
                image.convert("L").save(folder / f"{i}.png")
            else:
                image.save(folder / f"{i}.png")
    return root


def options(root: Path, tmp_path: Path, **more) -> DataOptions:
    return DataOptions(data_dir=str(root), data_root=str(tmp_path / "cache"), **more)


def test_any_class_names_sorted_with_test_and_val_carved(tmp_path):
    root = write_mixed_tree(tmp_path / "fruit")
    data = load_data(options(root, tmp_path), seed=0)
    assert data.spec.name == "fruit" and not data.spec.official
    assert data.spec.classes == ("apple", "pear", "plum")  # sorted, as torchvision does
    assert data.train.images.shape[1:] == (3, 32, 32)  # any size and mode -> RGB at 32 px
    assert data.test_is_carved and data.val_is_carved
    counts = data.class_counts()
    # stratified: every class in every split; nothing lost, nothing counted twice
    assert all(n >= 1 for split in counts.values() for n in split.values())
    assert sum(sum(split.values()) for split in counts.values()) == 3 * 12
    assert data.info()["classes"] == ["apple", "pear", "plum"]
    assert data.info()["test_is_carved"] is True


def test_the_carved_test_split_does_not_follow_the_seed_but_val_does(tmp_path):
    root = write_mixed_tree(tmp_path / "fruit", per_class=20)
    first, second = (load_data(options(root, tmp_path), seed=s) for s in (0, 1))
    assert torch.equal(first.test.images, second.test.images)
    assert not torch.equal(first.val.images, second.val.images)
    pixels = lambda split: {bytes(x.numpy()) for x in split.images}  # noqa: E731
    for data in (first, second):
        assert not pixels(data.test) & (pixels(data.train) | pixels(data.val))


def test_twelve_classes_train_end_to_end_with_their_names(tmp_path):
    root = write_image_folder(
        tmp_path / "twelve", classes=TWELVE, per_class={"train": 8, "test": 2}, size=20
    )
    config = tiny_config(root, tmp_path / "cache", epochs=1)
    result = fit(config, run_dir=tmp_path / "run")
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["dataset_info"]["classes"] == list(TWELVE)
    assert saved["dataset_info"]["name"] == "twelve"
    assert saved["test_is_carved"] is False and saved["val_is_carved"] is True
    assert saved["class_counts"]["test"] == {name: 2 for name in TWELVE}
    assert sum(saved["class_counts"]["train"].values()) == saved["sizes"]["train"]
    ckpt = torch.load(result.run_dir / "best.pt", weights_only=True)
    assert ckpt["model"]["num_classes"] == 12


def test_exactly_the_cifar10_names_keep_cifar10(tmp_path):
    root = write_image_folder(tmp_path / "mine", per_class={"train": 3, "test": 1}, size=16)
    assert load_data(options(root, tmp_path)).spec is DATASETS["cifar10"]
    subset = write_image_folder(
        tmp_path / "pets", classes=("dog", "cat"), per_class={"train": 4, "test": 1}, size=16
    )
    spec = load_data(options(subset, tmp_path)).spec
    assert spec.name == "pets" and spec.classes == ("cat", "dog")


def test_a_folder_named_like_an_official_dataset_with_other_classes_is_not_it(tmp_path):
    root = write_image_folder(
        tmp_path / "cifar10", classes=FRUIT, per_class={"train": 4, "test": 1}, size=16
    )
    assert load_data(options(root, tmp_path)).spec.name == "cifar10-folder"


def test_a_class_too_small_to_carve_is_named_with_its_count(tmp_path):
    root = write_mixed_tree(tmp_path / "fruit")
    for extra in sorted((root / "train" / "plum").iterdir())[1:]:
        extra.unlink()
    with pytest.raises(ToolkitError, match=r"'plum' has 1 \(each class needs at least 3\)"):
        load_data(options(root, tmp_path))


def test_one_class_and_unknown_test_classes_are_clear_errors(tmp_path):
    one = write_image_folder(tmp_path / "one", classes=("cat",), per_class={"train": 4})
    with pytest.raises(ToolkitError, match="1 class.*at least 2"):
        load_data(options(one, tmp_path))
    root = write_image_folder(tmp_path / "f", classes=FRUIT, per_class={"train": 4, "test": 1})
    (root / "test" / "kiwi").mkdir()
    with pytest.raises(ToolkitError, match="class folders that train/ has not: kiwi"):
        load_data(options(root, tmp_path))


def test_split_files_name_their_classes_in_classes_txt(tmp_path):
    names = ("zebra", "ant", "moth")  # line order is label order, not sorted
    root = write_split_files(
        tmp_path / "s", classes=names, per_class={"train": 6, "test": 2}, size=16
    )
    (root / "classes.txt").write_text("# one per line\n" + "\n".join(names) + "\n")
    data = load_data(DataOptions(splits=str(root), data_root=str(tmp_path / "c")))
    assert data.spec.classes == names and data.spec.name == "s"
    assert data.class_counts()["test"] == {"zebra": 2, "ant": 2, "moth": 2}
    (root / "classes.txt").write_text("zebra\nant\nzebra\n")
    with pytest.raises(ToolkitError, match="repeats the class name.*zebra"):
        load_data(DataOptions(splits=str(root), data_root=str(tmp_path / "c")))


def test_past_the_memory_budget_images_stay_on_disk_and_give_the_same_batches(tmp_path):
    root = write_mixed_tree(tmp_path / "fruit", per_class=20)
    in_memory = load_data(options(root, tmp_path / "a"), seed=3)
    mapped = load_data(options(root, tmp_path / "b", memory_gb=1e-6), seed=3)
    assert isinstance(mapped.train.images, MappedImages)
    assert not isinstance(in_memory.train.images, MappedImages)
    assert mapped.fingerprint == in_memory.fingerprint
    np.testing.assert_allclose(mapped.mean, in_memory.mean, rtol=1e-12)
    generator = torch.Generator().manual_seed(0)
    for batch in epoch_batches(len(in_memory.train), 7, generator):
        assert torch.equal(mapped.train.images[batch], in_memory.train.images[batch])
    for split in ("val", "test"):
        assert torch.equal(getattr(mapped, split).images[:], getattr(in_memory, split).images)
    again = load_data(options(root, tmp_path / "b", memory_gb=1e-6), seed=3)  # from the cache
    assert isinstance(again.train.images, MappedImages)
    assert torch.equal(again.train.images[:], in_memory.train.images)


def test_training_on_mapped_images_is_the_same_run(tmp_path):
    root = write_mixed_tree(tmp_path / "fruit", per_class=20)
    runs = []
    for name, budget in (("ram", None), ("disk", 1e-6)):
        config = tiny_config(root, tmp_path / name, epochs=2, batch_size=8)
        config = replace(config, data=options(root, tmp_path / name, memory_gb=budget))
        runs.append(fit(config, run_dir=tmp_path / f"run-{name}"))
    rows = [json.loads((r.run_dir / "config.json").read_text())["sizes"] for r in runs]
    assert rows[0] == rows[1]
    assert runs[0].best_val_acc == runs[1].best_val_acc
    first, second = (torch.load(r.run_dir / "last.pt", weights_only=True) for r in runs)
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key


# --- fine-tuning --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("source")
    folder = write_image_folder(base / "data", per_class={"train": 6, "test": 1}, size=16)
    config = tiny_config(folder, base / "cache", epochs=1)
    return fit(config, run_dir=base / "run").run_dir


def test_init_from_another_class_count_loads_the_body_and_a_fresh_head(tmp_path, cifar_run):
    root = write_mixed_tree(tmp_path / "fruit")
    config = tiny_config(root, tmp_path / "cache", epochs=1, init_from=str(cifar_run))
    result = fit(config, run_dir=tmp_path / "tuned")
    record = json.loads((result.run_dir / "config.json").read_text())["initialised_from"]
    assert record["checkpoint"] == str((cifar_run / "best.pt").resolve())
    assert record["classes"] == list(CIFAR_CLASSES) and record["dataset"] == "cifar10"
    assert record["fresh"] == ["9.bias", "9.weight"]  # net's last Linear: the class head
    source = torch.load(cifar_run / "best.pt", weights_only=True)["state_dict"]
    tuned_shapes = torch.load(result.run_dir / "best.pt", weights_only=True)["state_dict"]
    assert record["loaded"] == len(source) - 2 and record["head"] == "fresh (other classes)"
    assert all(tuned_shapes[k].shape == v.shape for k, v in source.items() if k[0] != "9")


def test_init_from_the_same_classes_loads_every_tensor(cifar_run):
    net = create_model("net", num_classes=10, input_size=32, in_channels=3)
    record = load_matching_weights(net, cifar_run / "best.pt", "net", list(CIFAR_CLASSES))
    assert record["fresh"] == [] and record["loaded"] == len(net.state_dict())
    source = torch.load(cifar_run / "best.pt", weights_only=True)["state_dict"]
    for key, value in net.state_dict().items():
        assert torch.equal(value, source[key])


def test_ten_other_classes_get_a_fresh_head_though_its_shape_fits(cifar_run):
    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    torch.manual_seed(0)
    net = create_model("net", num_classes=10, input_size=32, in_channels=3)
    fresh_head = net.state_dict()["9.weight"].clone()
    record = load_matching_weights(net, cifar_run, "net", digits)
    assert record["fresh"] == ["9.bias", "9.weight"] and record["head"].startswith("fresh")
    assert torch.equal(net.state_dict()["9.weight"], fresh_head)


def test_init_from_a_foreign_architecture_is_one_clear_error(tmp_path, cifar_run):
    net = create_model("lenet5", num_classes=3, input_size=16, in_channels=3)
    with pytest.raises(ToolkitError, match="is a net checkpoint and this run trains lenet5"):
        load_matching_weights(net, cifar_run, "lenet5", list(FRUIT))
    with pytest.raises(ToolkitError, match="not found"):
        load_matching_weights(net, tmp_path / "nowhere", "lenet5", list(FRUIT))


def test_the_served_app_shows_a_custom_models_class_names(tmp_path):
    from serving.answer import classify
    from serving.catalog import load_catalog
    from toolkit.evaluate import evaluate_run
    from toolkit.export import export_run
    from toolkit.export.bench import Timing
    from toolkit.export.package import package_run

    root = write_mixed_tree(tmp_path / "fruit")
    run = fit(tiny_config(root, tmp_path / "cache", epochs=1), run_dir=tmp_path / "run").run_dir
    evaluate_run(run, device="cpu")
    export_run(run, timing=Timing(warmup=1, min_runs=2, max_runs=2, budget_s=0.0))
    package_run(run, tmp_path / "artifacts", "fruit-net")
    served = load_catalog(tmp_path / "artifacts").get("fruit-net")
    assert served.dataset == "fruit"
    assert list(served.classifier.classes) == ["apple", "pear", "plum"]
    label, _ = classify(served, next((root / "train" / "pear").iterdir()), "pear.png", k=3)
    assert {c["label"] for c in label["confidences"]} == {"apple", "pear", "plum"}


def test_a_run_from_before_test_carving_is_refused_an_unhonest_test_split(tmp_path):
    import dataclasses

    from toolkit.run.checkpoint import Checkpoint
    from toolkit.run.state import check_run_data

    root = write_mixed_tree(tmp_path / "fruit")
    run = fit(tiny_config(root, tmp_path / "cache", epochs=1), run_dir=tmp_path / "run").run_dir
    ckpt = Checkpoint.load(run / "best.pt")
    data = load_data(DataOptions(**ckpt.config["data"]), seed=0)
    check_run_data(run, ckpt, data)  # a run that knew of the carve is fine
    old = dict(ckpt.dataset)
    del old["test_is_carved"]  # what a checkpoint from before carving holds
    with pytest.raises(ToolkitError, match="no honest test split is left; add a test/ folder"):
        check_run_data(run, dataclasses.replace(ckpt, dataset=old), data)
