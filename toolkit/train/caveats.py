"""What train.log must tell a reader about the data a run trained on."""

from __future__ import annotations

import logging

from toolkit.audit.record import find_audit
from toolkit.data import DataBundle
from toolkit.data.specs import imbalance
from toolkit.train.config import TrainConfig

log = logging.getLogger("toolkit.train")

IMBALANCE_WARNING = 3.0  # largest / smallest class of train above which the log says so


def log_data_caveats(data: DataBundle, config: TrainConfig, resumed: bool) -> None:
    """What a reader of the run must know about its data, in train.log: no val, a test split
    held out from train, class imbalance (config.json records all three), test images that
    an audit of this data found repeating training images, and a recipe fitted to a small
    training set. A carved val is the documented default and goes unremarked."""
    if not len(data.val):
        log.warning("no val split (--val-fraction 0): no epoch is selected, best.pt = last.pt")
    if data.test_is_carved:  # said at load time too, but that was before train.log opened
        log.warning("test: %d images held out from train (the source has none)", len(data.test))
    skew = imbalance(data.class_counts()["train"])
    if skew["ratio"] >= IMBALANCE_WARNING:
        log.warning(
            "imbalanced classes: train has %.1fx as many '%s' as '%s' images; per-class "
            "counts are in config.json and the evaluation",
            skew["ratio"],
            skew["largest"],
            skew["smallest"],
        )
    audit = find_audit(data.fingerprint, config.data.data_root)
    leaked = audit.summary["counts"]["test_images_leaking_from_train"] if audit else 0
    if leaked:
        log.warning(
            "the audit of this data (%s) found %d test image(s) repeating a training image: "
            "test accuracy is partly memory; `toolkit evaluate` also reports it without them",
            audit.folder,
            leaked,
        )
    if config.fitted_to_data and not resumed:
        fitted = config.fitted_to_data
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in fitted["changed"].items())
        log.warning("recipe fitted to the data: %s (%s)", changed, fitted["why"])
