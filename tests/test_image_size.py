"""Non-square image sizes (--image-size 48x32) from the flag to the served model: the crop
keeps the model's shape everywhere an image is prepared."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from serving.classifier import OnnxClassifier
from serving.preprocess import PREPROCESSING, Resize, center_crop, prepare
from tests.synthetic import class_images
from toolkit.cli import app
from toolkit.data.specs import parse_size, size_label
from toolkit.errors import ToolkitError
from toolkit.models import MODELS, create_model

CLASSES = ("left", "right")


@pytest.mark.parametrize(
    ("given", "height_width"),
    [(96, (96, 96)), ("96", (96, 96)), ("160x128", (128, 160)), ("160 x 128", (128, 160))],
)
def test_sizes_read_as_width_by_height(given, height_width):
    assert parse_size(given) == height_width
    assert parse_size(list(height_width)) == height_width  # what checkpoints record


@pytest.mark.parametrize("bad", ["160x", "x128", "big", "1.5x2"])
def test_a_malformed_size_is_one_line(bad):
    with pytest.raises(ToolkitError, match="WIDTHxHEIGHT"):
        parse_size(bad)


def test_the_crop_keeps_the_models_shape_and_squares_are_as_before():
    image = Image.new("RGB", (200, 100))
    assert center_crop(image).size == (100, 100)
    assert center_crop(image, 160 / 128).size == (125, 100)
    assert center_crop(Image.new("RGB", (100, 200)), 2.0).size == (100, 50)
    assert prepare(image, (32, 48)).shape == (32, 48, 3)
    assert Resize((32, 32)).rules()["crop"] == "center-square"
    assert Resize((32, 48)).rules()["crop"] == "center-aspect"
    assert size_label((32, 48)) == "48x32" and size_label((32, 32)) == "32"


def test_a_crop_fraction_keeps_the_centre_then_resizes_with_the_named_filter():
    """timm's crop_pct: 0.5 of a 40x40 image keeps its centred 20x20, which a 20 px model
    then takes unresized; the filter changes the pixels of an image that is resized."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    assert np.array_equal(prepare(image, Resize((20, 20), crop_fraction=0.5)), pixels[10:30, 10:30])
    bilinear, bicubic = prepare(image, 16), prepare(image, Resize((16, 16), "bicubic"))
    assert not np.array_equal(bilinear, bicubic)
    assert np.array_equal(bicubic, np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC)))


def test_resize_rules_round_trip_and_unknown_ones_are_refused():
    resize = Resize((32, 48), "bicubic", 0.875)
    rules = json.loads(json.dumps(resize.rules()))  # as the metadata stores them
    assert Resize.from_rules((32, 48), rules) == resize
    assert Resize((32, 32)).rules() == PREPROCESSING  # what every model before recorded
    assert "crop_fraction" not in Resize((32, 32)).rules()
    for changed in ({"resize": "area"}, {"crop": "border"}, {"extra": 1}, {"crop_fraction": 0}):
        with pytest.raises(ValueError):
            Resize.from_rules((32, 48), {**rules, **changed})


@pytest.mark.parametrize(
    ("flags", "says"), [({"interpolation": "area"}, "area"), ({"crop_fraction": 0.0}, "(0, 1]")]
)
def test_a_wrong_resize_flag_is_one_line(flags, says):
    from toolkit.data import DataOptions

    with pytest.raises(ToolkitError, match=re.escape(says)):
        DataOptions(**flags)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_own_model_builds_for_a_non_square_size(name):
    import torch

    net = create_model(name, num_classes=3, input_size=(32, 48))
    assert net.eval()(torch.zeros(2, 3, 32, 48)).shape == (2, 3)


def _wide_photos(root):
    """Two classes of 60x40 JPEGs (landscape): 16 train and 6 test each."""
    for split, count in (("train", 16), ("test", 6)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, square in enumerate(class_images(label, count, 60, seed=len(split))):
                Image.fromarray(square[:40]).save(folder / f"{i}.jpg")
    return root


def test_a_non_square_run_trains_exports_and_serves(tmp_path):
    photos = _wide_photos(tmp_path / "photos")
    run = tmp_path / "run"
    common = ["--data-root", str(tmp_path / "data"), "--device", "cpu"]
    train = ["train", "net", "--data-dir", str(photos), "--image-size", "48x32", "--epochs", "2"]
    result = CliRunner().invoke(app, [*train, "--run-dir", str(run), *common])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["image_size"] == "48x32"
    assert config["dataset_info"]["image_size"] == [32, 48]
    result = CliRunner().invoke(app, ["export", str(run)])
    assert result.exit_code == 0, result.output
    meta = json.loads((run / "export" / "model.json").read_text())
    assert meta["input_size"] == [32, 48] and meta["preprocessing"]["crop"] == "center-aspect"
    served = OnnxClassifier(run / "export" / "model.onnx")
    assert served.input_size == (32, 48)
    with Image.open(next((photos / "test" / "right").iterdir())) as photo:
        assert served.preprocess(photo).shape == (3, 32, 48)
        probs = served.predict([photo])
    assert probs.shape == (1, 2) and np.isclose(probs.sum(), 1.0, atol=1e-5)
