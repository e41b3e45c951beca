"""Honest evaluation of a run's own best checkpoint.

    RUN/best.pt + the run's data (same files, same val carve) --> RUN/eval/ (RUN/eval-val/)

The split is named explicitly (test by default), the checkpoint is always the run's best.pt
(chosen on val during training), and the data must be the data that checkpoint was trained
on (toolkit.run.state's policy), so a report can never describe another model or other
images than it claims to.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.atomic import (
    atomic_folder,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temp,
)
from toolkit.data import DataBundle, Split
from toolkit.data.specs import imbalance
from toolkit.errors import ToolkitError
from toolkit.evaluate import plots
from toolkit.evaluate.audited import audit_report
from toolkit.evaluate.calibrate import calibrate_run, checkpoint_logits
from toolkit.evaluate.calibration import (
    calibration_metrics,
    reliability_bins,
    scaled_probs,
    selective_result,
)
from toolkit.evaluate.calibrators import Calibrator
from toolkit.evaluate.chance import learned_nothing
from toolkit.evaluate.metrics import compute_metrics, select_failures
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import read_metrics, write_csv_rows
from toolkit.run.state import EVAL_DIRS, EVAL_RECORD, check_run_data, load_run_data
from toolkit.tta import TTAClassifier

log = logging.getLogger(__name__)


def evaluate_run(
    run_dir: Path, split: str = "test", device: str = "auto", data: DataBundle | None = None
) -> dict:
    """Evaluate RUN/best.pt on `split` ("test" or "val") of the run's own data.

    Writes RUN/eval/ (RUN/eval-val/ for val): metrics.json (with the calibration of the raw
    and the temperature-scaled probabilities), the classification report, the confusion
    matrix (CSV + PNG), the reliability diagram, per_class.csv, the failure gallery and
    curves.png; RUN/calibration.json when the run had none for this best.pt. Returns
    a summary: split, run, n, accuracy, loss, macro_f1, checkpoint_epoch, calibration,
    eval_dir.
    `data` is the run's data when the caller has it loaded already (it is checked).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ToolkitError(f"run folder '{run_dir}' does not exist")
    if split not in EVAL_DIRS:  # before the (possibly slow) data load
        raise ToolkitError(f"unknown split '{split}'; choose one of: {', '.join(EVAL_DIRS)}")
    # Never last.pt: the report must describe the checkpoint that was chosen on val.
    ckpt = Checkpoint.load(run_dir / "best.pt")
    if data is None:
        data = load_run_data(run_dir, ckpt)
    else:
        check_run_data(run_dir, ckpt, data)
    chosen = _pick_split(data, split, run_dir)
    calibration = calibrate_run(run_dir, ckpt, data, device)  # fitted on val, never on test
    log.info("evaluating %s (epoch %d) on %s", run_dir / "best.pt", ckpt.epoch, split)
    logits = checkpoint_logits(ckpt, chosen.images, device)
    metrics = compute_metrics(chosen.labels, logits, ckpt.dataset["classes"])
    metrics["calibration"] = calibration_report(logits, chosen.labels, calibration)
    metrics["tta"], tta_logits = tta_report(ckpt, chosen, logits, device)
    classes = ckpt.dataset["classes"]
    metrics["learned_nothing"] = learned_nothing(logits.argmax(1), chosen.labels, classes)
    if metrics["learned_nothing"]:
        verdict = metrics["learned_nothing"]
        log.warning("no sign this model learned anything: on %s %s", split, verdict)
    predictions = {"plain": logits.argmax(1)}
    if tta_logits is not None:
        predictions["tta"] = tta_logits.argmax(1)
    data_root = ckpt.config.get("data", {}).get("data_root")
    metrics["audit"], doubts = audit_report(data, split, chosen.labels, predictions, data_root)

    out = run_dir / EVAL_DIRS[split]
    # A killed evaluation's staging folder; two evaluations of one split at once are not
    # supported (the later rename would win anyway).
    remove_stale_temp(run_dir, out.name)
    # Written into a fresh hidden folder that replaces `out` whole at the end: a kill leaves
    # the previous evaluation (or none), never a mix, and no earlier file (an old failure
    # image) lingers beside the new ones.
    metrics["data"] = data_report(data, split)
    with atomic_folder(out) as staging:
        record = _write_evaluation(staging, run_dir, ckpt, chosen, logits, metrics, split, doubts)
    log.info("%s accuracy %.4f, reports in %s", split, metrics["accuracy"], out)
    keys = (
        *("split", "n", "accuracy", "top5_accuracy", "loss", "macro_f1"),
        *("checkpoint_epoch", "calibration", "data", "tta", "audit", "learned_nothing"),
    )
    return {**{k: record[k] for k in keys}, "run": str(run_dir), "eval_dir": str(out)}


def tta_report(
    ckpt: Checkpoint, chosen: Split, logits: torch.Tensor, device: str
) -> tuple[dict, torch.Tensor | None]:
    """The accuracy with the run's test-time augmentation (--tta, part of the model when
    used: `toolkit export --tta` serves it) beside the plain one, and the TTA logits; level
    0: no TTA (and None)."""
    level, below = int(ckpt.config.get("tta", 0)), float(ckpt.config.get("tta_below", 1.0))
    plain = (logits.argmax(1) == chosen.labels).float().mean().item()
    if not level:
        return {"level": 0, "accuracy_without": plain}, None
    start = time.perf_counter()
    # The plain pass again, inside: the timing is the whole TTA evaluation, as airbench's.
    tta_logits = checkpoint_logits(ckpt, chosen.images, device, tta=level, below=below)
    seconds = time.perf_counter() - start  # airbench counts its TTA evaluation as training time
    accuracy = (tta_logits.argmax(1) == chosen.labels).float().mean().item()
    with_views = (logits.softmax(1).amax(1) < below).float().mean().item()
    log.info(
        "with TTA (level %d, on %.0f%% of the images): accuracy %.4f (without: %.4f)",
        level,
        100 * with_views,
        accuracy,
        plain,
    )
    report = {
        "level": level,
        "views": TTAClassifier(nn.Identity(), level).views,
        "below": below,
        "with_views": with_views,
        "accuracy": accuracy,
        "accuracy_without": plain,
        "loss": F.cross_entropy(tta_logits, chosen.labels).item(),
        "seconds": seconds,
    }
    return report, tta_logits


def _pick_split(data: DataBundle, split: str, run_dir: Path) -> Split:
    return data.val if split == "val" else data.test


def data_report(data: DataBundle, split: str) -> dict:
    """Where the evaluated images came from and how balanced the classes are: a carved test
    split and a skewed training set are stated in the report, never left to be guessed."""
    counts = data.class_counts()
    # Not logged here: load_data already warned of a carved test split, and the CLI repeats it.
    return {
        "split_is_carved": data.test_is_carved if split == "test" else data.val_is_carved,
        "class_counts": counts,
        "train_imbalance": imbalance(counts["train"]),
    }


def calibration_report(logits: torch.Tensor, labels: torch.Tensor, calibration: dict) -> dict:
    """How calibrated the raw and the served (calibrated) probabilities are on these images,
    and what the val-fitted "not sure" threshold keeps of them."""
    raw = scaled_probs(logits)
    calibrated = Calibrator.from_record(calibration).probs(logits)
    selective = calibration["selective"]
    return {
        "temperature": calibration["temperature"],
        "method": calibration.get("method", "temperature"),
        **{k: calibration[k] for k in ("calibrator", "description") if k in calibration},
        "fitted_on": calibration["fitted_on"],
        "raw": {**calibration_metrics(raw, labels), "bins": reliability_bins(raw, labels)},
        "calibrated": {
            **calibration_metrics(calibrated, labels),
            "bins": reliability_bins(calibrated, labels),
        },
        "selective": {
            **selective,
            **selective_result(calibrated, labels, selective["threshold"]),
        },
    }


def _write_evaluation(
    out: Path,
    run_dir: Path,
    ckpt: Checkpoint,
    chosen: Split,
    logits: torch.Tensor,
    metrics: dict,
    split: str,
    doubts: dict[int, str],
) -> dict:
    """Every file of an evaluation into `out`; returns metrics.json's record."""
    classes = list(ckpt.dataset["classes"])
    _write_reports(out, metrics, classes)
    # With the served (calibrated) confidence: the gallery shows what the app would say
    # (as log-probabilities, whose softmax select_failures takes is the probabilities).
    calibrated = Calibrator.from_record(metrics["calibration"]).probs(logits)
    _write_failures(out, chosen, calibrated.log(), classes, doubts)
    title = f"{ckpt.model['name']} · {split} accuracy {metrics['accuracy']:.2%}"
    cm_png = plots.confusion_matrix_png(metrics["confusion"], classes, title)
    atomic_write_bytes(out / "confusion_matrix.png", cm_png)
    diagram = reliability_png(ckpt.model["name"], split, metrics["calibration"])
    atomic_write_bytes(out / "reliability_diagram.png", diagram)
    _write_curves(out, run_dir, ckpt)
    record = {
        "split": split,
        **{k: metrics[k] for k in ("n", "accuracy", "top5_accuracy", "loss", "macro_f1")},
        "per_class_accuracy": {r["class"]: r["accuracy"] for r in metrics["per_class"]},
        "calibration": metrics["calibration"],
        "data": metrics["data"],
        "tta": metrics["tta"],
        "audit": metrics["audit"],
        "learned_nothing": metrics["learned_nothing"],  # None, or why it is at chance
        "checkpoint_epoch": ckpt.epoch,
        "model": ckpt.model,
        "dataset": {k: ckpt.dataset[k] for k in ("name", "image_size", "source", "fingerprint")},
        "evaluated_at": datetime.now().isoformat(timespec="seconds"),
    }
    # Last, though the folder is swapped in whole: an older reader may still treat a present
    # metrics.json as the mark of a finished evaluation.
    atomic_write_json(out / EVAL_RECORD, record)
    return record


def reliability_png(model: str, split: str, c: dict) -> bytes:
    """The reliability diagram of a calibration report (calibration_report): raw and served."""
    raw, calibrated = c["raw"], c["calibrated"]
    curves = {
        f"raw (ECE {raw['ece']:.2%})": raw["bins"],
        f"{_calibrated_label(c)} (ECE {calibrated['ece']:.2%})": calibrated["bins"],
    }
    return plots.reliability_png(curves, f"{model} · {split} · reliability")


def _calibrated_label(c: dict) -> str:
    method = c.get("method", "temperature")
    return f"T = {c['temperature']:.2f}" if method == "temperature" else method


def _write_reports(out: Path, metrics: dict, classes: list[str]) -> None:
    atomic_write_text(out / "classification_report.txt", metrics["report_text"])
    atomic_write_json(out / "classification_report.json", metrics["report"])
    matrix = [
        [name, *row] for name, row in zip(classes, metrics["confusion"].tolist(), strict=True)
    ]
    write_csv_rows(out / "confusion_matrix.csv", ["true \\ predicted", *classes], matrix)
    columns = ["class", "support", "correct", "accuracy"]
    rows = [[r[c] if r[c] is not None else "" for c in columns] for r in metrics["per_class"]]
    trained_on = metrics["data"]["class_counts"]["train"]
    rows = [[*row, trained_on[name]] for row, name in zip(rows, classes, strict=True)]
    write_csv_rows(out / "per_class.csv", [*columns, "train_images"], rows)


def _write_failures(
    out: Path, split: Split, logits: torch.Tensor, classes: list[str], doubts: dict[int, str]
) -> None:
    """failures/<index>.png, failures.json and the failures.png grid; a failure whose label
    the data audit doubts says which class it suggests (the model may be right)."""
    entries, images, titles = [], [], []
    for f in select_failures(split.labels, logits):
        chw = split.images[f["index"]].numpy()
        entry = {
            **f,
            "true": classes[f["true"]],
            "predicted": classes[f["predicted"]],
            "file": f"failures/{f['index']}.png",
        }
        if f["index"] in doubts:
            entry["label_doubt"] = {"suggested": doubts[f["index"]]}
        atomic_write_bytes(out / entry["file"], plots.image_png(chw))
        entries.append(entry)
        images.append(chw)
        doubt = " · label?" if "label_doubt" in entry else ""
        titles.append(f"{entry['true']} → {entry['predicted']} ({entry['confidence']:.2f}){doubt}")
    atomic_write_json(out / "failures.json", entries)
    atomic_write_bytes(out / "failures.png", plots.failures_png(images, titles))


def _write_curves(out: Path, run_dir: Path, ckpt: Checkpoint) -> None:
    history = read_metrics(run_dir)
    if not history:
        log.warning("no rows in %s; skipping curves.png", run_dir / "metrics.csv")
        return
    title = f"{ckpt.model['name']} · {run_dir.name}"
    smoothing = ckpt.config.get("label_smoothing")
    if smoothing:  # train loss is smoothed, val loss is not
        title += f" (train loss with label smoothing {smoothing})"
    png = plots.curves_png(history, best_epoch=ckpt.best_epoch, title=title)
    atomic_write_bytes(out / "curves.png", png)
