"""`toolkit compare`: one table row per run (params, size, time, val and test accuracy)."""

from __future__ import annotations

import logging
from pathlib import Path

from toolkit.atomic import atomic_write_text
from toolkit.data.specs import parse_size, size_label
from toolkit.errors import ToolkitError
from toolkit.models import count_parameters
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import read_metrics, write_csv_rows
from toolkit.run.state import current_evaluation

log = logging.getLogger(__name__)

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


def _options_text(ckpt: Checkpoint) -> str:
    """Model options plus the training knobs the seed experiments vary, in one short string."""
    parts = [k if v is True else f"{k}={v}" for k, v in sorted(ckpt.model["options"].items())]
    config = ckpt.config
    return " ".join([*parts, f"recipe={config.get('recipe')}", f"l2={config.get('l2')}"])


def _test_accuracy(run_dir: Path, ckpt: Checkpoint) -> float | str:
    """Test accuracy from eval/, only when that evaluation describes the current best.pt."""
    record = current_evaluation(run_dir, ckpt.epoch, ckpt.fingerprint)
    if record is None:
        if (run_dir / "eval").is_dir():
            log.warning(
                "%s/eval is not of the current best.pt; run `toolkit evaluate %s`", run_dir, run_dir
            )
        return ""
    return float(record["accuracy"])


def _compare_row(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise ToolkitError(f"run folder '{run_dir}' does not exist")
    ckpt = Checkpoint.load(run_dir / "best.pt")
    history = read_metrics(run_dir)
    ds = ckpt.dataset
    return {
        "run": run_dir.name,
        "model": ckpt.model["name"],
        "options": _options_text(ckpt),
        "dataset": f"{ds['name']} {size_label(parse_size(ds['image_size']))}px",
        "params": count_parameters(ckpt.build_net()),
        "checkpoint (KB)": round((run_dir / "best.pt").stat().st_size / 1024, 1),
        "epochs": len(history),
        "train time (s)": round(sum(r["seconds"] for r in history), 2),
        "best val acc": float(ckpt.best_val_acc),
        "test acc": _test_accuracy(run_dir, ckpt),
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
