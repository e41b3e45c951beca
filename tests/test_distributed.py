"""DDP through torchrun: two gloo processes on the CPU train like one, write the run folder
once, end with identical weights and resume a run; plus the pure sharding logic."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.training import fit_interrupted_in_second_epoch
from toolkit.cli import app
from toolkit.data import DataOptions
from toolkit.errors import ToolkitError
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import read_metrics
from toolkit.train.config import TrainConfig
from toolkit.train.distributed import SINGLE, Context, context_from_env, session, state_digest
from toolkit.train.optim import lr_factor

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
DIGESTS = re.compile(r"final weights sha1 by rank: ([0-9a-f]{40}) ([0-9a-f]{40})")


def torchrun(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m toolkit train ARGS` (gloo on the CPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "toolkit", "train", *map(str, args)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOOLKIT_PROGRESS": "0",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    cwd.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def rank_digests(run: Path) -> tuple[str, str]:
    found = DIGESTS.findall((run / "train.log").read_text())
    assert len(found) == 1, "one line of per-rank digests, written by rank 0 only"
    return found[0]


def test_two_processes_train_like_one_and_write_the_run_folder_once(cifar_folder, tmp_path):
    args = ["net", "--data-dir", cifar_folder, "--data-root", tmp_path / "data"]
    # 31: ranks get 15 and 16 images of every full batch, so the loss weighting matters
    args += ["--epochs", 2, "--batch-size", 31, "--device", "cpu"]
    # fp32: bf16 autocast (auto on CPUs with AVX512-BF16) rounds the two ranks' half batches
    # differently from the whole batch, far beyond the tolerance that proves equivalence.
    args += ["--amp", "off"]
    # SGD: Muon (a short run's default for net) takes the gradient's weakest directions to
    # full size, the two ranks' float rounding with them, beyond the tolerance below.
    args += ["--optimizer", "sgd"]
    single = tmp_path / "single"
    result = CliRunner().invoke(app, [str(a) for a in ["train", *args, "--run-dir", single]])
    assert result.exit_code == 0, result.output

    # No --run-dir: rank 0 names the folder and tells rank 1.
    torchrun(*args, cwd=tmp_path / "ddp")
    runs = list((tmp_path / "ddp" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert {"config.json", "metrics.csv", "train.log", "best.pt", "last.pt", "tensorboard"} <= {
        p.name for p in run.iterdir()
    }
    assert len(list((run / "tensorboard").iterdir())) == 1  # one events file: rank 0's
    log = (run / "train.log").read_text()
    assert log.count("epoch 1:") == 1 and log.count("epoch 2:") == 1
    engine = json.loads((run / "config.json").read_text())["engine"]
    assert (engine["world_size"], engine["distributed_backend"]) == (2, "gloo")
    assert engine["global_batch_size"] == 31

    # Both ranks hold rank 0's checkpoint, exactly.
    last = Checkpoint.load(run / "last.pt")
    first, second = rank_digests(run)
    assert first == second == state_digest(last.state_dict)
    Checkpoint.load(run / "best.pt").build_net()  # plain names: no DDP `module.` prefix

    # Same global order, same augmentation, gradients averaged over the whole batch: the
    # 2-process run follows the 1-process one (`net` has no BatchNorm to tell them apart).
    reference = Checkpoint.load(single / "last.pt").state_dict
    for key, tensor in last.state_dict.items():
        assert torch.allclose(tensor, reference[key], atol=1e-4), key
    for ours, theirs in zip(read_metrics(run), read_metrics(single), strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert ours["train_acc"] == pytest.approx(theirs["train_acc"], abs=1e-9)


# Loaded by every Python process of the torchrun group through PYTHONPATH: on rank 1 only,
# the second training batch becomes NaN images.
POISON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    from toolkit import seams
    _count = [0]
    def _poison(step, images):
        _count[0] += 1
        if _count[0] == 2:
            images.mul_(float("nan"))
    seams.TRAIN_BATCH.hook = _poison
"""


def test_skip_mode_under_ddp_skips_a_batch_on_every_rank(cifar_folder, tmp_path, monkeypatch):
    """--on-nan skip with a batch that is NaN on one rank only. DDP's gradient average takes
    the NaN to every rank, and the all-reduced verdict has every rank skip alike: one step
    left out, no hang, identical and finite weights."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(POISON_RANK_1)
    monkeypatch.setenv("PYTHONPATH", str(hooks))
    run = tmp_path / "run"
    args = ["net", "--data-dir", cifar_folder, "--data-root", tmp_path / "data"]
    args += ["--epochs", 2, "--batch-size", 32, "--device", "cpu", "--on-nan", "skip"]
    torchrun(*args, "--run-dir", run, cwd=tmp_path)

    last = Checkpoint.load(run / "last.pt")
    assert [r["skipped_batches"] for r in last.history] == [1, 0]
    assert "epoch 1: skipped 1 of" in (run / "train.log").read_text()
    first, second = rank_digests(run)
    assert first == second == state_digest(last.state_dict)
    assert all(torch.isfinite(t).all() for t in last.state_dict.values())


def test_resume_under_ddp_continues_and_keeps_batchnorm_in_sync(cifar_folder, tmp_path):
    """A 1-process run interrupted after epoch 1 finishes its epoch 2 on 2 processes."""
    config = TrainConfig.from_recipe(
        "net",
        DataOptions(data_dir=str(cifar_folder), data_root=str(tmp_path / "data")),
        model_options={"batch_norm": True},
        epochs=2,
        batch_size=32,
        device="cpu",
    )
    run = tmp_path / "run"
    assert fit_interrupted_in_second_epoch(config, run).interrupted
    epoch_one = read_metrics(run)
    assert [r["epoch"] for r in epoch_one] == [1]

    torchrun("--resume", run, cwd=tmp_path)
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0] == epoch_one[0]  # history carried over, not retrained
    # The schedule resumed at step 9 (270 images, batches of 32), not from step 0.
    assert rows[1]["lr"] == pytest.approx(config.lr * lr_factor(config, 9)(9))
    log = (run / "train.log").read_text()
    assert log.count("epoch 2:") == 1
    last = Checkpoint.load(run / "last.pt")
    assert last.epoch == 2 and len(last.history) == 2
    # BatchNorm running statistics are per rank during an epoch; they are synced after it.
    first, second = rank_digests(run)
    assert first == second == state_digest(last.state_dict)


# --- the pure parts --------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shards_partition_every_batch_contiguously(world_size):
    for n in range(2 * world_size, 70):
        parts = [Context(rank=r, world_size=world_size).shard(n) for r in range(world_size)]
        covered = [i for p in parts for i in range(n)[p]]
        assert covered == list(range(n))  # every image once, in batch order
        sizes = [p.stop - p.start for p in parts]
        assert max(sizes) - min(sizes) <= 1


def test_context_comes_from_torchrun_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert context_from_env() == SINGLE
    with session(torch.device("cpu")) as (ctx, device):  # no torchrun: no process group
        assert ctx == SINGLE and device == torch.device("cpu")
        assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = context_from_env("gloo")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (3, 4, 1, False)
    monkeypatch.delenv("RANK")
    with pytest.raises(ToolkitError, match="RANK is missing"):
        context_from_env()


def test_single_process_context_is_a_no_op():
    t = torch.tensor([1.0, 2.0])
    assert SINGLE.sum(t) is t and torch.equal(t, torch.tensor([1.0, 2.0]))
    assert SINGLE.broadcast_object({"a": 1}) == {"a": 1}
    assert SINGLE.gather_objects("x") == ["x"]
    net = torch.nn.Linear(2, 2)
    assert SINGLE.wrap(net, torch.device("cpu")) is net
    assert SINGLE.shard(10) == slice(0, 10)


def test_state_digest_sees_every_value():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    digest = state_digest(net)
    assert digest == state_digest({k: v.clone() for k, v in net.state_dict().items()})
    with torch.no_grad():
        net[1].running_mean[2] += 1e-6  # a buffer, not a parameter
    assert state_digest(net) != digest
