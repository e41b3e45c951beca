"""Small training helpers shared by the train, engine, distributed and fault tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from toolkit import seams
from toolkit.data import DataOptions
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import METRIC_COLUMNS, read_metrics
from toolkit.train.config import TrainConfig
from toolkit.train.trainer import RunResult, fit

REPO = Path(__file__).resolve().parents[1]


def tiny_config(folder: Path, data_root: Path, model: str = "net", **flags) -> TrainConfig:
    """`net` on a synthetic image folder, 2 epochs of batch 32 on the CPU, unless overridden
    (`flags` as TrainConfig.from_recipe takes them)."""
    values = dict(epochs=2, batch_size=32, lr=0.05, device="cpu")
    values.update(flags)
    data = DataOptions(data_dir=str(folder), data_root=str(data_root))
    return TrainConfig.from_recipe(model, data, **values)


def interrupt_at_epoch(epoch: int):
    """A Ctrl-C at the start of `epoch`, as a user pressing it would (a seams hook)."""

    def hook(**context):
        if context["epoch"] == epoch:
            raise KeyboardInterrupt

    return seams.EPOCH_START.installed(hook)


def fit_interrupted_in_second_epoch(config: TrainConfig, run_dir: Path) -> RunResult:
    """Train until Ctrl-C arrives at the start of epoch 2."""
    with interrupt_at_epoch(2):
        result = fit(config, run_dir=run_dir)
    assert result.interrupted and result.epochs_done == 1
    return result


# --- a real `toolkit` process, paused at an exact moment and killed with SIGKILL --------------


def pause_at_commit(marker: Path, name: str, nth: int = 1) -> str:
    """Child code: at the `nth` atomic write of a file called `name`, once its temporary is
    complete but before the rename (the BEFORE_RENAME seam), write the temporary's path to
    `marker` and sleep until killed."""
    return f"""
import pathlib, time
from toolkit import seams
_seen = [0]
def _pause(tmp, path):
    if path.name == {name!r}:
        _seen[0] += 1
        if _seen[0] == {nth}:
            pathlib.Path({str(marker)!r}).write_text(str(tmp))
            time.sleep(600)
seams.BEFORE_RENAME.hook = _pause
"""


def pause_in_epoch(marker: Path, epoch: int, step: int) -> str:
    """Child code: at training step `step` (1-based) of `epoch`, after step - 1 optimizer
    steps of that epoch, write "epoch E step S" to `marker` and sleep until killed."""
    return f"""
import pathlib, time
from toolkit import seams
_epoch = [0]
def _count(epoch):
    _epoch[0] = epoch
def _pause(step, images):
    if (_epoch[0], step) == ({epoch}, {step}):
        pathlib.Path({str(marker)!r}).write_text("epoch {epoch} step {step}")
        time.sleep(600)
seams.EPOCH_START.hook = _count
seams.TRAIN_BATCH.hook = _pause
"""


@contextlib.contextmanager
def toolkit_process(args: list, log: Path, hook: str = "") -> Iterator[subprocess.Popen]:
    """`python -m toolkit ARGS` as a child process (its output in `log`); with `hook`, that
    code runs in the child first, then the same CLI. The child never outlives the block."""
    if hook:
        command = [sys.executable, "-c", hook + "\nfrom toolkit.cli import app\napp()\n"]
    else:
        command = [sys.executable, "-m", "toolkit"]
    env = {**os.environ, "TOOLKIT_PROGRESS": "0"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*command, *map(str, args)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)


def wait_for(
    ready: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 180
) -> None:
    """Poll `ready` until it holds; fail (with the child's output) if the child exits first
    or `timeout` seconds pass. Never a guessed sleep."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) early:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"child not ready after {timeout} s:\n{log.read_text()}")
        time.sleep(0.02)


def sigkill(proc: subprocess.Popen) -> None:
    """SIGKILL the child (no handler, no cleanup can run) and check that is how it died."""
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def metrics_epochs(run: Path) -> list[int]:
    """The epochs metrics.csv has rows for ([] while it does not exist)."""
    return [r["epoch"] for r in read_metrics(run)]


def assert_run_folder_intact(run: Path) -> dict:
    """Nothing in the run folder is half written: every JSON parses, metrics.csv has its
    columns and one row per epoch from 1, and every checkpoint loads. Returns last.pt's."""
    for path in run.rglob("*.json"):
        json.loads(path.read_text())
    if (run / "metrics.csv").exists():
        header = (run / "metrics.csv").read_text().splitlines()[0]
        assert header == ",".join(METRIC_COLUMNS)
        epochs = metrics_epochs(run)
        assert epochs == list(range(1, len(epochs) + 1)), epochs
    for path in run.glob("*.pt"):
        Checkpoint.load(path)
    return Checkpoint.load(run / "last.pt")


def temp_files(run: Path) -> list[Path]:
    """What atomic writes left behind: hidden `.NAME.*.tmp` files and folders."""
    return sorted(run.rglob(".*.tmp"))
