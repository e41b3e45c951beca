"""A run's state, each question answered in one place for every reader:

- which epoch is best (`best_row`): the rule fit saves best.pt by, and the one `toolkit
  reproduce` reads metrics.csv with;
- whether eval/, export/ and the calibration describe the current best.pt
  (`current_evaluation`, `current_export`, `current_calibration`): the same checkpoint epoch
  *and* the same data fingerprint;
- the run's own data (`load_run_data`). The policy: evaluation and export use exactly the
  data the model was trained on, loaded with the run's options and seed (so the val carve
  is the same), and refuse when the files have changed since, naming the fix; a report
  must never describe other images than the model was chosen on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from toolkit.data import DataBundle, DataOptions, load_data
from toolkit.data.specs import parse_size
from toolkit.errors import ToolkitError
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import read_json

log = logging.getLogger(__name__)

EVAL_DIRS = {"test": "eval", "val": "eval-val"}  # split -> evaluation folder in the run
EVAL_RECORD = "metrics.json"  # written last by toolkit evaluate
EXPORT_DIR, EXPORT_REPORT = "export", "export-report.json"  # the report: written last
CALIBRATION_RECORD = "calibration.json"  # the temperature and threshold fitted on val


def best_row(history: Sequence[dict]) -> dict | None:
    """The metrics row of the best epoch: the first one with the highest val accuracy, so a
    run whose val accuracy never rises (even one stuck at 0 %) has best.pt at epoch 1.
    A run without val (--val-fraction 0: val accuracy NaN) makes no selection: the last row.
    None before the first epoch."""
    if not history:
        return None
    if all(math.isnan(row["val_acc"]) for row in history):
        return history[-1]
    return max(history, key=lambda row: row["val_acc"])


def current_evaluation(
    run_dir: Path, epoch: int, fingerprint: str, split: str = "test"
) -> dict | None:
    """RUN/eval/metrics.json (eval-val/ for val) when it evaluates the checkpoint of `epoch`
    trained on the data `fingerprint`; None when absent, unreadable or stale."""
    record = _read_record(Path(run_dir) / EVAL_DIRS[split] / EVAL_RECORD)
    if record is None:
        return None
    dataset = record.get("dataset") if isinstance(record.get("dataset"), dict) else {}
    current = (
        record.get("split") == split
        and record.get("checkpoint_epoch") == epoch
        and dataset.get("fingerprint") == fingerprint
    )
    return record if current else None


def current_export(run_dir: Path, epoch: int, fingerprint: str) -> dict | None:
    """RUN/export/export-report.json when it exported the checkpoint of `epoch` trained on
    the data `fingerprint`; None when absent, unreadable or stale."""
    report = _read_record(Path(run_dir) / EXPORT_DIR / EXPORT_REPORT)
    checkpoint = report.get("checkpoint") if isinstance(report, dict) else None
    if not isinstance(checkpoint, dict):
        return None
    current = checkpoint.get("epoch") == epoch and checkpoint.get("fingerprint") == fingerprint
    return report if current else None


def calibration_record(tta: int = 0, below: float = 1.0) -> str:
    """The calibration of the plain logits (RUN/calibration.json), or of those averaged
    over test-time augmentation level `tta` (what `toolkit export --tta` serves), for the
    images below a top-1 probability of `below` only (selective TTA)."""
    if not tta:
        return CALIBRATION_RECORD
    return (
        f"calibration-tta{tta}.json"
        if below >= 1.0
        else f"calibration-tta{tta}-below{below:g}.json"
    )


def current_calibration(
    run_dir: Path, epoch: int, fingerprint: str, tta: int = 0, below: float = 1.0
) -> dict | None:
    """RUN/calibration.json (calibration_record) when it was fitted for the checkpoint of
    `epoch` trained on the data `fingerprint`; None when absent, unreadable or stale."""
    record = _read_record(Path(run_dir) / calibration_record(tta, below))
    if record is None:
        return None
    current = record.get("checkpoint_epoch") == epoch and record.get("fingerprint") == fingerprint
    return record if current else None


def _read_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except ToolkitError as exc:  # a damaged record is as good as none: it gets redone
        log.warning("ignoring %s", exc)
        return None
    return record if isinstance(record, dict) else None


def load_run_data(run_dir: Path, ckpt: Checkpoint) -> DataBundle:
    """The data `ckpt` was trained on, loaded as training loaded it; see the module policy."""
    try:
        options = DataOptions(**ckpt.config["data"])
    except (KeyError, TypeError) as exc:
        raise ToolkitError(
            f"the checkpoint of '{run_dir}' does not describe its data ({exc}); "
            "was it written by `toolkit train`?"
        ) from exc
    data = load_data(options, seed=int(ckpt.config.get("seed", 0)))
    check_run_data(run_dir, ckpt, data)
    return data


def check_run_data(run_dir: Path, ckpt: Checkpoint, data: DataBundle) -> None:
    """Refuse `data` unless it is the data `ckpt` was trained on (same pixels and labels,
    classes and image size)."""
    if data.fingerprint != ckpt.fingerprint:
        raise ToolkitError(
            f"the data at '{data.source.get('path')}' is not the data '{run_dir}' was trained "
            f"on (fingerprint {data.fingerprint[:12]} != {ckpt.fingerprint[:12]}); "
            "restore the original files, or train a new run on these"
        )
    same_classes = list(data.spec.classes) == list(ckpt.dataset["classes"])
    if not same_classes or data.size_hw != parse_size(ckpt.dataset["image_size"]):
        raise ToolkitError(
            f"the data's classes or image size differ from the checkpoint of '{run_dir}'; "
            "use the dataset options the run was trained with"
        )
    # Runs from before test carving trained on all of train: a test carved from it now would
    # be images the model has seen.
    if data.test_is_carved and not ckpt.dataset.get("test_is_carved", False):
        raise ToolkitError(
            f"'{run_dir}' was trained on all of its train images (a toolkit from before test "
            "splits were carved from a source without one), so no honest test split is left; "
            "add a test/ folder, or train a new run"
        )
