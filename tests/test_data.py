"""Every data source, in the real on-disk formats; the cache; the val carve; bad input."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import real_cifar10
from tests.synthetic import (
    STL10_CLASSES,
    class_images,
    write_cifar10_batches,
    write_image_folder,
    write_split_files,
    write_stl10_binary,
)
from toolkit.data import DataOptions, carve_val, load_data
from toolkit.data.formats import read_stl10_binary
from toolkit.errors import ToolkitError


def test_image_folder_decodes_pixels_exactly(cifar_folder, tmp_path):
    bundle = load_data(DataOptions(data_dir=str(cifar_folder), data_root=str(tmp_path)))
    # 30 train images per class, 10 % carved out as val: 27 + 3 per class
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (270, 30, 100)
    assert bundle.val_is_carved
    assert bundle.train.images.dtype == torch.uint8
    assert bundle.train.images.shape[1:] == (3, 32, 32)
    # PNG is lossless: test image 0 of class 3 is exactly what the generator drew
    expected = class_images(3, 10, 32, seed=1)[0].transpose(2, 0, 1)
    first_of_class = int(torch.nonzero(bundle.test.labels == 3)[0])
    assert np.array_equal(bundle.test.images[first_of_class].numpy(), expected)


def test_mean_and_std_are_computed_from_the_training_split(cifar_folder, tmp_path):
    bundle = load_data(DataOptions(data_dir=str(cifar_folder), data_root=str(tmp_path)))
    train = np.stack([class_images(c, 30, 32, seed=0) for c in range(10)]) / 255.0
    expected_mean = train.reshape(-1, 3).mean(0)
    assert np.allclose(bundle.mean, expected_mean, atol=1e-4)
    assert np.allclose(bundle.std, train.reshape(-1, 3).std(0, ddof=1), atol=1e-4)


def test_cifar10_python_batches(tmp_path):
    write_cifar10_batches(tmp_path, per_batch=20, test=40)
    bundle = load_data(DataOptions(data_root=str(tmp_path), download=False))
    assert len(bundle.train) + len(bundle.val) == 100
    assert len(bundle.test) == 40
    assert bundle.source["kind"] == "official"
    # test_batch image 3 (label 3) must decode to the very pixels written
    expected = class_images(3, 1, 32, 5 * 100 + 3)[0].transpose(2, 0, 1)
    assert np.array_equal(bundle.test.images[3].numpy(), expected)
    assert bundle.test.labels[:10].tolist() == list(range(10))


@pytest.mark.parametrize("size", [32, 96])
def test_stl10_binary_column_major_and_one_based_labels(tmp_path, size):
    write_stl10_binary(tmp_path, train=40, test=20)
    raw = read_stl10_binary(tmp_path / "stl10_binary")
    images, labels = raw["train"]
    assert labels[:10].tolist() == list(range(10))  # files hold 1..10
    assert np.array_equal(images[7], class_images(7, 1, 96, 7)[0].transpose(2, 0, 1))
    bundle = load_data(
        DataOptions(dataset="stl10", data_root=str(tmp_path), download=False, image_size=size)
    )
    assert bundle.test.images.shape == (20, 3, size, size)
    assert bundle.spec.classes == STL10_CLASSES


def test_stl10_binary_of_the_wrong_length_is_reported(tmp_path):
    write_stl10_binary(tmp_path, train=10, test=10)
    x = tmp_path / "stl10_binary" / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-5])
    with pytest.raises(ToolkitError, match="train_X.bin"):
        load_data(DataOptions(dataset="stl10", data_root=str(tmp_path), download=False))


@pytest.mark.parametrize("one_based", [True, False])
def test_split_files_with_their_own_val(tmp_path, one_based):
    write_split_files(tmp_path, one_based=one_based)
    bundle = load_data(DataOptions(dataset="stl10", splits=str(tmp_path)))
    assert not bundle.val_is_carved
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (120, 40, 40)
    assert sorted(bundle.train.labels.unique().tolist()) == list(range(10))
    assert bundle.train.images.shape[-1] == 32  # STL-10 defaults to the reference's 32x32


def test_split_files_tolerate_crlf_and_blank_lines_and_report_bad_labels(tmp_path):
    write_split_files(tmp_path, per_class={"train": 2, "test": 1})
    text = (tmp_path / "train.txt").read_text()
    (tmp_path / "train.txt").write_text("\r\n".join(text.splitlines()) + "\r\n\r\n")
    assert len(load_data(DataOptions(dataset="stl10", splits=str(tmp_path))).test) == 10
    (tmp_path / "test.txt").write_text("images/test/car_0.png 42\n")
    with pytest.raises(ToolkitError, match=r"test.txt:1: label 42"):
        load_data(DataOptions(dataset="stl10", splits=str(tmp_path)))


def test_split_file_naming_a_missing_image(tmp_path):
    write_split_files(tmp_path, per_class={"train": 2, "test": 1})
    with open(tmp_path / "test.txt", "a") as f:
        f.write("images/test/nowhere.png 3\n")
    with pytest.raises(ToolkitError, match="nowhere.png"):
        load_data(DataOptions(dataset="stl10", splits=str(tmp_path)))


def test_corrupt_image_is_reported_by_path(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class={"train": 3, "test": 1})
    bad = root / "train" / "cat" / "0001.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ToolkitError, match="0001.png"):
        load_data(DataOptions(data_dir=str(root), data_root=str(tmp_path / "d")))


def test_folder_with_wrong_classes_names_them(tmp_path):
    root = write_image_folder(tmp_path / "f", classes=("cat", "spaceship"), per_class={"train": 2})
    with pytest.raises(ToolkitError, match="spaceship"):
        load_data(DataOptions(data_dir=str(root)))


def test_grey_rgba_and_odd_sizes_become_rgb_at_the_asked_size(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class={"train": 2, "test": 1})
    Image.new("L", (40, 20), 128).save(root / "train" / "cat" / "grey.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(root / "train" / "dog" / "clear.png")
    bundle = load_data(DataOptions(data_dir=str(root), val_fraction=0.5))
    images = torch.cat([bundle.train.images, bundle.val.images])
    assert images.shape[1:] == (3, 32, 32)
    # the fully transparent red image is white, not black or red
    assert (images == 255).all(dim=(1, 2, 3)).sum() == 1


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(ToolkitError, match="--data-dir"):
        load_data(DataOptions(data_root=str(tmp_path), download=False))
    with pytest.raises(ToolkitError, match="does not exist"):
        load_data(DataOptions(data_dir=str(tmp_path / "nope")))


def test_download_failure_names_the_alternatives(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    monkeypatch.setattr("toolkit.data.sources.unreachable", lambda url: None)
    with pytest.raises(ToolkitError, match="could not download cifar10.*--data-dir"):
        load_data(DataOptions(data_root=str(tmp_path)))


def test_an_unreachable_host_is_said_before_any_download(tmp_path, monkeypatch):
    """One short probe of the archive's host: a packet-dropping firewall costs seconds, not
    the kernel's TCP timeout."""
    import torchvision.datasets.utils as tvu

    probed = []

    def never(*args, **kwargs):
        raise AssertionError("downloaded although the host was unreachable")

    def probe(url):
        probed.append(url)
        return "www.cs.toronto.edu:443: Connection timed out"

    monkeypatch.setattr(tvu, "download_and_extract_archive", never)
    monkeypatch.setattr("toolkit.data.sources.unreachable", probe)
    with pytest.raises(ToolkitError, match="cannot reach www.cs.toronto.edu:443.*--data-dir"):
        load_data(DataOptions(data_root=str(tmp_path)))
    assert probed and probed[0].startswith("https://www.cs.toronto.edu/")


def test_a_stalled_download_times_out():
    import socket

    from toolkit.network import stall_timeout

    before = socket.getdefaulttimeout()
    with stall_timeout(7.0):
        assert socket.getdefaulttimeout() == 7.0
    assert socket.getdefaulttimeout() == before


def test_download_uses_torchvisions_checked_archive(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    import torchvision.datasets.utils as tvu

    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, filename, md5))
        write_stl10_binary(tmp_path, train=10, test=10)

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_download)
    monkeypatch.setattr("toolkit.data.sources.unreachable", lambda url: None)
    bundle = load_data(DataOptions(dataset="stl10", data_root=str(tmp_path)))
    assert calls == [(tvd.STL10.url, tvd.STL10.filename, tvd.STL10.tgz_md5)]
    assert len(bundle.test) == 10


def test_second_load_comes_from_the_cache(cifar_folder, tmp_path, monkeypatch):
    options = DataOptions(data_dir=str(cifar_folder), data_root=str(tmp_path))
    first = load_data(options)
    assert list((tmp_path / "cache").glob("*.pt"))
    import toolkit.data.decode

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(toolkit.data.decode, "decode_files", no_decoding)
    second = load_data(options)
    assert torch.equal(first.train.images, second.train.images)
    assert first.mean == second.mean


def test_changed_files_invalidate_the_cache(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class={"train": 3, "test": 1})
    options = DataOptions(data_dir=str(root), data_root=str(tmp_path / "d"))
    before = load_data(options)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "test" / "cat" / "0000.png")
    after = load_data(options)
    assert after.fingerprint != before.fingerprint
    cat = int(torch.nonzero(after.test.labels == 3)[0])
    assert after.test.images[cat, :, 0, 0].tolist() == [1, 2, 3]


def test_val_carve_is_stratified_seeded_and_disjoint():
    labels = torch.arange(10).repeat_interleave(50)
    train, val = carve_val(labels, 0.2, seed=3)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert len(train) + len(val) == 500
    assert torch.bincount(labels[val]).tolist() == [10] * 10
    again, _ = carve_val(labels, 0.2, seed=3)
    other, _ = carve_val(labels, 0.2, seed=4)
    assert torch.equal(train, again) and not torch.equal(train, other)


@pytest.mark.real_data
def test_real_cifar10_folder_loads_from_cache_quickly(tmp_path_factory):
    folder = real_cifar10()
    root = tmp_path_factory.getbasetemp() / "real-cifar"
    options = DataOptions(data_dir=str(folder), data_root=str(root))
    first = load_data(options)
    assert (len(first.train) + len(first.val), len(first.test)) == (50_000, 10_000)
    assert np.allclose(first.mean, (0.4915, 0.4823, 0.4468), atol=0.003)
    start = time.perf_counter()
    load_data(options)
    assert time.perf_counter() - start < 5.0
