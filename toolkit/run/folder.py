"""The run folder: the unit of work, and the small files in it.

    runs/<dataset>-<model>-<time>/
        config.json  metrics.csv  train.log  tensorboard/  best.pt  last.pt
        eval/  (toolkit evaluate)    export/  (toolkit export)

Anything shown to a user can be regenerated from it. Every file is written atomically
(toolkit.atomic); the checkpoints are toolkit.run.checkpoint's.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from toolkit.atomic import atomic_write_text
from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)

DEFAULT_RUNS_ROOT = Path("runs")
METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "seconds",
    "img_per_s",
)


# --- run folders -----------------------------------------------------------------------------


def new_run_dir(dataset: str, model: str, root: Path = DEFAULT_RUNS_ROOT) -> Path:
    """runs/<dataset>-<model>-<timestamp>, made unique if two runs start in the same second."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{dataset}-{model}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def latest_run(root: Path = DEFAULT_RUNS_ROOT) -> Path:
    """The most recently modified run folder under `root` that has a config.json."""
    root = Path(root)
    runs = [p for p in root.glob("*/") if (p / "config.json").exists()] if root.is_dir() else []
    if not runs:
        raise ToolkitError(
            f"no runs found under '{root}'; train one first (toolkit train MODEL) "
            "or pass a run folder"
        )
    return max(runs, key=lambda p: (p / "config.json").stat().st_mtime)


def resolve_run(run: Path | None, root: Path = DEFAULT_RUNS_ROOT) -> Path:
    if run is None:
        return latest_run(root)
    run = Path(run)
    if not run.is_dir():
        raise ToolkitError(f"run folder '{run}' does not exist")
    return run


# --- run folder contents -------------------------------------------------------------------


class RunLog:
    """train.log in the run folder for the duration of a run."""

    def __init__(self, run_dir: Path):
        self.handler = logging.FileHandler(run_dir / "train.log")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.logger = logging.getLogger("toolkit")

    def __enter__(self):
        self.logger.addHandler(self.handler)
        if self.logger.level == logging.NOTSET or self.logger.level > logging.INFO:
            self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.handler.close()


def open_tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    except ImportError:  # tensorboard is a dependency, but a missing one must not stop training
        log.warning("tensorboard not installed; skipping TensorBoard events")
        return None


def check_writable(folder: Path, what: str, option: str) -> None:
    """Fail before any work when `folder` cannot be created or written to.

    `what` names the folder for the user ("run folder"), `option` the flag that changes it.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".toolkit-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ToolkitError(
            f"cannot write to {what} '{folder}': {exc.strerror or exc}; "
            f"pass {option} a writable folder"
        ) from exc


def check_free_space(folder: Path, need_bytes: int, what: str, fix: str) -> None:
    """Fail before any work when the disk holding `folder` has less than `need_bytes` free.

    `what` names the folder for the user ("run folder"), `fix` says what to do instead.
    """
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        mib = 2**20
        raise ToolkitError(
            f"not enough free space for {what} '{folder}': about {need_bytes / mib:,.0f} MiB "
            f"needed, {free / mib:,.0f} MiB free; {fix}"
        )


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.csv from a run's history (one dict per epoch, METRIC_COLUMNS and more)."""
    write_csv_rows(
        run_dir / "metrics.csv", METRIC_COLUMNS, [[r[c] for c in METRIC_COLUMNS] for r in history]
    )


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.csv as a list of dicts with float values (epoch as int)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ToolkitError(f"'{path}' not found") from exc
    except json.JSONDecodeError as exc:
        raise ToolkitError(f"'{path}' is not valid JSON ({exc})") from exc


def write_csv_rows(path: Path, header: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(header))
    writer.writerows([list(r) for r in rows])
    atomic_write_text(path, buf.getvalue())
