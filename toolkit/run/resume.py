"""Resuming a run: is last.pt a checkpoint this run can continue from, and putting the run
folder back in order after a kill.

last.pt is each epoch's commit point (toolkit.train.trainer writes it first, then best.pt and
metrics.csv), so after a kill the folder is at most one write behind last.pt, and
repair_run_folder brings it level again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from toolkit.atomic import atomic_write_bytes, remove_stale_temp
from toolkit.errors import ToolkitError
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import read_json, write_metrics

log = logging.getLogger("toolkit.train")


def load_resume_state(run_dir: Path) -> Checkpoint:
    """`run_dir`/last.pt, checked to be a checkpoint this run can continue from."""
    if not run_dir.is_dir():
        raise ToolkitError(f"run folder '{run_dir}' not found; pass the folder of a run to resume")
    path = run_dir / "last.pt"
    ckpt = Checkpoint.load(path)
    _check_same_run(run_dir, ckpt, path)
    return ckpt


def _check_same_run(run_dir: Path, ckpt: Checkpoint, path: Path) -> None:
    """last.pt must belong to the run it sits in: the model and data config.json recorded.

    A checkpoint copied in from another run would otherwise train on under this run's name,
    its metrics and best.pt mixed with the first run's.
    """
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        log.warning("%s is missing; cannot check that %s belongs to this run", config_file, path)
        return
    recorded = read_json(config_file)
    theirs = _identity(
        recorded.get("model"), recorded.get("model_options"), recorded.get("dataset_info") or {}
    )
    ours = _identity(ckpt.model["name"], ckpt.model["options"], ckpt.dataset)
    if ours != theirs:
        raise ToolkitError(
            f"'{path}' is not this run's checkpoint: it holds {_describe(ours)}, but "
            f"{config_file.name} says {_describe(theirs)}; resume the run it came from"
        )


def _identity(model, options, dataset: dict) -> tuple:
    return (model, options or {}, dataset.get("name"), dataset.get("fingerprint"))


def _describe(identity: tuple) -> str:
    model, options, dataset, fingerprint = identity
    return f"{model} {options} on {dataset} (data {str(fingerprint)[:12]})"


def repair_run_folder(run_dir: Path, ckpt: Checkpoint) -> None:
    """Make the run folder agree with last.pt again after a kill.

    last.pt is each epoch's commit point: best.pt and metrics.csv are written after it, so a
    kill in between leaves them one epoch behind. Temporaries of killed writes go.
    """
    for stale in remove_stale_temp(run_dir):
        log.info("removed %s, left by an interrupted write", stale.name)
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    if ckpt.best_epoch == ckpt.epoch:  # then best.pt is last.pt, byte for byte
        data = last.read_bytes()
        if not best.is_file() or best.read_bytes() != data:
            log.info("restoring best.pt (epoch %d) from last.pt", ckpt.epoch)
            atomic_write_bytes(best, data)
    write_metrics(run_dir, ckpt.history)
