"""Where `toolkit predict`'s rows go: a CSV or JSONL file, written in one atomic step, or
lines for a terminal."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from serving.classifier import OnnxClassifier
from toolkit.atomic import TEMP_SUFFIX, atomic_write_text
from toolkit.errors import ToolkitError, first_line
from toolkit.predict.classify import Prediction, accuracy

OUTPUT_SUFFIXES = (".csv", ".jsonl")


def check_output(out: Path) -> None:
    """Refuse an --out that could not be written, before any image is read."""
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ToolkitError(f"--out '{out}' must end in .csv or .jsonl")
    if out.is_dir():
        raise ToolkitError(f"--out '{out}' is a folder; name a .csv or .jsonl file")
    for folder in (out.parent, *out.parent.parents):
        if folder.exists() and not folder.is_dir():
            raise ToolkitError(f"cannot write --out '{out}': '{folder}' is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=TEMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
        raise ToolkitError(
            f"cannot write --out '{out}' ({reason}); choose a writable folder"
        ) from None


def write_predictions(out: Path, predictions: Sequence[Prediction], k: int) -> int:
    """Write the classified images to `out` (.csv or .jsonl) in one atomic step: a crash
    leaves the previous file or none, never part of one. Skipped files are not rows.
    Returns the number of rows."""
    rows = [p for p in predictions if p.ok]
    with_true = any(p.true is not None for p in rows)
    if Path(out).suffix.lower() == ".csv":
        text = _csv_text(rows, k, with_true)
    else:
        text = "".join(json.dumps(_json_row(p, with_true)) + "\n" for p in rows)
    atomic_write_text(Path(out), text)
    return len(rows)


def _csv_text(rows: Sequence[Prediction], k: int, with_true: bool) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    ranks = [f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "prob")]
    writer.writerow(["path", *(["true"] if with_true else []), *ranks])
    for p in rows:
        cells = [cell for label, prob in p.top for cell in (label, f"{prob:.6f}")]
        writer.writerow([str(p.path), *([p.true] if with_true else []), *cells])
    return buffer.getvalue()


def _json_row(p: Prediction, with_true: bool) -> dict:
    row: dict = {"path": str(p.path)}
    if with_true:
        row["true"] = p.true
    row["top"] = [{"label": label, "probability": round(prob, 6)} for label, prob in p.top]
    return row


def format_row(p: Prediction) -> str:
    """One classified image as a line for a terminal: path, [true label,] top-k."""
    true = f"  (true: {p.true})" if p.true is not None else ""
    top = "  ".join(f"{label} {prob:.1%}" for label, prob in p.top)
    return f"{p.path}{true}  {top}"


def summary(predictions: Sequence[Prediction], classifier: OnnxClassifier, out: Path | None) -> str:
    """The line after a run: images classified, accuracy in a class-folder tree, skipped."""
    done = sum(p.ok for p in predictions)
    line = f"{done:,} image{'' if done == 1 else 's'} classified by {classifier.name}"
    if (top1 := accuracy(predictions, 1)) is not None:
        k = min(5, len(classifier.classes))
        line += f"; top-1 accuracy {top1:.2%}, top-{k} {accuracy(predictions, k):.2%}"
    if skipped := len(predictions) - done:
        line += f"; {skipped:,} skipped"
    return line + (f"; rows written to {out}" if out is not None else "")
