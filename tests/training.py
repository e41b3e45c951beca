"""Small training helpers shared by the train, engine and distributed tests."""

from __future__ import annotations

from pathlib import Path

import toolkit.train
from toolkit.data import DataOptions
from toolkit.train import RunResult, TrainConfig, fit


def tiny_config(folder: Path, data_root: Path, **overrides) -> TrainConfig:
    """`net` on a synthetic image folder, 2 epochs of batch 32 on the CPU, unless overridden."""
    values = dict(
        model="net",
        data=DataOptions(data_dir=str(folder), data_root=str(data_root)),
        epochs=2,
        batch_size=32,
        lr=0.05,
        device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def fit_interrupted_in_second_epoch(config: TrainConfig, run_dir: Path) -> RunResult:
    """Train until Ctrl-C arrives at the start of epoch 2, as a user pressing it would."""
    calls = {"n": 0}
    real_epoch = toolkit.train.train_one_epoch

    def interrupt_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    toolkit.train.train_one_epoch = interrupt_second_epoch
    try:
        return fit(config, run_dir=run_dir)
    finally:
        toolkit.train.train_one_epoch = real_epoch
