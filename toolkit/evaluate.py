"""Honest evaluation of a run's own best checkpoint, and the comparison table across runs.

    RUN/best.pt + the run's data (same files, same val carve) --> RUN/eval/ (RUN/eval-val/)

The split is named explicitly (test by default), the checkpoint is always the run's best.pt
(chosen on val during training), and the data must carry the fingerprint recorded in that
checkpoint, so a report can never describe another model or other images than it claims to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit import plots
from toolkit.atomic import (
    atomic_folder,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temp,
)
from toolkit.data import DataBundle, DataOptions, Split, load_data
from toolkit.errors import ToolkitError
from toolkit.runs import load_checkpoint, read_json, write_csv_rows

log = logging.getLogger(__name__)

SPLITS = {"test": "eval", "val": "eval-val"}  # split -> output folder inside the run
FAILURES_PER_CLASS = 2


# --- pure maths ------------------------------------------------------------------------------


def compute_metrics(labels: torch.Tensor, logits: torch.Tensor, classes) -> dict:
    """Accuracy, loss, confusion matrix (rows true, columns predicted), per-class rows and the
    sklearn classification report (dict and text) for one split's labels and logits.

    Per-class accuracy is None for a class with no images in the split (0/0 is not 0 %).
    """
    from sklearn.metrics import classification_report

    classes, k = list(classes), len(classes)
    labels, logits = labels.long().cpu(), logits.float().cpu()
    if len(labels) == 0:
        raise ToolkitError("cannot evaluate an empty split")
    preds = logits.argmax(1)
    confusion = torch.bincount(labels * k + preds, minlength=k * k).reshape(k, k).numpy()
    support, correct = confusion.sum(axis=1), np.diag(confusion)
    per_class = [
        {"class": name, "support": int(n), "correct": int(ok), "accuracy": ok / n if n else None}
        for name, n, ok in zip(classes, support.tolist(), correct.tolist(), strict=True)
    ]
    # labels=range(k): every class gets a row, even one absent from this split.
    args = dict(
        y_true=labels.numpy(),
        y_pred=preds.numpy(),
        labels=list(range(k)),
        target_names=classes,
        digits=4,
        zero_division=0,
    )
    report = classification_report(**args, output_dict=True)
    return {
        "n": len(labels),
        "accuracy": float(correct.sum() / len(labels)),
        "loss": F.cross_entropy(logits, labels).item(),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "confusion": confusion,
        "per_class": per_class,
        "report": report,
        "report_text": classification_report(**args),
    }


def select_failures(
    labels: torch.Tensor, logits: torch.Tensor, k: int = FAILURES_PER_CLASS
) -> list[dict]:
    """For each true class, in class order, its `k` most confident wrong predictions.

    Entries are {"index", "true", "predicted", "confidence"} (class indices; confidence is the
    softmax probability of the predicted class), sorted by descending confidence within a
    class; ties keep split order, so the gallery is deterministic.
    """
    confidence, preds = logits.float().softmax(1).max(1)
    out = []
    for c in labels.unique(sorted=True).tolist():
        wrong = torch.nonzero((labels == c) & (preds != labels)).flatten()
        order = torch.argsort(confidence[wrong], descending=True, stable=True)
        out += [
            {"index": i, "true": c, "predicted": int(preds[i]), "confidence": float(confidence[i])}
            for i in wrong[order][:k].tolist()
        ]
    return out


# --- evaluate_run ----------------------------------------------------------------------------


@dataclass
class _Run:
    path: Path
    config: dict
    ckpt: dict


def _load_run(run_dir: Path) -> _Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ToolkitError(f"run folder '{run_dir}' does not exist")
    config = read_json(run_dir / "config.json")
    # Never last.pt: the report must describe the checkpoint that was chosen on val.
    return _Run(run_dir, config, load_checkpoint(run_dir / "best.pt"))


def _run_data(run: _Run, data: DataBundle | None) -> DataBundle:
    """The run's own data (same files, same seeded val carve), checked against the checkpoint."""
    if data is None:
        try:
            options = DataOptions(**run.config["data"])
        except (KeyError, TypeError) as exc:
            raise ToolkitError(
                f"'{run.path / 'config.json'}' has no usable 'data' section ({exc}); "
                "was it written by `toolkit train`?"
            ) from exc
        data = load_data(options, seed=run.config.get("seed", 0))
    expected = run.ckpt["dataset"]
    if data.fingerprint != expected["fingerprint"]:
        raise ToolkitError(
            f"the data at '{data.source.get('path')}' is not the data '{run.path}' was trained "
            f"on (fingerprint {data.fingerprint[:12]} != {expected['fingerprint'][:12]}); "
            "restore the original files (same names, sizes and times) or retrain on these"
        )
    if list(data.spec.classes) != expected["classes"] or data.image_size != expected["image_size"]:
        raise ToolkitError(
            f"the data's classes or image size differ from '{run.path / 'best.pt'}'; "
            "evaluate with the dataset options the run was trained with"
        )
    return data


def _check_split_name(split: str) -> None:
    if split not in SPLITS:
        raise ToolkitError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")


def _pick_split(data: DataBundle, split: str, run_dir: Path) -> Split:
    _check_split_name(split)
    if split == "val":
        return data.val
    if data.test is None:
        raise ToolkitError(
            f"the data of '{run_dir}' ({data.source.get('path')}) has no test split; "
            "evaluate the validation split with --split val, or train on data that has a "
            "test/ folder (or test.txt)"
        )
    return data.test


def _predict(run: _Run, split: Split, device: str) -> torch.Tensor:
    from toolkit.engine import Normalizer, pick_device, predict_logits
    from toolkit.runs import build_net

    dev = pick_device(device)
    net = build_net(run.ckpt).to(dev)
    # The checkpoint's mean/std, not the bundle's: the model is what it was trained with.
    normalize = Normalizer(run.ckpt["dataset"]["mean"], run.ckpt["dataset"]["std"], dev)
    return predict_logits(net, split.images, normalize, dev)


def _write_reports(out: Path, metrics: dict, classes: list[str]) -> None:
    atomic_write_text(out / "classification_report.txt", metrics["report_text"])
    atomic_write_json(out / "classification_report.json", metrics["report"])
    matrix = [
        [name, *row] for name, row in zip(classes, metrics["confusion"].tolist(), strict=True)
    ]
    write_csv_rows(out / "confusion_matrix.csv", ["true \\ predicted", *classes], matrix)
    columns = ["class", "support", "correct", "accuracy"]
    rows = [[r[c] if r[c] is not None else "" for c in columns] for r in metrics["per_class"]]
    write_csv_rows(out / "per_class.csv", columns, rows)


def _write_failures(out: Path, split: Split, logits: torch.Tensor, classes: list[str]) -> None:
    """failures/<index>.png, failures.json and the failures.png grid."""
    entries, images, titles = [], [], []
    for f in select_failures(split.labels, logits):
        chw = split.images[f["index"]].numpy()
        entry = {
            **f,
            "true": classes[f["true"]],
            "predicted": classes[f["predicted"]],
            "file": f"failures/{f['index']}.png",
        }
        atomic_write_bytes(out / entry["file"], plots.image_png(chw))
        entries.append(entry)
        images.append(chw)
        titles.append(f"{entry['true']} → {entry['predicted']} ({entry['confidence']:.2f})")
    atomic_write_json(out / "failures.json", entries)
    atomic_write_bytes(out / "failures.png", plots.failures_png(images, titles))


def _write_curves(run: _Run, out: Path) -> None:
    from toolkit.runs import read_metrics

    history = read_metrics(run.path)
    if not history:
        log.warning("no rows in %s; skipping curves.png", run.path / "metrics.csv")
        return
    title = f"{run.ckpt['model']['name']} · {run.path.name}"
    if run.config.get("label_smoothing"):  # train loss is smoothed, val loss is not
        title += f" (train loss with label smoothing {run.config['label_smoothing']})"
    png = plots.curves_png(history, best_epoch=run.ckpt.get("best_epoch"), title=title)
    atomic_write_bytes(out / "curves.png", png)


def evaluate_run(
    run_dir: Path, split: str = "test", device: str = "auto", data: DataBundle | None = None
) -> dict:
    """Evaluate RUN/best.pt on `split` ("test" or "val") of the run's own data.

    Writes RUN/eval/ (RUN/eval-val/ for val): metrics.json, the classification report, the
    confusion matrix (CSV + PNG), per_class.csv, the failure gallery and curves.png. Returns
    a summary: split, run, n, accuracy, loss, macro_f1, checkpoint_epoch, eval_dir.
    """
    run = _load_run(run_dir)
    _check_split_name(split)  # before the (possibly slow) data load
    chosen = _pick_split(_run_data(run, data), split, run.path)
    ckpt, classes = run.ckpt, list(run.ckpt["dataset"]["classes"])
    log.info("evaluating %s (epoch %d) on %s", run.path / "best.pt", ckpt["epoch"], split)
    logits = _predict(run, chosen, device)
    metrics = compute_metrics(chosen.labels, logits, classes)

    out = run.path / SPLITS[split]
    # A killed evaluation's staging folder; two evaluations of one split at once are not
    # supported (the later rename would win anyway).
    remove_stale_temp(run.path, out.name)
    # Written into a fresh hidden folder that replaces `out` whole at the end: a kill leaves
    # the previous evaluation (or none), never a mix, and no earlier file (an old failure
    # image) lingers beside the new ones.
    with atomic_folder(out) as staging:
        record = _write_evaluation(staging, run, chosen, logits, metrics, split)
    log.info("%s accuracy %.4f, reports in %s", split, metrics["accuracy"], out)
    keys = ("split", "n", "accuracy", "loss", "macro_f1", "checkpoint_epoch")
    return {**{k: record[k] for k in keys}, "run": str(run.path), "eval_dir": str(out)}


def _write_evaluation(
    out: Path, run: _Run, chosen: Split, logits: torch.Tensor, metrics: dict, split: str
) -> dict:
    """Every file of an evaluation into `out`; returns metrics.json's record."""
    ckpt, classes = run.ckpt, list(run.ckpt["dataset"]["classes"])
    _write_reports(out, metrics, classes)
    _write_failures(out, chosen, logits, classes)
    title = f"{ckpt['model']['name']} · {split} accuracy {metrics['accuracy']:.2%}"
    cm_png = plots.confusion_matrix_png(metrics["confusion"], classes, title)
    atomic_write_bytes(out / "confusion_matrix.png", cm_png)
    _write_curves(run, out)
    record = {
        "split": split,
        **{k: metrics[k] for k in ("n", "accuracy", "loss", "macro_f1")},
        "per_class_accuracy": {r["class"]: r["accuracy"] for r in metrics["per_class"]},
        "checkpoint_epoch": ckpt["epoch"],
        "model": ckpt["model"],
        "dataset": {k: ckpt["dataset"][k] for k in ("name", "image_size", "source", "fingerprint")},
        "evaluated_at": datetime.now().isoformat(timespec="seconds"),
    }
    # Last, though the folder is swapped in whole: an older reader may still treat a present
    # metrics.json as the mark of a finished evaluation.
    atomic_write_json(out / "metrics.json", record)
    return record


# --- compare_runs ----------------------------------------------------------------------------

COMPARE_COLUMNS = (
    "run",
    "model",
    "options",
    "dataset",
    "params",
    "checkpoint (KB)",
    "epochs",
    "train time (s)",
    "best val acc",
    "test acc",
)
_TEXT_COLUMNS = ("run", "model", "options", "dataset")


def _options_text(run: _Run) -> str:
    """Model options plus the training knobs the seed experiments vary, in one short string."""
    opts = run.ckpt["model"].get("options", {})
    parts = [k if v is True else f"{k}={v}" for k, v in sorted(opts.items())]
    return " ".join([*parts, f"recipe={run.config.get('recipe')}", f"l2={run.config.get('l2')}"])


def _test_accuracy(run: _Run) -> float | str:
    """Test accuracy from eval/metrics.json, only when it describes the current best.pt."""
    path = run.path / SPLITS["test"] / "metrics.json"
    if not path.is_file():
        return ""
    metrics = read_json(path)
    if metrics.get("split") != "test" or metrics.get("checkpoint_epoch") != run.ckpt["epoch"]:
        log.warning("%s describes another checkpoint; run `toolkit evaluate %s`", path, run.path)
        return ""
    return float(metrics["accuracy"])


def _compare_row(run_dir: Path) -> dict:
    from toolkit.models import count_parameters
    from toolkit.runs import build_net, read_metrics

    run = _load_run(run_dir)
    history = read_metrics(run.path)
    ds = run.ckpt["dataset"]
    return {
        "run": run.path.name,
        "model": run.ckpt["model"]["name"],
        "options": _options_text(run),
        "dataset": f"{ds['name']} {ds['image_size']}px",
        "params": count_parameters(build_net(run.ckpt)),
        "checkpoint (KB)": round((run.path / "best.pt").stat().st_size / 1024, 1),
        "epochs": len(history),
        "train time (s)": round(sum(r["seconds"] for r in history), 2),
        "best val acc": float(run.ckpt["best_val_acc"]),
        "test acc": _test_accuracy(run),
    }


def _markdown_cell(column: str, value) -> str:
    if value == "":
        return "—"
    if column.endswith("acc"):
        return f"{value:.2%}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def _markdown(rows: list[dict]) -> str:
    align = ["---" if c in _TEXT_COLUMNS else "---:" for c in COMPARE_COLUMNS]
    lines = ["| " + " | ".join(COMPARE_COLUMNS) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_markdown_cell(c, r[c]) for c in COMPARE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: list[Path], out_dir: Path | None = None) -> list[dict]:
    """One row per run: params, checkpoint size, epochs, train time, best val and test acc.

    With `out_dir`, also writes comparison.md (Markdown table) and comparison.csv there.
    """
    if not run_dirs:
        raise ToolkitError("name at least one run folder to compare")
    rows = [_compare_row(Path(r)) for r in run_dirs]
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / "comparison.md", _markdown(rows))
        table = [[r[c] for c in COMPARE_COLUMNS] for r in rows]
        write_csv_rows(Path(out_dir) / "comparison.csv", COMPARE_COLUMNS, table)
        log.info("comparison of %d runs written to %s", len(rows), out_dir)
    return rows
