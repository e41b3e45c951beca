"""A run's calibration: the calibrator (toolkit.evaluate.calibrators, chosen among several
on val) and the "not sure" threshold, fitted once on its val split and recorded in
RUN/calibration.json for the best.pt they belong to.

`toolkit evaluate` reports them on the test split and `toolkit export` puts them into the
ONNX model (the calibrator in the graph, its description and the threshold in its
metadata); whichever runs first fits them, the other reads the record. The test split is
never used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from toolkit.atomic import atomic_write_json
from toolkit.data import DataBundle
from toolkit.evaluate.calibration import (
    SELECTIVE_TARGET,
    calibration_metrics,
    fit_selective,
    scaled_probs,
)
from toolkit.evaluate.calibrators import choose_calibrator
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.state import calibration_record, current_calibration
from toolkit.train.batches import Normalizer
from toolkit.train.engine import eval_batch_size, pick_device, predict_logits
from toolkit.tta import TTAClassifier

log = logging.getLogger(__name__)


def checkpoint_logits(
    ckpt: Checkpoint,
    images: torch.Tensor,
    device: str = "auto",
    tta: int = 0,
    below: float = 1.0,
) -> torch.Tensor:
    """Logits of the checkpoint's model for uint8 images (normalised as it was trained),
    averaged over the test-time augmentation views of level `tta` (toolkit.tta), for the
    images whose plain top-1 probability is below `below` (selective TTA)."""
    dev = pick_device(device)
    normalize = Normalizer(ckpt.dataset["mean"], ckpt.dataset["std"], dev)
    net = TTAClassifier(ckpt.build_net(), tta, below) if tta else ckpt.build_net()
    views = net.views if tta else 1
    # Every view goes through in one batch: keep the images per call as without TTA.
    batch = max(1, eval_batch_size(dev) // views)
    return predict_logits(net.to(dev), images, normalize, dev, batch_size=batch)


def calibrate_run(
    run_dir: Path,
    ckpt: Checkpoint,
    data: DataBundle,
    device: str = "auto",
    tta: int = 0,
    below: float = 1.0,
) -> dict:
    """RUN/calibration.json's record for `ckpt`: read when current, else fitted on val.
    With `tta` (a level of toolkit.tta, selective below `below`) it calibrates the logits
    a `toolkit export --tta` graph serves, in a record of its own."""
    record = current_calibration(run_dir, ckpt.epoch, ckpt.fingerprint, tta, below)
    if record is not None:
        return record
    if len(data.val) == 0:
        log.warning("%s has no val split: its probabilities stay uncalibrated (T = 1)", run_dir)
        record = {
            "temperature": 1.0,
            "method": "temperature",
            "fitted_on": None,
            "note": "no val split (--val-fraction 0): not calibrated, T = 1, no threshold",
            "selective": {"target_accuracy": SELECTIVE_TARGET, "threshold": None},
        }
    else:
        val_logits = checkpoint_logits(ckpt, data.val.images, device, tta=tta, below=below)
        record = {**fit_calibration(val_logits, data.val.labels), "tta": tta}
        if tta and below < 1.0:
            record["tta_below"] = below
        log.info(
            "calibrated %s on %d val images: %s, T = %.3f, not sure below %s",
            run_dir,
            len(data.val),
            record["method"],
            record["temperature"],
            record["selective"]["threshold"],
        )
    record = {**record, "checkpoint_epoch": ckpt.epoch, "fingerprint": ckpt.fingerprint}
    atomic_write_json(Path(run_dir) / calibration_record(tta, below), record)
    return record


def fit_calibration(val_logits: torch.Tensor, val_labels: torch.Tensor) -> dict:
    """The calibrator chosen on these val logits, the selective threshold of its
    probabilities, and the figures they give on val ("temperature" is the calibrator's
    own, the whole calibration for method "temperature")."""
    calibrator, choice = choose_calibrator(val_logits, val_labels)
    calibrated = calibrator.probs(val_logits)
    return {
        "temperature": calibrator.temperature,
        "method": calibrator.method,
        "calibrator": calibrator.record(),
        "description": calibrator.describe(),
        "chosen_because": choice["reason"],
        "fitted_on": "val",
        "val_images": len(val_labels),
        "val_candidates": choice["candidates"],
        "val_raw": calibration_metrics(scaled_probs(val_logits), val_labels),
        "val_calibrated": calibration_metrics(calibrated, val_labels),
        "selective": fit_selective(calibrated, val_labels, SELECTIVE_TARGET),
    }
