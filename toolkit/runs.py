"""Run folders and self-describing checkpoints, all written atomically (toolkit.atomic).

A run folder holds everything a run produced: config.json, metrics.csv, train.log,
TensorBoard events, best.pt / last.pt, and later eval/ and export/. A checkpoint is a plain
dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)`` (no code execution) and rebuilds its model with no other
input:

    {
      "format": "toolkit-checkpoint", "format_version": 1, "toolkit_version": "0.1.0",
      "model":   {"name", "options", "num_classes", "input_size", "in_channels"},
      "dataset": {"name", "classes", "mean", "std", "image_size", "source", "fingerprint"},
      "epoch": int (1-based, last finished), "metrics": {...this epoch's metrics.csv row},
      "best_val_acc": float, "best_epoch": int,
      "state_dict": the unwrapped, uncompiled model's weights (the `net`, not normalised),
      "optimizer", "scheduler": state dicts (last.pt only; best.pt keeps them too),
      "config": the resolved training config (as in config.json),
    }
"""

from __future__ import annotations

import csv
import json
import logging
import pickle
import re
import shutil
import warnings
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit import __version__
from toolkit.atomic import atomic_write_text
from toolkit.errors import ToolkitError, error_summary

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "toolkit-checkpoint"
CHECKPOINT_VERSION = 1
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


# --- checkpoints -----------------------------------------------------------------------------


def make_checkpoint(
    *,
    net: nn.Module,
    model_info: dict,
    dataset_info: dict,
    epoch: int,
    metrics: dict,
    best_val_acc: float,
    best_epoch: int,
    config: dict,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "toolkit_version": __version__,
        "model": model_info,
        "dataset": dataset_info,
        "epoch": epoch,
        "metrics": metrics,
        "best_val_acc": best_val_acc,
        "best_epoch": best_epoch,
        "state_dict": unwrap(net).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "config": config,
    }


def unwrap(net: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / torch.compile wrappers so checkpoints stay portable."""
    while True:
        if hasattr(net, "module") and isinstance(net.module, nn.Module):
            net = net.module
        elif hasattr(net, "_orig_mod"):
            net = net._orig_mod
        else:
            return net


# What every checkpoint has; build_net, evaluate and export read these without checking.
CHECKPOINT_FIELDS = {
    "model": dict,
    "dataset": dict,
    "epoch": int,
    "state_dict": dict,
    "config": dict,
}


def load_checkpoint(path: Path) -> dict:
    """Load a toolkit checkpoint safely and check that it is one this toolkit can read.

    weights_only: tensors, numbers, strings, lists and dicts only, so a file that is not a
    checkpoint (a foreign or malicious pickle) fails here without running any of its code.
    """
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"checkpoint '{path}' not found; has this run finished an epoch?")
    try:
        with warnings.catch_warnings():  # torch's note on a foreign pickle's protocol: noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, random bytes, a foreign or malicious pickle...
        raise ToolkitError(
            f"'{path}' is not a readable toolkit checkpoint ({_unreadable_reason(path, exc)})"
        ) from exc
    _check_checkpoint(ckpt, path)
    return ckpt


def _unreadable_reason(path: Path, exc: Exception) -> str:
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(exc, pickle.UnpicklingError):  # what weights_only refused to unpickle
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if code:
            return f"it calls Python code ({code.group(1)}); refused without running it"
        return "not a torch checkpoint file, or a damaged one; nothing in it was run"
    return error_summary(exc)


def _check_checkpoint(ckpt: Any, path: Path) -> None:
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ToolkitError(f"'{path}' is not a toolkit checkpoint (no '{CHECKPOINT_FORMAT}' tag)")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ToolkitError(f"'{path}' has no valid checkpoint format version ({version!r})")
    if version > CHECKPOINT_VERSION:
        raise ToolkitError(
            f"'{path}' was written by toolkit {ckpt.get('toolkit_version')} with checkpoint "
            f"format {version}; this toolkit ({__version__}) reads up to "
            f"{CHECKPOINT_VERSION}. Upgrade the toolkit."
        )
    missing = [k for k, kind in CHECKPOINT_FIELDS.items() if not isinstance(ckpt.get(k), kind)]
    if missing:
        raise ToolkitError(
            f"'{path}' is a damaged toolkit checkpoint (no valid {', '.join(missing)})"
        )


def build_net(ckpt: dict) -> nn.Module:
    """Rebuild the (un-normalised) network of a checkpoint and load its weights, in eval mode."""
    from toolkit.models import create_model

    info = ckpt["model"]
    net = create_model(
        info["name"],
        num_classes=info["num_classes"],
        input_size=info["input_size"],
        in_channels=info["in_channels"],
        **info["options"],
    )
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ToolkitError(
            f"checkpoint weights do not fit model '{info['name']}' {info['options']}: "
            f"{error_summary(exc)}"
        ) from exc
    return net.eval()


def build_classifier(ckpt: dict) -> nn.Module:
    """The checkpoint's model with normalisation in front: takes RGB in [0, 1], gives logits."""
    from toolkit.models import NormalizedClassifier

    ds = ckpt["dataset"]
    return NormalizedClassifier(build_net(ckpt), ds["mean"], ds["std"]).eval()


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ToolkitError(f"'{path}' not found") from exc
    except json.JSONDecodeError as exc:
        raise ToolkitError(f"'{path}' is not valid JSON ({exc})") from exc


def write_csv_rows(path: Path, header: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(header))
    writer.writerows([list(r) for r in rows])
    atomic_write_text(path, buf.getvalue())
