"""What a dataset is (DatasetSpec), where it comes from (DataOptions) and what loading it gives
(DataBundle of uint8 Splits): the types the rest of the toolkit passes around."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serving.preprocess import Resize
from toolkit.errors import ToolkitError
from toolkit.options import option

if TYPE_CHECKING:  # only annotations: the CLI reads DataOptions without loading torch
    import torch

BAD_FILE_POLICIES = ("fail", "skip")
SKIPPED_IN_INFO = 100  # bad files named in DataBundle.info(); all of them are counted


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes: tuple[str, ...]
    native_size: int | None  # None: a folder of images of any size
    default_size: int
    channels: int = 3
    official: bool = True  # False: a dataset of a folder's own class names

    @property
    def num_classes(self) -> int:
        return len(self.classes)


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        "cifar10",
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        native_size=32,
        default_size=32,
    ),
    # The reference trained on STL-10 resized to 32×32; 96 (native) is allowed too.
    "stl10": DatasetSpec(
        "stl10",
        ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
        native_size=96,
        default_size=32,
    ),
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ToolkitError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


CUSTOM_SIZE = 32  # what images of a folder of any sizes are resized to by default


def spec_for_classes(
    classes: list[str], name: str, where: str, ordered: bool = False
) -> DatasetSpec:
    """The dataset a folder's class names (or a classes.txt) describe.

    Exactly CIFAR-10's or STL-10's names keep that dataset, in its official order, so old
    runs and the shipped models stay valid. Anything else is a dataset of its own, named after
    its folder, its classes sorted like torchvision's ImageFolder, or in the given order when
    `ordered` (a classes.txt: its line numbers are the labels).
    """
    for spec in DATASETS.values():
        if (tuple(classes) == spec.classes) if ordered else (set(classes) == set(spec.classes)):
            return spec
    if len(classes) < 2:
        raise ToolkitError(
            f"'{where}' names {len(classes)} class(es) ({', '.join(classes) or 'none'}); "
            "a classifier needs at least 2: one folder (or classes.txt line) per class"
        )
    duplicated = sorted({c for c in classes if classes.count(c) > 1})
    if duplicated:
        raise ToolkitError(f"'{where}' repeats the class name(s) {', '.join(duplicated)}")
    slug = re.sub(r"[^a-z0-9_.-]+", "-", name.lower()).strip("-.") or "images"
    if slug in DATASETS:  # a folder called cifar10 holding other classes is not CIFAR-10
        slug += "-folder"
    return DatasetSpec(
        slug,
        tuple(classes if ordered else sorted(classes)),
        native_size=None,
        default_size=CUSTOM_SIZE,
        official=False,
    )


@dataclass(frozen=True)
class DataOptions:
    """Where the data comes from and how it is split; stored in config.json."""

    dataset: str = option(
        "cifar10",
        "cifar10 or stl10: the official files, downloaded from the internet when missing "
        "(see --download). A --data-dir names its classes by its folders, a --splits DIR by "
        "its classes.txt (else this dataset's).",
    )
    data_dir: str | None = option(
        None,
        "Image folder with train/ (optional val/, test/), one sub-folder per class, any "
        "class names.",
        path=True,
    )
    splits: str | None = option(
        None,
        "Folder with train.txt (optional val.txt, test.txt): lines 'relative/path label'; "
        "optional classes.txt, one class name per line.",
        path=True,
    )
    data_root: str | None = option(
        None,
        "Where downloads and decoded caches live (default: $TOOLKIT_DATA or ~/.cache/toolkit).",
        path=True,
    )
    image_size: str | None = option(
        None,
        "Train at this size: N (square) or WIDTHxHEIGHT (160x128); images are centre-cropped "
        "to its shape and resized to it, as the app does (default 32; STL-10's native size "
        "is 96; a pretrained model's own with --pretrained).",
    )
    interpolation: str | None = option(
        None,
        "Resize filter: bilinear, bicubic, nearest or lanczos (default bilinear; a "
        "pretrained model's own with --pretrained).",
    )
    crop_fraction: float | None = option(
        None,
        "Centred share of each side kept before resizing, as timm's crop_pct (default 1: "
        "the whole centre crop; a pretrained model's own with --pretrained, often 0.875).",
    )
    val_fraction: float = option(
        0.1,
        "Stratified share of train held out as val, when the source has no val split; 0: "
        "no val (a fixed-length recipe: the final weights, no epoch selected).",
    )
    test_fraction: float = option(
        0.1,
        "Stratified share of train held out as test, when the source has no test split "
        "(carved with a fixed seed, before val: the same test images for every --seed).",
    )
    memory_gb: float | None = option(
        None,
        "Decoded images larger than this stay on disk, memory-mapped, instead of in RAM "
        "(default: half of this machine's memory).",
    )
    download: bool = option(
        True,
        "Download the official files from the internet when missing (--no-download: never "
        "connect).",
    )
    # See toolkit.data.sources for what counts as a bad file.
    bad_files: str = option(
        "fail",
        "Unreadable images, non-image files in class folders and unusable split-file lines: "
        "fail (list them all and stop) or skip (leave them out; the run records which).",
    )

    def __post_init__(self):
        if self.image_size is not None:  # one spelling per size: 96 and "96" are one config
            object.__setattr__(self, "image_size", size_option(parse_size(self.image_size)))
        try:
            self.resize((32, 32))
        except ValueError as exc:
            raise ToolkitError(f"--interpolation / --crop-fraction: {exc}") from exc
        if self.bad_files not in BAD_FILE_POLICIES:
            raise ToolkitError(
                f"--bad-files must be {' or '.join(BAD_FILE_POLICIES)}, got '{self.bad_files}'"
            )

    def resize(self, size: tuple[int, int]) -> Resize:
        """How images are brought to `size` (height, width): these options, else the
        defaults (bilinear, the whole centre crop)."""
        return Resize(
            tuple(size),
            self.interpolation or "bilinear",
            1.0 if self.crop_fraction is None else self.crop_fraction,
        )


def parse_size(value) -> tuple[int, int]:
    """An image size as (height, width): N (square), "WIDTHxHEIGHT" (as image sizes are
    written: 160x128 is landscape) or a (height, width) pair (as tensors are shaped)."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    found = re.fullmatch(r"\s*(\d+)\s*(?:[x×,]\s*(\d+)\s*)?", str(value).lower())
    if not found:
        raise ToolkitError(
            f"--image-size must be N or WIDTHxHEIGHT (e.g. 96 or 160x128), got '{value}'"
        )
    width = int(found.group(1))
    return int(found.group(2) or width), width


def recorded_size(size: tuple[int, int]) -> int | list[int]:
    """How checkpoints and metadata record a size: N when square (as before non-square sizes
    existed), else [height, width]."""
    height, width = size
    return height if height == width else [height, width]


def size_option(size: tuple[int, int]) -> int | str:
    """How --image-size records a size: N when square, else "WIDTHxHEIGHT"."""
    height, width = size
    return height if height == width else f"{width}x{height}"


def size_label(size: tuple[int, int]) -> str:
    """32, or 160x128 (width x height): for file names and reports."""
    height, width = size
    return str(height) if height == width else f"{width}x{height}"


@dataclass
class Split:
    images: torch.Tensor  # uint8 N×C×H×W
    labels: torch.Tensor  # int64 N

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DataBundle:
    """What training and evaluation consume: tensors plus the facts that describe them."""

    spec: DatasetSpec
    image_size: int | list[int]  # recorded_size: N, or [height, width] when not square
    train: Split
    val: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: dict  # how to load this again: {"kind", "path", ...}
    fingerprint: str
    val_is_carved: bool
    test_is_carved: bool = False
    # How the images were resized (serving.preprocess.Resize): the export's rules come from here.
    interpolation: str = "bilinear"
    crop_fraction: float = 1.0
    skipped: tuple[str, ...] = ()  # bad files left out under --bad-files skip: 'where: why'
    # Each image's file, split by split (toolkit.data.sources.source_names): not part of the
    # data's identity (the fingerprint is the pixels), but what an audit finding names.
    paths: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def info(self) -> dict:
        """The dataset facts stored in checkpoints and, later, in ONNX metadata."""
        return {
            "name": self.spec.name,
            "classes": list(self.spec.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "image_size": self.image_size,
            "interpolation": self.interpolation,
            "crop_fraction": self.crop_fraction,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "test_is_carved": self.test_is_carved,
            # Capped: every checkpoint carries this, and the count says how much is missing.
            "skipped_count": len(self.skipped),
            "skipped_files": list(self.skipped[:SKIPPED_IN_INFO]),
        }

    @property
    def size_hw(self) -> tuple[int, int]:
        return parse_size(self.image_size)

    def sizes(self) -> dict[str, int]:
        """Images per split, as config.json records them."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split: imbalance is recorded, never hidden."""
        classes = self.spec.classes
        return {
            split: dict(zip(classes, counts_per_class(part.labels, len(classes)), strict=True))
            for split, part in (("train", self.train), ("val", self.val), ("test", self.test))
        }


def counts_per_class(labels, num_classes: int) -> list[int]:
    """How many of `labels` (a tensor of class indices) fall in each class, every class listed."""
    return labels.bincount(minlength=num_classes).tolist()


def imbalance(counts: dict[str, int]) -> dict:
    """The largest and smallest class of a split and their ratio (inf when a class is empty)."""
    most, least = max(counts, key=counts.get), min(counts, key=counts.get)
    ratio = counts[most] / counts[least] if counts[least] else float("inf")
    return {"largest": most, "smallest": least, "ratio": round(ratio, 2)}
