"""Recipes fitted to the data they get: enough optimiser steps on a small folder.

The recipes were made for CIFAR-10's 45,000 training images. On a folder of a few hundred,
speedrun's batch of 1024 is one step per epoch and ten epochs are ten steps: the run ends at
chance with a normal summary. So, unless the flags set them, the batch is capped to give at
least MIN_STEPS_PER_EPOCH steps an epoch and the epochs raised to give MIN_STEPS in all
(not in the seed recipe: it reproduces the reference as it was; not on data the size of the
recipes' own, where they run as written: speedrun's muon recipe is 184 steps on 45,000).
config.json records every change (`fitted_to_data`), and train.log says it. Torch-free:
`toolkit reproduce` plans with it.
"""

from __future__ import annotations

import math
from dataclasses import replace

from toolkit.train.config import TrainConfig

MIN_STEPS_PER_EPOCH = 8
MIN_STEPS = 200
MIN_BATCH = 16  # BatchNorm statistics need a few images; below this the cap stops
# CIFAR-10's 50,000 training images less a val carve of up to a fifth: the recipes' own data.
RECIPE_IMAGES = 40_000


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """len(batches.epoch_batches(n, batch_size, ..., world_size)) without drawing an order."""
    steps = math.ceil(n / batch_size)
    last = n - (steps - 1) * batch_size
    if steps > 1 and last < 2 * world_size:
        steps -= 1
    return steps


def fit_to_data(config: TrainConfig, train_images: int) -> TrainConfig:
    """`config` with its batch size and epochs fitted to `train_images` (those the flags
    set are kept), what changed in its `fitted_to_data`."""
    if config.recipe == "seed" or train_images >= RECIPE_IMAGES:
        return config
    changes: dict = {}
    if "batch_size" not in config.set_by_flags:
        cap = max(MIN_BATCH, train_images // MIN_STEPS_PER_EPOCH)
        if config.batch_size > cap:
            changes["batch_size"] = cap
    steps = steps_per_epoch(train_images, changes.get("batch_size", config.batch_size))
    if "epochs" not in config.set_by_flags and config.epochs * steps < MIN_STEPS:
        changes["epochs"] = math.ceil(MIN_STEPS / steps)
        if config.warmup_epochs and "warmup_epochs" not in config.set_by_flags:  # its share
            changes["warmup_epochs"] = config.warmup_epochs * changes["epochs"] / config.epochs
    if not changes:
        return config
    record = {
        "changed": {k: [getattr(config, k), v] for k, v in changes.items()},
        "why": f"{train_images} training images: at least {MIN_STEPS_PER_EPOCH} optimiser "
        f"steps per epoch and {MIN_STEPS} in all (set --batch-size / --epochs to keep yours)",
    }
    return replace(config, **changes, fitted_to_data=record)
