"""Honest evaluation of a run's own best checkpoint, and the comparison table across runs.

    RUN/best.pt + the run's data (same files, same val carve) --> RUN/eval/ (RUN/eval-val/)

The split is chosen explicitly (test by default, touched only here), the checkpoint is always
the run's best.pt, and the data must have the fingerprint recorded in it, so a report can
never describe a different model or different images than it claims to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from toolkit import plots
from toolkit.data import DataBundle, DataOptions, Split, load_data
from toolkit.errors import ToolkitError
from toolkit.runs import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    read_json,
    write_csv_rows,
)

log = logging.getLogger(__name__)

SPLITS = {"test": "eval", "val": "eval-val"}  # split -> output folder inside the run
FAILURES_PER_CLASS = 2


# --- pure maths ------------------------------------------------------------------------------


def compute_metrics(labels: torch.Tensor, logits: torch.Tensor, classes) -> dict:
    """Accuracy, loss, confusion matrix (rows true, cols predicted), per-class rows, report.

    Per-class accuracy is None for a class with no images in the split (0/0 is not 0 %).
    """
    from sklearn.metrics import classification_report

    classes = list(classes)
    k = len(classes)
    labels = labels.long().cpu()
    logits = logits.float().cpu()
    if len(labels) == 0:
        raise ToolkitError("cannot evaluate an empty split")
    preds = logits.argmax(1)
    confusion = torch.bincount(labels * k + preds, minlength=k * k).reshape(k, k).numpy()
    support = confusion.sum(axis=1)
    correct = np.diag(confusion)
    per_class = [
        dict(class_=name, support=int(n), correct=int(ok), accuracy=float(ok / n) if n else None)
        for name, n, ok in zip(classes, support, correct, strict=True)
    ]
    per_class = [{("class" if k == "class_" else k): v for k, v in r.items()} for r in per_class]
    # labels=range(k): every class gets a row, even one absent from this split.
    y = dict(y_true=labels.numpy(), y_pred=preds.numpy(), labels=list(range(k)))
    report_args = dict(**y, target_names=classes, digits=4, zero_division=0)
    report = classification_report(**report_args, output_dict=True)
    return {
        "n": len(labels),
        "accuracy": float(correct.sum() / len(labels)),
        "loss": F.cross_entropy(logits, labels).item(),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "confusion": confusion,
        "per_class": per_class,
        "report": report,
        "report_text": classification_report(**report_args),
    }


def select_failures(
    labels: torch.Tensor, logits: torch.Tensor, k: int = FAILURES_PER_CLASS
) -> list[dict]:
    """For each true class (in class order) its `k` most confident wrong predictions.

    Within a class the entries are sorted by descending confidence (softmax probability of
    the predicted class); ties keep split order, so the gallery is deterministic.
    """
    probs = logits.float().softmax(1)
    confidence, preds = probs.max(1)
    out = []
    for c in labels.unique(sorted=True).tolist():
        wrong = torch.nonzero((labels == c) & (preds != labels)).flatten()
        order = torch.argsort(confidence[wrong], descending=True, stable=True)
        for i in wrong[order][:k].tolist():
            out.append(
                {
                    "index": i,
                    "true": c,
                    "predicted": int(preds[i]),
                    "confidence": float(confidence[i]),
                }
            )
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
    # Never fall back to last.pt: the report must describe the checkpoint chosen on val.
    ckpt = load_checkpoint(run_dir / "best.pt")
    return _Run(run_dir, config, ckpt)


def _run_data(run: _Run, data: DataBundle | None) -> DataBundle:
    """The run's own data (same files, same seeded val carve), checked against the checkpoint."""
    if data is None:
        try:
            options = DataOptions(**run.config["data"])
        except (KeyError, TypeError) as exc:
            raise ToolkitError(
                f"'{run.path / 'config.json'}' has no usable 'data' section "
                f"({exc}); was it written by `toolkit train`?"
            ) from exc
        data = load_data(options, seed=run.config.get("seed", 0))
    expected = run.ckpt["dataset"]
    if data.fingerprint != expected["fingerprint"]:
        raise ToolkitError(
            f"the data at '{data.source.get('path')}' is not the data '{run.path}' was trained "
            f"on (fingerprint {data.fingerprint[:12]} != {expected['fingerprint'][:12]}); "
            "restore the original files (same names, sizes and times) or retrain on these"
        )
    if list(data.spec.classes) != list(expected["classes"]) or (
        data.image_size != expected["image_size"]
    ):
        raise ToolkitError(
            f"the data's classes or image size differ from '{run.path}/best.pt'; "
            "evaluate with the dataset options the run was trained with"
        )
    return data


def _pick_split(data: DataBundle, split: str, run_dir: Path) -> Split:
    if split not in SPLITS:
        raise ToolkitError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
    if split == "val":
        return data.val
    if data.test is None:
        raise ToolkitError(
            f"the data of '{run_dir}' ({data.source.get('path')}) has no test split; "
            "evaluate the validation split with --split val, or train on data with a "
            "test/ folder (or test.txt)"
        )
    return data.test


def _predict(run: _Run, split: Split, device: str) -> torch.Tensor:
    from toolkit.engine import Normalizer, pick_device, predict_logits
    from toolkit.runs import build_net

    dev = pick_device(device)
    net = build_net(run.ckpt).to(dev)
    # The checkpoint's mean/std, not the bundle's: the model is defined by what it trained with.
    normalize = Normalizer(run.ckpt["dataset"]["mean"], run.ckpt["dataset"]["std"], dev)
    return predict_logits(net, split.images, normalize, dev)


def _write_reports(out: Path, metrics: dict, classes: list[str]) -> None:
    atomic_write_text(out / "classification_report.txt", metrics["report_text"])
    atomic_write_json(out / "classification_report.json", metrics["report"])
    write_csv_rows(
        out / "confusion_matrix.csv",
        ["true \\ predicted", *classes],
        [[name, *map(int, row)] for name, row in zip(classes, metrics["confusion"], strict=True)],
    )
    write_csv_rows(
        out / "per_class.csv",
        ["class", "support", "correct", "accuracy"],
        [
            [
                r["class"],
                r["support"],
                r["correct"],
                "" if r["accuracy"] is None else f"{r['accuracy']:.6f}",
            ]
            for r in metrics["per_class"]
        ],
    )


def _write_failures(out: Path, split: Split, logits: torch.Tensor, classes: list[str]) -> list:
    """failures/<index>.png, failures.json and the failures.png grid; stale PNGs removed."""
    failures = select_failures(split.labels, logits)
    folder = out / "failures"
    entries, images, titles = [], [], []
    for f in failures:
        chw = split.images[f["index"]].numpy()
        rel = f"failures/{f['index']}.png"
        atomic_write_bytes(out / rel, plots.image_png(chw))
        true, pred = classes[f["true"]], classes[f["predicted"]]
        entries.append(
            {
                "index": f["index"],
                "true": true,
                "predicted": pred,
                "confidence": f["confidence"],
                "file": rel,
            }
        )
        images.append(chw)
        titles.append(f"{true} → {pred} ({f['confidence']:.2f})")
    if folder.is_dir():  # an earlier evaluation's images would otherwise linger in the gallery
        keep = {Path(e["file"]).name for e in entries}
        for stale in folder.glob("*.png"):
            if stale.name not in keep:
                stale.unlink()
    atomic_write_json(out / "failures.json", entries)
    atomic_write_bytes(out / "failures.png", plots.failures_png(images, titles))
    return entries


def _write_curves(run: _Run, out: Path) -> None:
    from toolkit.train import read_metrics

    history = read_metrics(run.path)
    if not history:
        log.warning("no metrics.csv rows in %s; skipping curves.png", run.path)
        return
    png = plots.curves_png(
        history,
        best_epoch=run.ckpt.get("best_epoch"),
        title=f"{run.ckpt['model']['name']} · {run.path.name}",
    )
    atomic_write_bytes(out / "curves.png", png)


def evaluate_run(
    run_dir: Path, split: str = "test", device: str = "auto", data: DataBundle | None = None
) -> dict:
    """Evaluate RUN/best.pt on `split` of the run's own data and write RUN/eval[-val]/."""
    run = _load_run(run_dir)
    if split not in SPLITS:  # fail before the (possibly slow) data load
        raise ToolkitError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
    data = _run_data(run, data)
    chosen = _pick_split(data, split, run.path)
    classes = list(run.ckpt["dataset"]["classes"])
    log.info(
        "evaluating %s (epoch %d) on %d %s images",
        run.path / "best.pt",
        run.ckpt["epoch"],
        len(chosen),
        split,
    )
    logits = _predict(run, chosen, device)
    metrics = compute_metrics(chosen.labels, logits, classes)

    out = run.path / SPLITS[split]
    _write_reports(out, metrics, classes)
    _write_failures(out, chosen, logits, classes)
    title = f"{run.ckpt['model']['name']} · {split} accuracy {metrics['accuracy']:.2%}"
    atomic_write_bytes(
        out / "confusion_matrix.png",
        plots.confusion_matrix_png(metrics["confusion"], classes, title),
    )
    _write_curves(run, out)
    ds = run.ckpt["dataset"]
    # metrics.json last: its presence means the whole folder is from this evaluation.
    atomic_write_json(
        out / "metrics.json",
        {
            "split": split,
            "n": metrics["n"],
            "accuracy": metrics["accuracy"],
            "loss": metrics["loss"],
            "macro_f1": metrics["macro_f1"],
            "per_class_accuracy": {r["class"]: r["accuracy"] for r in metrics["per_class"]},
            "checkpoint_epoch": run.ckpt["epoch"],
            "model": run.ckpt["model"],
            "dataset": {k: ds[k] for k in ("name", "image_size", "source", "fingerprint")},
            "evaluated_at": datetime.now().isoformat(timespec="seconds"),
        },
    )
    log.info("%s accuracy %.4f, reports in %s", split, metrics["accuracy"], out)
    return {
        "split": split,
        "run": str(run.path),
        "n": metrics["n"],
        "accuracy": metrics["accuracy"],
        "loss": metrics["loss"],
        "macro_f1": metrics["macro_f1"],
        "checkpoint_epoch": run.ckpt["epoch"],
        "eval_dir": str(out),
    }


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


def _options_text(run: _Run) -> str:
    """Model options and the training knobs the seed experiments vary, as one short string."""
    opts = run.ckpt["model"].get("options", {})
    parts = [k if v is True else f"{k}={v}" for k, v in sorted(opts.items())]
    parts.append(f"recipe={run.config.get('recipe', '?')}")
    parts.append(f"l2={run.config.get('l2', '?')}")
    return " ".join(parts)


def _test_accuracy(run: _Run) -> float | str:
    """Test accuracy from eval/metrics.json, only when it describes the current best.pt."""
    path = run.path / SPLITS["test"] / "metrics.json"
    if not path.is_file():
        return ""
    metrics = read_json(path)
    if metrics.get("checkpoint_epoch") != run.ckpt["epoch"] or metrics.get("split") != "test":
        log.warning("%s is from another checkpoint; re-run `toolkit evaluate %s`", path, run.path)
        return ""
    return float(metrics["accuracy"])


def _compare_row(run_dir: Path) -> dict:
    from toolkit.models import count_parameters
    from toolkit.runs import build_net
    from toolkit.train import read_metrics

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


def _markdown(rows: list[dict]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if value <= 1 else f"{value:,.1f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value).replace("|", "\\|") or "—"

    lines = [
        "| " + " | ".join(COMPARE_COLUMNS) + " |",
        "|"
        + "|".join(
            "---" if c in ("run", "model", "options", "dataset") else "---:"
            for c in COMPARE_COLUMNS
        )
        + "|",
    ]
    lines += ["| " + " | ".join(cell(r[c]) for c in COMPARE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: list[Path], out_dir: Path | None = None) -> list[dict]:
    """One row per run (size, time, accuracy); optionally comparison.md + .csv in `out_dir`."""
    if not run_dirs:
        raise ToolkitError("name at least one run folder to compare")
    rows = [_compare_row(Path(r)) for r in run_dirs]
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / "comparison.md", _markdown(rows))
        write_csv_rows(
            out_dir / "comparison.csv",
            COMPARE_COLUMNS,
            [[r[c] for c in COMPARE_COLUMNS] for r in rows],
        )
        log.info("comparison written to %s", out_dir)
    return rows
