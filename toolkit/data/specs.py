"""What a dataset is (DatasetSpec), where it comes from (DataOptions) and what loading it gives
(DataBundle of uint8 Splits): the types the rest of the toolkit passes around."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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
    native_size: int
    default_size: int
    channels: int = 3

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


@dataclass(frozen=True)
class DataOptions:
    """Where the data comes from and how it is split; stored in config.json."""

    dataset: str = option("cifar10", "cifar10 or stl10.")
    data_dir: str | None = option(
        None,
        "Image folder with train/ and test/ (optional val/), one sub-folder per class.",
        path=True,
    )
    splits: str | None = option(
        None,
        "Folder with train.txt, test.txt (optional val.txt): lines 'relative/path label'.",
        path=True,
    )
    data_root: str | None = option(
        None,
        "Where downloads and decoded caches live (default: $TOOLKIT_DATA or ~/.cache/toolkit).",
        path=True,
    )
    image_size: int | None = option(
        None, "Train at this size (default: the dataset's; STL-10: 32, 96 native)."
    )
    val_fraction: float = option(0.1, "Stratified share of train held out as val.")
    download: bool = option(True, "Download the official files when missing.")
    # See toolkit.data.sources for what counts as a bad file.
    bad_files: str = option(
        "fail",
        "Unreadable images, non-image files in class folders and unusable split-file lines: "
        "fail (list them all and stop) or skip (leave them out; the run records which).",
    )

    def __post_init__(self):
        if self.bad_files not in BAD_FILE_POLICIES:
            raise ToolkitError(
                f"--bad-files must be {' or '.join(BAD_FILE_POLICIES)}, got '{self.bad_files}'"
            )


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
    image_size: int
    train: Split
    val: Split
    test: Split | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: dict  # how to load this again: {"kind", "path", ...}
    fingerprint: str
    val_is_carved: bool
    skipped: tuple[str, ...] = ()  # bad files left out under --bad-files skip: 'where: why'

    def info(self) -> dict:
        """The dataset facts stored in checkpoints and, later, in ONNX metadata."""
        return {
            "name": self.spec.name,
            "classes": list(self.spec.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "image_size": self.image_size,
            "source": self.source,
            "fingerprint": self.fingerprint,
            # Capped: every checkpoint carries this, and the count says how much is missing.
            "skipped_count": len(self.skipped),
            "skipped_files": list(self.skipped[:SKIPPED_IN_INFO]),
        }

    def sizes(self) -> dict[str, int]:
        """Images per split (test 0 when the source has none), as config.json records them."""
        test = len(self.test) if self.test is not None else 0
        return {"train": len(self.train), "val": len(self.val), "test": test}
