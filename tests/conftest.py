"""Shared fixtures: synthetic data in the real formats, and one tiny trained run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.synthetic import write_image_folder

# No progress bars in test output, and never write caches into the user's home.
os.environ.setdefault("TOOLKIT_PROGRESS", "0")

REAL_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


@pytest.fixture(autouse=True)
def _isolated_data_root(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TOOLKIT_DATA", str(tmp_path_factory.getbasetemp() / "toolkit-data"))


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory) -> Path:
    """A CIFAR-10-shaped image folder: 30 train + 10 test PNGs per class."""
    return write_image_folder(tmp_path_factory.mktemp("cifar-folder"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cifar_folder) -> Path:
    """`net` trained for 4 epochs on the synthetic folder: a complete run folder."""
    from toolkit.data import DataOptions
    from toolkit.train import TrainConfig, fit

    root = tmp_path_factory.mktemp("runs")
    config = TrainConfig.from_recipe(
        "net",
        DataOptions(data_dir=str(cifar_folder), data_root=str(root / "data")),
        epochs=4,
        batch_size=32,
        lr=0.05,
        augment=False,
        label_smoothing=0.0,
        device="cpu",
    )
    return fit(config, run_dir=root / "net-run").run_dir


def real_cifar10() -> Path:
    """The real CIFAR-10 folder beside the checkout, or skip the test."""
    path = Path(os.environ.get("TOOLKIT_REAL_CIFAR10", REAL_CIFAR10))
    if not (path / "train").is_dir():
        pytest.skip(f"real CIFAR-10 not found at {path}")
    return path


@pytest.fixture(scope="session")
def served_artifacts(tmp_path_factory, trained_run, cifar_folder) -> Path:
    from tests.served import build_served_artifacts

    return build_served_artifacts(tmp_path_factory, trained_run, cifar_folder)
