"""Training faults: SIGKILL at any moment, a full or unwritable disk, NaN losses, and
checkpoints that are damaged, foreign, malicious or from another run or toolkit.

The kill tests run a real `toolkit` process, pause it at an exact moment (mid-epoch, between
a complete temporary file and its rename, mid-evaluation) and SIGKILL it there: what is on
disk afterwards is what any crash at that moment would leave.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import toolkit.atomic
from tests.training import (
    assert_run_folder_intact,
    fit_interrupted_in_second_epoch,
    metrics_epochs,
    pause_at_commit,
    pause_in_epoch,
    sigkill,
    temp_files,
    tiny_config,
    toolkit_process,
    wait_for,
)
from toolkit import seams
from toolkit.atomic import WriteError, atomic_write_bytes
from toolkit.cli import app
from toolkit.data import Split
from toolkit.errors import ToolkitError
from toolkit.evaluate import evaluate_run
from toolkit.export import export_run
from toolkit.export.bench import Timing
from toolkit.export.package import package_run
from toolkit.export.triton import write_triton_repo
from toolkit.models import create_model
from toolkit.run import checkpoint
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import read_json
from toolkit.train.batches import Normalizer
from toolkit.train.engine import StepOptions, train_one_epoch
from toolkit.train.trainer import fit
from toolkit.train.trainer import resume as resume_run

EPOCHS = 2
BATCHES_PER_EPOCH = 9  # 270 synthetic training images in batches of 32
runner = CliRunner()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """One decode cache for the module's runs (and its child processes)."""
    return tmp_path_factory.mktemp("fault-data")


def train_args(cifar_folder: Path, data_root: Path, run: Path, *extra) -> list:
    return [
        "train",
        "net",
        "--data-dir",
        cifar_folder,
        "--data-root",
        data_root,
        "--epochs",
        EPOCHS,
        "--batch-size",
        32,
        "--device",
        "cpu",
        "--run-dir",
        run,
        *extra,
    ]


def resume(run: Path) -> None:
    """`toolkit train --resume RUN`, as a user types it, to the end of the run."""
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert metrics_epochs(run) == list(range(1, EPOCHS + 1))
    assert temp_files(run) == []
    last = assert_run_folder_intact(run)
    assert last.epoch == EPOCHS and len(last.history) == EPOCHS
    best = max(last.history, key=lambda r: r["val_acc"])  # the first of equals, like training
    assert Checkpoint.load(run / "best.pt").epoch == best["epoch"] == last.best_epoch


# --- SIGKILL ---------------------------------------------------------------------------------


def test_kill_mid_epoch_loses_only_that_epoch(cifar_folder, data_root, tmp_path):
    run, marker, log = tmp_path / "run", tmp_path / "paused", tmp_path / "child.log"
    hook = pause_in_epoch(marker, epoch=2, step=4)
    with toolkit_process(train_args(cifar_folder, data_root, run), log, hook) as child:
        wait_for(lambda: 1 in metrics_epochs(run) and marker.exists(), child, log)
        sigkill(child)
    assert marker.read_text() == "epoch 2 step 4"  # killed with 3 steps of epoch 2 done
    assert assert_run_folder_intact(run).epoch == 1
    assert metrics_epochs(run) == [1]

    resume(run)  # epoch 2 again, from last.pt's epoch 1 (test_resume_is_exact: bit-exactly)


@pytest.mark.parametrize(
    ("name", "nth", "last_epoch", "rows"),
    [
        ("last.pt", 2, 1, [1]),  # epoch 2's commit point never happened
        ("best.pt", 1, 1, []),  # last.pt committed, best.pt and metrics.csv not yet
        ("metrics.csv", 2, 2, [1]),  # both checkpoints committed, metrics.csv behind
    ],
)
def test_kill_mid_checkpoint_write(cifar_folder, data_root, tmp_path, name, nth, last_epoch, rows):
    run, marker, log = tmp_path / "run", tmp_path / "paused", tmp_path / "child.log"
    hook = pause_at_commit(marker, name, nth)
    with toolkit_process(train_args(cifar_folder, data_root, run), log, hook) as child:
        wait_for(marker.exists, child, log)
        wait_for(lambda: marker.read_text() != "", child, log)
        temporary = Path(marker.read_text())
        # The write was complete but not yet renamed: the moment a kill is most tempting.
        assert temporary.parent == run and temporary.stat().st_size > 0
        sigkill(child)
    assert temporary.exists() and temp_files(run) == [temporary]
    assert assert_run_folder_intact(run).epoch == last_epoch
    assert metrics_epochs(run) == rows
    assert (run / "best.pt").exists() == (name != "best.pt")

    resume(run)  # removes the temporary, repairs best.pt / metrics.csv, trains on
    assert not temporary.exists()


def evaluation_files(run: Path) -> dict[str, bytes]:
    """eval/ as {relative path: bytes}, after checking it is one complete evaluation."""
    out = run / "eval"
    files = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    metrics = json.loads(files["metrics.json"])
    for name in ("classification_report.json", "failures.json"):
        json.loads(files[name])
    for name in ("confusion_matrix.csv", "per_class.csv"):
        assert files[name].decode().count("\n") == 11  # header + 10 classes
    for name, data in files.items():
        if name.endswith(".png"):
            Image.open(io.BytesIO(data)).verify()
    failures = json.loads(files["failures.json"])
    assert {f["file"] for f in failures} == {n for n in files if n.startswith("failures/")}
    assert metrics["split"] == "test" and metrics["n"] == 100
    return files


@pytest.mark.parametrize("pause_at", ["confusion_matrix.csv", "eval"])
def test_kill_mid_evaluation_leaves_a_whole_evaluation_or_none(trained_run, tmp_path, pause_at):
    """Killed while writing the reports (the old eval/ stays whole), or between the two
    renames that swap the new eval/ in (no eval/ at all); a rerun then works."""
    run = Path(shutil.copytree(trained_run, tmp_path / trained_run.name))
    evaluate_run(run, device="cpu")
    before = evaluation_files(run)
    marker, log = tmp_path / "paused", tmp_path / "child.log"
    hook = pause_at_commit(marker, pause_at)
    with toolkit_process(["evaluate", run, "--device", "cpu"], log, hook) as child:
        wait_for(marker.exists, child, log)
        sigkill(child)
    assert temp_files(run), "the kill left no staging folder: it was not mid-evaluation"
    if pause_at == "eval":
        assert not (run / "eval").exists()
    else:
        assert evaluation_files(run) == before

    summary = evaluate_run(run, device="cpu")
    assert summary["n"] == 100 and temp_files(run) == []
    after = evaluation_files(run)
    assert after.keys() == before.keys()


# --- full or unwritable disk -----------------------------------------------------------------


DiskUsage = namedtuple("DiskUsage", "total used free")  # what shutil.disk_usage returns


def fake_disk_usage(free: int):
    return lambda path: DiskUsage(10 * free, 9 * free, free)


def test_too_little_free_space_is_refused_before_training(cifar_folder, tmp_path, monkeypatch):
    config = tiny_config(cifar_folder, tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", fake_disk_usage(5 * 2**20))
    with pytest.raises(ToolkitError, match=r"not enough free space for run folder .*MiB free"):
        fit(config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()
    assert not (tmp_path / "run" / "last.pt").exists()

    monkeypatch.undo()
    fit_interrupted_in_second_epoch(config, tmp_path / "run")
    monkeypatch.setattr(shutil, "disk_usage", fake_disk_usage(5 * 2**20))
    with pytest.raises(ToolkitError, match="not enough free space.*then resume"):
        resume_run(tmp_path / "run")
    monkeypatch.setattr(shutil, "disk_usage", fake_disk_usage(200 * 2**20))  # plenty
    assert resume_run(tmp_path / "run").epochs_done == 2


def fail_nth_write(monkeypatch, name: str, nth: int) -> dict:
    """Make the `nth` atomic write of a file `name` fail with ENOSPC after writing half of
    its bytes, as a disk filling up mid-write would (the FILL_TEMP seam; undone by
    monkeypatch.undo). Returns what happened."""
    seen = {"count": 0, "half_written": None}

    def filling_up(fd, tmp, write):
        if Path(tmp).name.startswith(f".{name}."):
            seen["count"] += 1
            if seen["count"] == nth:
                buffer = io.BytesIO()
                write(buffer)
                os.write(fd, buffer.getvalue()[: len(buffer.getvalue()) // 2])
                os.close(fd)
                seen["half_written"] = Path(tmp).stat().st_size
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(seams.FILL_TEMP, "hook", filling_up)
    return seen


@pytest.mark.parametrize(("name", "last_epoch"), [("last.pt", 1), ("metrics.csv", 2)])
def test_full_disk_mid_write_keeps_the_old_file(
    cifar_folder, tmp_path, monkeypatch, name, last_epoch
):
    run = tmp_path / "run"
    config = tiny_config(cifar_folder, tmp_path, epochs=EPOCHS)
    seen = fail_nth_write(monkeypatch, name, nth=2)
    with pytest.raises(ToolkitError) as info:
        fit(config, run_dir=run)
    message = str(info.value)
    assert "\n" not in message and f"{run / name}" in message
    assert "No space left on device" in message and f"--resume {run}" in message
    assert seen["half_written"] > 0  # there was a half-written temporary to clean up
    assert temp_files(run) == []
    assert assert_run_folder_intact(run).epoch == last_epoch
    assert metrics_epochs(run) == [1]

    monkeypatch.undo()
    assert resume_run(run).epochs_done == EPOCHS
    assert metrics_epochs(run) == list(range(1, EPOCHS + 1))


def test_a_failed_write_is_a_toolkit_error_and_an_oserror(tmp_path, monkeypatch):
    target = tmp_path / "file.json"
    target.write_text("old")
    fail_nth_write(monkeypatch, "file.json", nth=1)
    with pytest.raises(WriteError) as info:
        atomic_write_bytes(target, b"new contents")
    # An OSError too: a caller that may ignore a failed write (the data cache) still can.
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert isinstance(info.value, ToolkitError) and str(info.value).startswith("could not write")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_callers_that_name_their_folder_show_the_cause_once(tmp_path, monkeypatch):
    """export and Triton wrap a failed write with their own folder; WriteError.strerror keeps
    that one line instead of nesting 'could not write ...' inside it."""
    fail_nth_write(monkeypatch, "model.onnx", nth=1)
    meta = {"classes": ["a", "b"], "dataset": "cifar10", "model": "net", "input_size": [32, 32]}
    with pytest.raises(ToolkitError) as info:
        write_triton_repo(tmp_path / "triton", b"onnx bytes", meta)
    assert str(info.value) == (
        f"cannot write the Triton repository '{tmp_path / 'triton'}': No space left on device"
    )


def test_a_folder_that_turned_read_only_is_a_clear_error(tmp_path, monkeypatch):
    """(Tests run as root here, where chmod cannot make a folder unwritable: simulated.)"""
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(toolkit.atomic.tempfile, "mkstemp", refuse)
    with pytest.raises(WriteError, match=f"could not write '{target}': Permission denied"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"


# --- NaN / inf losses ------------------------------------------------------------------------


def poison_batches(monkeypatch, bad: set[int]) -> None:
    """Training batches number `bad` (1-based, counted across epochs) become NaN images:
    their forward pass fills BatchNorm's statistics with NaN and their loss is NaN."""
    count = [0]

    def poison(step, images):
        count[0] += 1
        if count[0] in bad:
            images.mul_(float("nan"))

    monkeypatch.setattr(seams.TRAIN_BATCH, "hook", poison)


def test_skip_mode_steps_over_non_finite_batches(cifar_folder, tmp_path, monkeypatch):
    config = tiny_config(cifar_folder, tmp_path, model_options={"batch_norm": True})
    poison_batches(monkeypatch, {2, 5})
    with pytest.raises(ToolkitError, match=r"diverged in epoch 1 .*no epoch finished"):
        fit(config, run_dir=tmp_path / "stop")  # the poison is real: the default stops

    monkeypatch.undo()
    poison_batches(monkeypatch, {2, 5})
    result = fit(replace(config, on_nan="skip"), run_dir=tmp_path / "skip")
    assert result.epochs_done == 2 and result.best_val_acc > 0.3  # chance is 0.1
    last = Checkpoint.load(tmp_path / "skip" / "last.pt")
    assert [r["skipped_batches"] for r in last.history] == [2, 0]
    tensors = list(last.state_dict.values())
    tensors += [t for s in last.optimizer["state"].values() for t in s.values()]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    log = (tmp_path / "skip" / "train.log").read_text()
    assert f"epoch 1: skipped 2 of {BATCHES_PER_EPOCH} batches" in log
    assert read_json(tmp_path / "skip" / "config.json")["on_nan"] == "skip"


def test_skip_mode_stops_when_a_whole_epoch_is_bad(cifar_folder, tmp_path, monkeypatch):
    config = tiny_config(cifar_folder, tmp_path, on_nan="skip")
    poison_batches(monkeypatch, set(range(BATCHES_PER_EPOCH + 1, 2 * BATCHES_PER_EPOCH + 1)))
    with pytest.raises(
        ToolkitError,
        match=rf"diverged in epoch 2 \(.*all {BATCHES_PER_EPOCH} batches\); the last good "
        r"checkpoint is .*last.pt \(epoch 1\)",
    ):
        fit(config, run_dir=tmp_path / "run")
    assert assert_run_folder_intact(tmp_path / "run").epoch == 1


def test_a_skipped_batch_takes_no_step_and_leaves_batchnorm_alone():
    torch.manual_seed(0)
    net = create_model("net", num_classes=10, input_size=32, batch_norm=True)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    split = Split(images, torch.randint(0, 10, (64,)))
    normalize = Normalizer([float("nan")] * 3, [1.0] * 3, torch.device("cpu"))  # all NaN
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(FloatingPointError, match="all 4 batches"):
        train_one_epoch(
            net,
            split,
            normalize,
            optimizer,
            scheduler,
            StepOptions(batch_size=16, skip_nonfinite=True),
            generator=torch.Generator().manual_seed(0),
            device=torch.device("cpu"),
        )
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert not optimizer.state  # no momentum buffer: no step was ever taken
    assert all(p.grad is None for p in net.parameters())
    assert scheduler.last_epoch == 4  # the schedule still advanced, one step per batch


def test_on_nan_option(cifar_folder, tmp_path):
    base = ["train", "net", "--data-dir", str(cifar_folder), "--data-root", str(tmp_path)]
    bad = runner.invoke(app, [*base, "--on-nan", "ignore", "--run-dir", str(tmp_path / "a")])
    assert bad.exit_code == 2 and "unknown --on-nan 'ignore'" in bad.output
    ok = runner.invoke(
        app,
        [*base, "--on-nan", "skip", "--epochs", "1", "--device", "cpu"]
        + ["--run-dir", str(tmp_path / "b")],
    )
    assert ok.exit_code == 0, ok.output
    assert read_json(tmp_path / "b" / "config.json")["on_nan"] == "skip"


# --- checkpoints that are not what they claim ------------------------------------------------


class Payload:
    """A pickle that creates a file when unpickled: the code a checkpoint must never run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def checkpoint_like(good: Path, **changes) -> dict:
    """The dict of the good checkpoint `good`, with `changes` (None removes a key)."""
    ckpt = {**torch.load(good, weights_only=True), **changes}
    return {k: v for k, v in ckpt.items() if v is not None}


def truncated(path: Path, good: Path) -> None:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_CHECKPOINTS = {
    "truncated": (truncated, "not a readable toolkit checkpoint"),
    "empty": (lambda p, good: p.write_bytes(b""), "not a readable toolkit checkpoint"),
    "random bytes": (
        lambda p, good: p.write_bytes(np.random.default_rng(0).bytes(4096)),
        "not a readable toolkit checkpoint",
    ),
    "plain pickle of a dict": (
        lambda p, good: p.write_bytes(pickle.dumps(checkpoint_like(good))),
        "not a readable toolkit checkpoint",
    ),
    "a tensor dict, no tag": (
        lambda p, good: torch.save({"weight": torch.zeros(3)}, p),
        "not a toolkit checkpoint",
    ),
    "newer format": (
        lambda p, good: torch.save(checkpoint_like(good, format_version=checkpoint.VERSION + 1), p),
        r"format 2; this toolkit \(.*\) reads up to 1. Upgrade",
    ),
    "format version not a number": (
        lambda p, good: torch.save(checkpoint_like(good, format_version="1"), p),
        "no valid checkpoint format version",
    ),
    "no weights": (
        lambda p, good: torch.save(checkpoint_like(good, state_dict=None), p),
        r"damaged toolkit checkpoint \(no valid state_dict\)",
    ),
    "no optimizer state": (
        lambda p, good: torch.save(checkpoint_like(good, optimizer=None), p),
        r"damaged toolkit checkpoint \(no valid optimizer\)",
    ),
    "a model section without its input size": (
        lambda p, good: torch.save(checkpoint_like(good, model={"name": "net"}), p),
        r"damaged toolkit checkpoint \(no valid model\)",
    ),
}


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_bad_checkpoints_are_refused_in_one_line(trained_run, tmp_path, kind):
    write, message = BAD_CHECKPOINTS[kind]
    path = tmp_path / "best.pt"
    write(path, trained_run / "best.pt")
    with pytest.raises(ToolkitError, match=message) as info:
        Checkpoint.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_checkpoint_of_an_older_toolkit_with_the_same_format_loads(trained_run, tmp_path):
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    torch.save({**ckpt, "toolkit_version": "0.0.1"}, tmp_path / "best.pt")
    assert Checkpoint.load(tmp_path / "best.pt").toolkit_version == "0.0.1"


@pytest.mark.parametrize("container", ["pickle", "torch.save"])
def test_malicious_checkpoints_run_no_code(trained_run, tmp_path, container):
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    marker = tmp_path / "pwned"
    payload = Payload(marker)
    for name in ("best.pt", "last.pt"):
        if container == "pickle":
            (run / name).write_bytes(pickle.dumps(payload))
        else:
            torch.save(payload, run / name)
    # The payload is live: an unsafe load runs it.
    if container == "pickle":
        pickle.loads((run / "best.pt").read_bytes())
    else:
        torch.load(run / "best.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()

    # A plain pickle is not even a torch file; torch.save's zip names the code it would call.
    message = "not a torch checkpoint file" if container == "pickle" else r"calls Python code"
    with pytest.raises(ToolkitError, match=message):
        Checkpoint.load(run / "best.pt")
    with pytest.raises(ToolkitError, match=message):
        evaluate_run(run, device="cpu")
    with pytest.raises(ToolkitError, match=message):
        resume_run(run)
    assert not marker.exists()


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, cifar_folder) -> Path:
    """A run stopped after epoch 1 of 2, to be copied and resumed."""
    root = tmp_path_factory.mktemp("one-epoch")
    config = tiny_config(cifar_folder, root / "data", model_options={"width": 32})
    return fit_interrupted_in_second_epoch(config, root / "run").run_dir


def other_model(run: Path, trained_run: Path) -> None:
    shutil.copy(trained_run / "last.pt", run / "last.pt")  # `net` at width 16, not 32


def retag(**changes):
    def tamper(run: Path, trained_run: Path) -> None:
        ckpt = torch.load(run / "last.pt", weights_only=True)
        for key, value in changes.items():
            section, _, field = key.partition(".")
            if field:
                ckpt[section][field] = value
            else:
                ckpt[section] = value
        torch.save(ckpt, run / "last.pt")

    return tamper


def wrong_weights(run: Path, trained_run: Path) -> None:
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["state_dict"] = torch.load(trained_run / "last.pt", weights_only=True)["state_dict"]
    torch.save(ckpt, run / "last.pt")


FOREIGN_CHECKPOINTS = {
    "another run's model": (other_model, "not this run's checkpoint: it holds net .*'width': 16"),
    "another dataset": (retag(**{"dataset.name": "stl10"}), "not this run's checkpoint.*stl10"),
    "other data": (retag(**{"dataset.fingerprint": "0" * 40}), "not this run's checkpoint"),
    "weights of another shape": (wrong_weights, "last.pt does not fit the model it names"),
    "no optimizer state": (retag(optimizer=None), r"damaged toolkit checkpoint \(no valid optim"),
    "no history": (retag(history=None), r"damaged toolkit checkpoint \(no valid history\)"),
}


@pytest.mark.parametrize("kind", FOREIGN_CHECKPOINTS)
def test_resume_refuses_a_checkpoint_that_is_not_this_runs(
    one_epoch_run, trained_run, tmp_path, kind
):
    tamper, message = FOREIGN_CHECKPOINTS[kind]
    run = Path(shutil.copytree(one_epoch_run, tmp_path / "run"))
    tamper(run, trained_run)
    with pytest.raises(ToolkitError, match=message) as info:
        resume_run(run)
    assert "\n" not in str(info.value)
    assert metrics_epochs(run) == [1]  # refused before anything was written


def test_resume_refuses_changed_data(cifar_folder, tmp_path):
    folder = Path(shutil.copytree(cifar_folder, tmp_path / "data"))
    config = tiny_config(folder, tmp_path / "root")
    fit_interrupted_in_second_epoch(config, tmp_path / "run")
    image = next((folder / "train" / "cat").glob("*.png"))
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    with pytest.raises(ToolkitError, match="has changed since it started"):
        resume_run(tmp_path / "run")


def test_resume_repairs_what_a_kill_left_behind(cifar_folder, tmp_path):
    """The states a kill after last.pt's rename leaves (best.pt and metrics.csv behind, stale
    temporaries) are put right by a resume, even of a finished run."""
    run = tmp_path / "run"
    config = tiny_config(cifar_folder, tmp_path, epochs=1)
    fit(config, run_dir=run)
    (run / "best.pt").unlink()
    (run / "metrics.csv").write_text((run / "metrics.csv").read_text().splitlines()[0] + "\n")
    (run / ".last.pt.k3j2x9ab.tmp").write_bytes(b"half a checkpoint")
    (run / ".eval.x8d7f6g5.tmp").mkdir()
    (run / ".eval.x8d7f6g5.tmp" / "metrics.json").write_text("{")

    assert resume_run(run).epochs_done == 1
    assert (run / "best.pt").read_bytes() == (run / "last.pt").read_bytes()
    assert metrics_epochs(run) == [1] and temp_files(run) == []
    assert_run_folder_intact(run)


# --- export and package ----------------------------------------------------------------------

FAST_TIMING = Timing(warmup=1, min_runs=2, max_runs=2, budget_s=0.0)


def test_an_interrupted_export_cannot_be_packaged(trained_run, tmp_path, monkeypatch):
    """Killed between model.onnx and its report, a re-export leaves a new model beside the old
    figures: package must refuse it rather than ship numbers of another model."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    evaluate_run(run, device="cpu")
    export_run(run, timing=FAST_TIMING)
    killed = tmp_path / "artifacts" / ".cifar10-net.x1y2.tmp"  # a killed package's staging
    (killed / "failures").mkdir(parents=True)
    package_run(run, tmp_path / "artifacts")  # a whole export packages
    assert not killed.exists()

    fail_nth_write(monkeypatch, "model.json", nth=1)  # the re-export dies after model.onnx
    with pytest.raises(ToolkitError, match="cannot write the export"):
        export_run(run, int8=True, timing=FAST_TIMING)
    monkeypatch.undo()
    assert not (run / "export" / "export-report.json").exists()  # no report vouches for it
    with pytest.raises(ToolkitError, match="missing .*export-report.json"):
        package_run(run, tmp_path / "artifacts")

    export_run(run, timing=FAST_TIMING)
    int8 = ["package", str(run), "--int8", "--artifacts", str(tmp_path / "a")]
    result = CliRunner().invoke(app, int8)  # exported without --int8
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert f"without an INT8 model; run `toolkit export {run} --int8`" in result.output
    (run / "export" / "model.onnx").write_bytes(b"edited since")
    with pytest.raises(ToolkitError, match="not the model that export-report.json describes"):
        package_run(run, tmp_path / "artifacts")
    result = CliRunner().invoke(app, ["package", str(run), "--artifacts", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "not the model that export-report.json describes" in result.output
    assert f"toolkit export {run}" in result.output  # the fix
    packaged = tmp_path / "artifacts" / "cifar10-net"  # the first package stands, whole
    digest = hashlib.sha256((packaged / "model.onnx").read_bytes()).hexdigest()
    assert digest == read_json(packaged / "export-report.json")["onnx_sha256"]
