"""serving/ without a server: preprocessing parity with toolkit, the classifier against toolkit's
own evaluation, hostile uploads, and the artifacts checks that guard startup.

The artifacts come from the real pipeline: trained run -> evaluate_run -> export_run ->
package_run, for a CIFAR-10 model (the conftest run) and an STL-10 model trained here on
synthetic split files at 96 px (served at 32 px, so the resize path is exercised too).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.catalog import Catalog, load_catalog
from serving.classifier import ArtifactError, OnnxClassifier, default_providers
from serving.preprocess import prepare
from serving.uploads import MAX_PIXELS, ImageError, open_upload
from tests.served import EXAMPLES_PER_CLASS, png_claiming, truncated
from tests.synthetic import STL10_CLASSES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def catalog(served_artifacts) -> Catalog:
    return load_catalog(served_artifacts)


def broken_copy(served_artifacts: Path, tmp_path: Path) -> Path:
    """A private copy of the artifacts to damage."""
    return shutil.copytree(served_artifacts, tmp_path / "artifacts")


# --- images with every awkward property --------------------------------------------------------


def _noise(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Smooth-ish colourful H×W×3 uint8 picture (noise alone hides resize differences less)."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _exif_rotated_jpeg(path: Path) -> None:
    image = Image.fromarray(_noise((40, 70), 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise on display
    image.save(path, "JPEG", quality=95, exif=exif.tobytes())


def _write_variants(folder: Path) -> dict[str, Path]:
    """One file per awkward case the training and upload decode paths must agree on."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _noise((48, 48))
    rgba = np.dstack([rgb, np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (48, 1))])
    grey16 = (np.add.outer(np.arange(50), np.arange(60)) * 600).astype(np.uint16)
    cases = {
        "grey.png": Image.fromarray(rgb[..., 0], "L"),
        "rgba.png": Image.fromarray(rgba, "RGBA"),
        "la.png": Image.fromarray(rgba[..., [0, 3]], "LA"),
        "palette.png": Image.fromarray(rgb).quantize(64),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "grey16.png": Image.fromarray(grey16),  # uint16 -> mode I;16
        "wide.png": Image.fromarray(_noise((30, 90), 1)),
        "tall.jpg": Image.fromarray(_noise((100, 37), 2)),
        "bilevel.png": Image.fromarray(rgb[..., 1] > 128),
        "small.bmp": Image.fromarray(_noise((12, 12), 4)),
    }
    paths = {}
    for name, image in cases.items():
        image.save(folder / name)
        paths[name] = folder / name
    transparent = Image.fromarray(rgb).quantize(16)
    transparent.info["transparency"] = 0
    transparent.save(folder / "palette-transparent.png", transparency=0)
    paths["palette-transparent.png"] = folder / "palette-transparent.png"
    _exif_rotated_jpeg(folder / "exif-rotated.jpg")
    paths["exif-rotated.jpg"] = folder / "exif-rotated.jpg"
    _animated_gif(folder / "animated.gif")
    paths["animated.gif"] = folder / "animated.gif"
    return paths


def _animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (24, 24), color) for color in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


# --- torch stays out -------------------------------------------------------------------------


def test_serving_never_imports_torch_or_toolkit():
    code = (
        "import sys, serving.app, serving.classifier, serving.catalog\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'toolkit'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "[]"


# --- preprocessing parity: training's decode path and the upload's --------------------------


@pytest.mark.parametrize("size", [32, 20])
def test_preprocessing_matches_toolkit_on_awkward_images(tmp_path, size):
    """Both prepare with serving.preprocess, but open the file their own way (training with
    load_image, an upload with open_upload's format allow-list and checks)."""
    from toolkit.data.decode import load_image

    for name, path in _write_variants(tmp_path).items():
        expected = load_image(path, size)
        got = prepare(open_upload(path), (size, size))
        assert got.dtype == np.uint8 and got.shape == (size, size, 3), name
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_preprocessing_follows_the_rules_not_just_toolkit(tmp_path):
    """Parity alone would pass if both sides had the same bug: pin the rules themselves."""
    paths = _write_variants(tmp_path)
    # EXIF orientation 6 turns a 70×40 landscape into a portrait before cropping.
    rotated = open_upload(paths["exif-rotated.jpg"])
    assert rotated.size == (70, 40)
    pixels_only = Image.fromarray(np.asarray(rotated))  # same pixels, no EXIF
    manual = prepare(pixels_only.transpose(Image.Transpose.ROTATE_270), (40, 40))
    np.testing.assert_array_equal(prepare(rotated, (40, 40)), manual)
    assert not np.array_equal(prepare(pixels_only, (40, 40)), manual)
    # 16-bit grey is scaled (65535 -> 255), not clipped: mid-range stays mid-grey.
    grey16 = prepare(open_upload(paths["grey16.png"]), (50, 50))
    assert 0 < grey16.mean() < 200 and grey16.max() > 100
    # Fully transparent pixels become white, not black.
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert prepare(clear, (8, 8)).min() == 255
    # Animated GIF: the first (red) frame.
    first = prepare(open_upload(paths["animated.gif"]), (8, 8))
    assert first[..., 0].min() > 200 and first[..., 2].max() < 50


# --- hostile uploads -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"empty \(0 bytes\)"),
        (b"name,label\ncat,3\n", r"is not a PNG, JPEG, .* image"),
        (truncated("PNG"), r"truncated|damaged"),
        (truncated("JPEG"), r"truncated"),
        (png_claiming(100_000, 100_000), r"claims 10,000 megapixels .*limit is 50 megapixels"),
        (png_claiming(8_000, 8_000), r"claims 8000×8000 pixels, 64 megapixels"),
        (png_claiming(1, 1), r"only 1×1 pixels; .* at least 8×8"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", r"is not a PNG"),
    ],
    ids=[
        "empty",
        "csv",
        "truncated-png",
        "truncated-jpeg",
        "bomb",
        "bomb-below-pillow-limit",
        "1x1",
        "eps",
    ],
)
def test_bad_uploads_raise_specific_errors(data, message):
    with pytest.raises(ImageError, match=message):
        open_upload(data, "'upload.bin'")


def test_pixel_limit_is_below_pillows_own():
    # Otherwise Pillow's generic DecompressionBombError would fire before our clear message.
    assert MAX_PIXELS < Image.MAX_IMAGE_PIXELS


# --- the classifier --------------------------------------------------------------------------


def test_classifier_reads_everything_from_metadata(served_artifacts):
    model = OnnxClassifier(served_artifacts / "stl10-net" / "model.onnx")
    assert model.classes == list(STL10_CLASSES)
    assert model.input_size == (32, 32)
    assert model.metadata["dataset"] == "stl10" and model.metadata["model"] == "net"
    assert model.providers == ["CPUExecutionProvider"]
    probs = model.predict([Image.fromarray(_noise((96, 96)))])
    assert probs.shape == (1, 10)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_batch_prediction_equals_one_at_a_time(served_artifacts):
    model = OnnxClassifier(served_artifacts / "cifar10-net" / "model.onnx")
    images = [Image.fromarray(_noise((32 + 7 * i, 40), i)) for i in range(6)]
    batch = model.predict(images)
    single = np.concatenate([model.predict([image]) for image in images])
    np.testing.assert_allclose(batch, single, atol=1e-6)
    assert batch.shape == (6, 10)


@pytest.mark.parametrize("dataset", ["cifar10", "stl10"])
def test_classifier_agrees_with_toolkit_evaluation(served_artifacts, dataset):
    """Test-split FILES through serving == toolkit's tensors through the torch model."""
    import torch

    from toolkit.data import DataOptions, load_data
    from toolkit.data.listing import label_base, parse_split_file, scan_image_folder, split_listing
    from toolkit.evaluate.calibrators import Calibrator
    from toolkit.run.checkpoint import Checkpoint

    folder = served_artifacts / f"{dataset}-net"
    run = Path(json.loads((folder / "export-report.json").read_text())["run"])
    config = json.loads((run / "config.json").read_text())
    data = load_data(DataOptions(**config["data"]), seed=config.get("seed", 0))
    with torch.no_grad():
        net = Checkpoint.load(run / "best.pt").build_classifier()
        calibrator = Calibrator.from_record(json.loads((folder / "model.json").read_text()))
        expected = calibrator.probs(net(data.test.images.float() / 255)).numpy()
    source = Path(config["data"]["data_dir"] or config["data"]["splits"])
    if dataset == "cifar10":
        listed = scan_image_folder(source / "test", data.spec)
    else:
        parsed = parse_split_file(source / "test.txt")
        listed = split_listing(parsed, label_base({"test": parsed}, 10), 10)
    assert not listed.bad
    files, labels = listed.paths, listed.labels
    np.testing.assert_array_equal(labels, data.test.labels.numpy())  # same images, same order

    model = OnnxClassifier(folder / "model.onnx")
    got = model.predict([open_upload(p) for p in files])
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (got.argmax(1) == labels).mean() == pytest.approx(metrics["accuracy"], abs=1e-9)


def test_known_failures_are_reproduced(catalog):
    model = catalog.get("stl10-net")
    assert len(model.failures) >= 3, "the STL-10 fixture run should make mistakes"
    probs = model.classifier.predict([open_upload(f.path) for f in model.failures])
    for failure, row in zip(model.failures, probs, strict=True):
        assert model.classifier.classes[row.argmax()] == failure.predicted != failure.true
        assert row.max() == pytest.approx(failure.confidence, abs=1e-4)


def test_provider_choice(monkeypatch):
    monkeypatch.setenv("TOOLKIT_ORT_PROVIDERS", "CPUExecutionProvider")
    assert default_providers() == ["CPUExecutionProvider"]
    monkeypatch.delenv("TOOLKIT_ORT_PROVIDERS")
    expected_cuda = Path("/dev/nvidiactl").exists()
    assert ("CUDAExecutionProvider" in default_providers()) == expected_cuda
    assert default_providers()[-1] == "CPUExecutionProvider"


# --- the catalog -----------------------------------------------------------------------------


def test_a_model_that_no_longer_gives_its_recorded_answers_is_not_served(
    served_artifacts, tmp_path, caplog
):
    """Its known failures are the evaluation's most confident mistakes: when the model
    answers one differently here (an INT8 model on a CPU without VNNI), it is left out."""
    root = tmp_path / "artifacts"
    shutil.copytree(served_artifacts, root)
    recorded = root / "stl10-net" / "failures.json"
    failures = json.loads(recorded.read_text())
    assert failures
    first = failures[0]
    first["predicted"] = next(c for c in STL10_CLASSES if c not in (first["predicted"],))
    recorded.write_text(json.dumps(failures))
    catalog = load_catalog(root)
    assert list(catalog.models) == ["cifar10-net"]
    assert "not serving stl10-net: 1 of its" in caplog.text
    shutil.rmtree(root / "cifar10-net")
    with pytest.raises(ArtifactError, match="gives its recorded answers on this machine"):
        load_catalog(root)


def test_catalog_lists_models_best_first(catalog):
    assert list(catalog.models) == ["cifar10-net", "stl10-net"]
    assert catalog.default == "cifar10-net"
    best, other = catalog.models.values()
    assert best.test_accuracy > other.test_accuracy
    assert "cifar10 · net · test acc 100.0% · " in best.label
    assert catalog.get(None) is best and catalog.get("stl10-net") is other
    with pytest.raises(KeyError, match="choose one of: cifar10-net, stl10-net"):
        catalog.get("imagenet-vit")
    assert sorted(catalog.examples) == ["cifar10", "stl10"]
    assert len(catalog.examples["cifar10"]) == 10 * EXAMPLES_PER_CLASS


def test_only_shown_images_are_servable(catalog):
    paths = catalog.servable_paths()
    assert paths and all(Path(p).suffix == ".png" and Path(p).is_file() for p in paths)
    assert not any(p.endswith((".onnx", ".json")) for p in paths)
    assert all(Path(p).is_relative_to(catalog.root) for p in paths)


def _corrupt(path: Path) -> None:
    path.write_bytes(b"\x08\x01garbage, not protobuf" * 5)


BREAKAGES = {
    "missing-onnx": ("stl10-net/model.onnx", lambda p: p.unlink()),
    "corrupt-onnx": ("stl10-net/model.onnx", _corrupt),
    "missing-json": ("cifar10-net/model.json", lambda p: p.unlink()),
    "bad-metrics": ("cifar10-net/metrics.json", lambda p: p.write_text("{not json")),
    "no-accuracy": ("cifar10-net/metrics.json", lambda p: p.write_text('{"n": 3}')),
    "failures-not-list": ("stl10-net/failures.json", lambda p: p.write_text("{}")),
    "corrupt-matrix": ("stl10-net/confusion_matrix.png", lambda p: p.write_bytes(b"nope")),
    "corrupt-example": ("examples/cifar10/cat_0.png", lambda p: p.write_bytes(b"")),
    "model-json-disagrees": (
        "stl10-net/model.json",
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "classes": ["a", "b"]})),
    ),
}


@pytest.mark.parametrize("case", BREAKAGES)
def test_broken_artifacts_stop_startup_naming_the_file(served_artifacts, tmp_path, case):
    root = broken_copy(served_artifacts, tmp_path)
    relative, damage = BREAKAGES[case]
    damage(root / relative)
    with pytest.raises(ArtifactError) as info:
        load_catalog(root)
    assert str((root / relative).resolve()) in str(info.value)


def test_failure_outside_its_folder_is_refused(served_artifacts, tmp_path):
    root = broken_copy(served_artifacts, tmp_path)
    path = root / "stl10-net" / "failures.json"
    entries = json.loads(path.read_text())
    entries[0]["file"] = "../cifar10-net/confusion_matrix.png"
    path.write_text(json.dumps(entries))
    with pytest.raises(ArtifactError, match="points outside"):
        load_catalog(root)


def test_missing_failure_image_is_named(served_artifacts, tmp_path):
    root = broken_copy(served_artifacts, tmp_path)
    entry = json.loads((root / "stl10-net" / "failures.json").read_text())[0]
    (root / "stl10-net" / entry["file"]).unlink()
    with pytest.raises(ArtifactError, match=entry["file"].replace("/", ".")):
        load_catalog(root)


def test_unsupported_preprocessing_is_refused(served_artifacts, tmp_path):
    import onnx

    root = broken_copy(served_artifacts, tmp_path)
    path = root / "stl10-net" / "model.onnx"
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == "preprocessing":
            prop.value = json.dumps({**json.loads(prop.value), "resize": "area"})
    onnx.save(proto, str(path))
    with pytest.raises(ArtifactError, match="interpolation 'area' is not one of"):
        OnnxClassifier(path)


def test_empty_or_absent_artifacts_folder(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        load_catalog(tmp_path / "nowhere")
    (tmp_path / "examples").mkdir()
    (tmp_path / ".cifar10-net.k2j4.tmp").mkdir()  # a half-packaged run is not a model
    with pytest.raises(ArtifactError, match="no models in"):
        load_catalog(tmp_path)
