"""Bad data, in the real formats: every problem named by file (and line), then fail or skip.

Valid-but-awkward images (grey, alpha, palette, CMYK, 16-bit) must decode to the right RGB;
broken ones (truncated, empty, not an image) and stray files are bad files; split files
report by line; the official binaries and batches name themselves and cannot be skipped.
"""

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import toolkit.data.decode
from tests.synthetic import (
    write_cifar10_batches,
    write_image_folder,
    write_png16,
    write_split_files,
    write_stl10_binary,
)
from toolkit.cli import app
from toolkit.data import DataOptions, load_data
from toolkit.data.decode import UnreadableImage, load_image
from toolkit.errors import ToolkitError

# --- valid images in every mode decode to the right RGB -----------------------------------


def _save_palette(path: Path, colour, transparent: bool = False) -> None:
    image = Image.new("RGB", (8, 8), colour).quantize(4)
    if transparent:
        image.save(path, transparency=image.getpixel((0, 0)))
    else:
        image.save(path)


# name -> (writer(path), expected RGB of every pixel)
VALID = {
    "grey.png": (lambda p: Image.new("L", (8, 8), 77).save(p), (77, 77, 77)),
    "bilevel.png": (lambda p: Image.new("1", (8, 8), 1).save(p), (255, 255, 255)),
    "grey-alpha.png": (lambda p: Image.new("LA", (8, 8), (40, 0)).save(p), (255, 255, 255)),
    "rgba-opaque.png": (lambda p: Image.new("RGBA", (8, 8), (200, 0, 9, 255)).save(p), (200, 0, 9)),
    "rgba-clear.png": (lambda p: Image.new("RGBA", (8, 8), (200, 0, 9, 0)).save(p), (255,) * 3),
    "palette.png": (lambda p: _save_palette(p, (12, 34, 56)), (12, 34, 56)),
    "palette-clear.png": (lambda p: _save_palette(p, (12, 34, 56), True), (255, 255, 255)),
    "cmyk.tif": (lambda p: Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(p), (0, 255, 255)),
    "cmyk-black.tif": (lambda p: Image.new("CMYK", (8, 8), (0, 0, 0, 255)).save(p), (0, 0, 0)),
    # 16-bit samples are scaled by 255/65535, not clipped to 255 (which would give white)
    "grey16.png": (lambda p: write_png16(p, np.full((8, 8), 257 * 100)), (100, 100, 100)),
    "grey16-dark.png": (lambda p: write_png16(p, np.full((8, 8), 257 * 3)), (3, 3, 3)),
    "grey16-pillow.png": (
        lambda p: Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(p),
        (255, 255, 255),
    ),
    "grey16.tif": (
        lambda p: Image.fromarray(np.full((8, 8), 257 * 50, np.uint16)).save(p),
        (50, 50, 50),
    ),
    "rgb16.png": (
        lambda p: write_png16(p, np.broadcast_to([65535, 257 * 128, 257 * 10], (8, 8, 3))),
        (255, 128, 10),
    ),
    "rgba16-clear.png": (
        lambda p: write_png16(p, np.broadcast_to([65535, 0, 0, 0], (8, 8, 4))),
        (255, 255, 255),
    ),
    "grey-alpha16.png": (
        lambda p: write_png16(p, np.broadcast_to([257 * 20, 65535], (8, 8, 2))),
        (20, 20, 20),
    ),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_awkward_but_valid_images_decode_to_the_right_rgb(tmp_path, name):
    write, expected = VALID[name]
    write(tmp_path / name)
    pixels = load_image(tmp_path / name, 8)
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, np.broadcast_to(expected, (8, 8, 3))), pixels[0, 0]


def test_cmyk_jpeg_decodes_close_to_the_right_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "red.jpg", quality=95)
    assert np.abs(load_image(tmp_path / "red.jpg", 8).astype(int) - (255, 0, 0)).max() <= 3


def test_a_folder_of_awkward_images_loads_with_nothing_skipped(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class={"train": 4, "test": 1})
    for name, (write, _) in VALID.items():
        write(root / "train" / "cat" / name)
    bundle = load_data(DataOptions(data_dir=str(root), data_root=str(tmp_path / "d")))
    assert len(bundle.train) + len(bundle.val) == 40 + len(VALID)
    assert bundle.skipped == () and bundle.info()["skipped_count"] == 0


# --- bad files in an image folder ---------------------------------------------------------


def _damage_folder(root: Path) -> dict[str, str]:
    """Five bad entries (path -> what the report must say) plus junk that must be ignored."""
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    data = (cat / "0000.png").read_bytes()
    (cat / "0000.png").write_bytes(data[: len(data) // 2])  # truncated
    (cat / "0001.png").write_bytes(b"")  # zero bytes
    (dog / "0000.png").write_text("hello, I am text renamed .png\n")
    (dog / "README.txt").write_text("dog pictures from the shelter\n")
    (dog / "extra").mkdir()
    # never data, never reported: macOS and Windows droppings, hidden files and folders
    (cat / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cat / "._0000.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (dog / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    return {
        str(cat / "0000.png"): "truncated image",
        str(cat / "0001.png"): "empty file (0 bytes)",
        str(dog / "0000.png"): "not an image",
        str(dog / "README.txt"): "not an image file ('.txt')",
        str(dog / "extra"): "a folder inside a class folder",
    }


@pytest.fixture
def bad_folder(tmp_path) -> tuple[Path, dict[str, str]]:
    root = write_image_folder(tmp_path / "f", per_class={"train": 4, "test": 1}, size=16)
    return root, _damage_folder(root)


def _options(root: Path, policy: str, **kwargs) -> DataOptions:
    return DataOptions(
        data_dir=str(root),
        data_root=str(root.parent / "d"),
        image_size=16,
        bad_files=policy,
        **kwargs,
    )


def test_fail_names_every_bad_file_and_why_in_one_error(bad_folder):
    root, expected = bad_folder
    with pytest.raises(ToolkitError) as caught:
        load_data(_options(root, "fail"))
    message = str(caught.value)
    assert message.startswith("5 bad files: ") and "\n" not in message
    first = sorted(expected)[0]
    assert message.startswith(f"5 bad files: {first}: {expected[first]}")
    for path, why in expected.items():
        assert f"{path}: {why}" in message
    assert "--bad-files skip" in message
    for junk in (".DS_Store", "._0000.png", "Thumbs.db", ".ipynb_checkpoints"):
        assert junk not in message


def test_skip_leaves_the_bad_files_out_warns_and_records_them(bad_folder, caplog):
    root, expected = bad_folder
    with caplog.at_level(logging.WARNING, logger="toolkit.data"):
        bundle = load_data(_options(root, "skip"))
    # 3 train images in each of 10 classes, of which cat lost 2 and dog 1
    assert len(bundle.train) + len(bundle.val) == 40 - 3
    labels = torch.cat([bundle.train.labels, bundle.val.labels])
    assert torch.bincount(labels, minlength=10).tolist() == [4, 4, 4, 2, 4, 3, 4, 4, 4, 4]
    assert len(bundle.test) == 10
    assert len(bundle.skipped) == 5
    assert {entry.split(": ", 1)[0] for entry in bundle.skipped} == set(expected)
    info = bundle.info()
    assert info["skipped_count"] == 5 and info["skipped_files"] == list(bundle.skipped)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "5 bad files" in warning and str(root / "train" / "cat" / "0000.png") in warning


def test_fail_and_skip_share_the_cache_without_mixing(bad_folder, monkeypatch):
    root, _ = bad_folder
    with pytest.raises(ToolkitError, match="5 bad files"):
        load_data(_options(root, "fail"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    # The failed run cached what it decoded: the suggested skip rerun starts from it, and a
    # later fail run still fails on the very same cache entry.
    monkeypatch.setattr(toolkit.data.decode, "decode_files", no_decoding)
    assert len(load_data(_options(root, "skip")).skipped) == 5
    with pytest.raises(ToolkitError, match="5 bad files"):
        load_data(_options(root, "fail"))


def test_a_fixed_or_removed_bad_file_is_picked_up(bad_folder):
    root, _ = bad_folder
    before = load_data(_options(root, "skip"))
    cat = root / "train" / "cat"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(cat / "0001.png")  # the empty file, fixed
    (root / "train" / "dog" / "README.txt").unlink()
    after = load_data(_options(root, "skip"))
    assert len(after.skipped) == 3
    assert len(after.train) + len(after.val) == len(before.train) + len(before.val) + 1
    assert after.fingerprint != before.fingerprint
    images = torch.cat([after.train.images, after.val.images])
    assert (images[:, :, 0, 0] == torch.tensor([1, 2, 3], dtype=torch.uint8)).all(1).any()


def test_many_bad_files_are_counted_and_the_first_few_named(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class={"train": 4, "test": 1}, size=16)
    for name in ("bird", "cat", "deer", "dog", "frog", "horse", "ship"):
        (root / "train" / name / "0000.png").write_bytes(b"")
    with pytest.raises(ToolkitError) as caught:
        load_data(_options(root, "fail"))
    message = str(caught.value)
    assert message.startswith("7 bad files: ") and message.count("empty file (0 bytes)") == 5
    assert "and 2 more" in message


def test_a_split_with_nothing_left_is_an_error_even_when_skipping(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class={"train": 4, "test": 1}, size=16)
    for path in (root / "test").rglob("*.png"):
        path.write_bytes(b"not an image")
    with pytest.raises(ToolkitError, match=r"no usable images left in the test split; 10 bad"):
        load_data(_options(root, "skip"))


def test_unreadable_image_error_names_the_file(tmp_path):
    Image.new("RGB", (16, 16), (10, 200, 30)).save(tmp_path / "x.png")
    (tmp_path / "x.png").write_bytes((tmp_path / "x.png").read_bytes()[:40])
    with pytest.raises(UnreadableImage) as caught:
        load_image(tmp_path / "x.png", 8)
    assert caught.value.path == tmp_path / "x.png"
    assert str(tmp_path / "x.png") in str(caught.value)


def test_the_policy_must_be_fail_or_skip():
    with pytest.raises(ToolkitError, match="--bad-files must be fail or skip, got 'ignore'"):
        DataOptions(bad_files="ignore")


# --- split files: reported by file and line -----------------------------------------------


@pytest.fixture
def split_root(tmp_path) -> Path:
    return write_split_files(tmp_path / "s", per_class={"train": 4, "test": 1}, size=16)


def _split_options(root: Path, policy: str = "fail") -> DataOptions:
    return DataOptions(
        dataset="stl10", splits=str(root), data_root=str(root.parent / "d"), bad_files=policy
    )


def _append(path: Path, *lines: str) -> int:
    """Append lines; returns the line number of the first one."""
    first = len(path.read_text().splitlines()) + 1
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
    return first


def test_split_file_problems_are_reported_by_file_and_line(split_root):
    train = split_root / "train.txt"
    data = (split_root / "images/train/cat_0.png").read_bytes()
    (split_root / "images/train/cat_0.png").write_bytes(data[:60])
    cat_line = next(
        i for i, text in enumerate(train.read_text().splitlines(), 1) if "cat_0" in text
    )
    n = _append(
        train,
        "images/train/nowhere.png 3",
        "images/train/car_0.png cat",
        "images/train/car_1.png 42",
        "images/train/no-label.png",
    )
    with pytest.raises(ToolkitError) as caught:
        load_data(_split_options(split_root))
    message = str(caught.value)
    assert message.startswith("5 bad files: ")
    assert f"{train}:{cat_line}: images/train/cat_0.png: truncated image" in message
    assert f"{train}:{n}: images/train/nowhere.png: file not found" in message
    assert f"{train}:{n + 1}: label 'cat' is not an integer" in message
    assert f"{train}:{n + 2}: label 42 is outside 1..10" in message
    assert f"{train}:{n + 3}: expected 'relative/path label', got 'images/train/no-label.png'" in (
        message
    )

    bundle = load_data(_split_options(split_root, "skip"))
    # 20 listed images less the truncated one; the other four lines never named a usable image
    assert len(bundle.train) + len(bundle.val) == 40 - 1
    assert len(bundle.skipped) == 5 and all(s.startswith(f"{train}:") for s in bundle.skipped)


def test_blank_lines_comments_crlf_whitespace_and_a_bom_are_fine(split_root):
    train = split_root / "train.txt"
    lines = train.read_text().splitlines()
    body = [f"  {line}\t " for line in lines[:10]] + ["", "# a comment", "   "] + lines[10:]
    train.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(body).encode() + b"\r\n\r\n")
    bundle = load_data(_split_options(split_root))
    assert len(bundle.train) + len(bundle.val) == 40 and bundle.skipped == ()


def test_a_fixed_label_in_a_split_file_rebuilds_the_cache(split_root):
    train = split_root / "train.txt"
    first = load_data(_split_options(split_root))
    lines = train.read_text().splitlines()
    path, label = lines[0].rsplit(maxsplit=1)
    train.write_text("\n".join([f"{path} {int(label) % 10 + 1}", *lines[1:]]) + "\n")
    second = load_data(_split_options(split_root))
    assert second.fingerprint != first.fingerprint
    counts = [torch.bincount(torch.cat([b.train.labels, b.val.labels])) for b in (first, second)]
    assert counts[0].tolist() != counts[1].tolist()


def test_labels_mixing_zero_and_k_are_an_error_even_when_skipping(split_root):
    test = split_root / "test.txt"
    n = _append(test, "images/test/car_0.png 0")
    with pytest.raises(ToolkitError) as caught:
        load_data(_split_options(split_root, "skip"))
    message = str(caught.value)
    assert f"label 0 ({test}:{n})" in message
    assert f"label 10 ({split_root / 'train.txt'}:37)" in message  # truck_0, the first 10


def test_a_split_file_that_is_not_utf8_is_named(split_root):
    (split_root / "val.txt").write_bytes(b"images/train/caf\xe9.png 1\n")
    with pytest.raises(ToolkitError, match=r"val.txt' is not UTF-8 text"):
        load_data(_split_options(split_root, "skip"))


# --- official binaries: all or nothing ----------------------------------------------------


def _stl10(tmp_path: Path) -> Path:
    return write_stl10_binary(tmp_path, train=4, test=3) / "stl10_binary"


def _load_stl10(tmp_path: Path, policy: str = "skip"):
    return load_data(
        DataOptions(dataset="stl10", data_root=str(tmp_path), download=False, bad_files=policy)
    )


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_stl10_images_of_the_wrong_length_name_the_file_and_sizes(tmp_path, policy):
    folder = _stl10(tmp_path)
    x = folder / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-5])
    with pytest.raises(ToolkitError) as caught:
        _load_stl10(tmp_path, policy)
    message = str(caught.value)
    assert f"'{x}' is 110,587 bytes, not a whole number of 3×96×96 images" in message
    assert "expected 110,592 bytes for the 4 labels in 'train_y.bin'" in message
    assert "--bad-files does not apply" in message


def test_stl10_label_count_mismatch_names_both_files(tmp_path):
    folder = _stl10(tmp_path)
    (folder / "test_y.bin").write_bytes(bytes([1, 2]))
    with pytest.raises(ToolkitError) as caught:
        _load_stl10(tmp_path)
    message = str(caught.value)
    assert f"'{folder / 'test_X.bin'}' holds 3 images (82,944 bytes)" in message
    assert f"'{folder / 'test_y.bin'}' holds 2 labels (so expected 55,296 bytes)" in message


def test_stl10_labels_outside_1_to_10_name_the_file(tmp_path):
    folder = _stl10(tmp_path)
    (folder / "train_y.bin").write_bytes(bytes([1, 2, 11, 3]))
    with pytest.raises(ToolkitError, match=r"train_y.bin': label 11 at position 2 is outside"):
        _load_stl10(tmp_path)


def _cifar_damages(batch: Path) -> dict[str, bytes]:
    good = batch.read_bytes()
    data = pickle.loads(good, encoding="latin1")
    return {
        "empty file (0 bytes)": b"",
        "truncated": good[: len(good) // 2],
        "holds a list, not a dict": pickle.dumps([1, 2, 3]),
        "no 'data' and 'labels'": pickle.dumps({"labels": data["labels"]}),
        "not a whole number of 3×32×32 images": pickle.dumps(
            {**data, "data": data["data"][:, :-1]}
        ),
        "20 images but 19 labels": pickle.dumps({**data, "labels": data["labels"][:-1]}),
        "label 10 at position 0 is outside 0..9": pickle.dumps(
            {**data, "labels": [10] + data["labels"][1:]}
        ),
    }


def test_damaged_cifar10_batches_name_the_file(tmp_path):
    write_cifar10_batches(tmp_path, per_batch=20, test=10)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    good = batch.read_bytes()
    for why, content in _cifar_damages(batch).items():
        batch.write_bytes(content)
        with pytest.raises(ToolkitError) as caught:
            load_data(DataOptions(data_root=str(tmp_path), download=False, bad_files="skip"))
        message = str(caught.value)
        assert str(batch) in message and why in message, message
        assert "--bad-files does not apply" in message
    batch.write_bytes(good)
    assert len(load_data(DataOptions(data_root=str(tmp_path), download=False)).test) == 10


class _RunsCode:
    """Unpickling this calls Path.touch: what a doctored batch could do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_cifar10_batch_cannot_run_code_when_read(tmp_path):
    write_cifar10_batches(tmp_path, per_batch=20, test=10)
    batch, marker = tmp_path / "cifar-10-batches-py" / "test_batch", tmp_path / "ran"
    data = pickle.loads(batch.read_bytes(), encoding="latin1")
    batch.write_bytes(pickle.dumps({**data, "labels": _RunsCode(marker)}))
    with pytest.raises(ToolkitError, match="refusing to load 'pathlib.Path.touch'") as caught:
        load_data(DataOptions(data_root=str(tmp_path), download=False))
    assert str(batch) in str(caught.value)
    assert not marker.exists()
    # Numpy arrays in any pickle protocol are still read (the official files hold lists).
    for protocol in (2, 5):
        arrays = {**data, "data": np.asarray(data["data"]), "labels": np.asarray(data["labels"])}
        batch.write_bytes(pickle.dumps(arrays, protocol=protocol))
        assert len(load_data(DataOptions(data_root=str(tmp_path), download=False)).test) == 10


# --- the command line ---------------------------------------------------------------------


def test_cli_fails_in_one_line_and_records_what_skip_left_out(bad_folder, tmp_path):
    root, expected = bad_folder
    runner = CliRunner()
    args = ["train", "net", "--data-dir", str(root), "--data-root", str(tmp_path / "d")]
    args += ["--image-size", "16", "--epochs", "1", "--batch-size", "16", "--device", "cpu"]
    failed = runner.invoke(app, args + ["--run-dir", str(tmp_path / "r1")])
    assert failed.exit_code == 2
    assert "5 bad files" in failed.output and "--bad-files skip" in failed.output

    wrong = runner.invoke(app, args + ["--bad-files", "later"])
    assert wrong.exit_code == 2 and "--bad-files must be fail or skip" in wrong.output

    run = tmp_path / "r2"
    done = runner.invoke(app, args + ["--bad-files", "skip", "--run-dir", str(run)])
    assert done.exit_code == 0, done.output
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["bad_files"] == "skip"
    assert config["dataset_info"]["skipped_count"] == 5
    assert {s.split(": ", 1)[0] for s in config["dataset_info"]["skipped_files"]} == set(expected)
    assert config["sizes"]["train"] + config["sizes"]["val"] == 37
