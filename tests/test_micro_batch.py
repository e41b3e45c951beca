"""--micro-batch: a batch trained N images at a time takes the same optimizer step as the whole
batch at once (where nothing normalises across the batch), and BatchNorm's ghost batches keep
its running statistics' pace."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.training import tiny_config
from toolkit.data import Split
from toolkit.errors import ToolkitError
from toolkit.train import recipes
from toolkit.train.batches import Normalizer, ghost_batches
from toolkit.train.engine import StepOptions, train_one_epoch
from toolkit.train.trainer import fit

CPU = torch.device("cpu")


def _no_batch_norm_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 10),
    )  # fmt: skip


def _one_epoch(micro_batch: int, net: nn.Module):
    """One epoch of 13 images in one batch, plain SGD: the weights after the step and the
    epoch's reported loss and accuracy."""
    images = torch.randint(0, 256, (13, 3, 8, 8), dtype=torch.uint8, generator=_seeded())
    labels = torch.randint(0, 10, (13,), generator=_seeded())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    result = train_one_epoch(
        net,
        Split(images, labels),
        Normalizer([0.5] * 3, [0.25] * 3, CPU),
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        StepOptions(batch_size=13, micro_batch=micro_batch, label_smoothing=0.1),
        generator=_seeded(),
        device=CPU,
    )
    return [p.detach().clone() for p in net.parameters()], result


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("micro_batch", [5, 1, 13, 100])
def test_chunks_take_the_whole_batchs_step(micro_batch):
    """5: chunks of 5, 5 and 3 (an uneven last one); 1: every image alone; 13 and 100: one
    chunk, the whole batch."""
    whole, whole_result = _one_epoch(0, _no_batch_norm_net())
    chunked, chunked_result = _one_epoch(micro_batch, _no_batch_norm_net())
    untrained = list(_no_batch_norm_net().parameters())
    assert not any(torch.equal(a, b) for a, b in zip(whole, untrained, strict=True))  # it moved
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert chunked_result.loss == pytest.approx(whole_result.loss, rel=1e-5)
    assert chunked_result.acc == whole_result.acc


def test_ghost_batches_keep_the_running_statistics_pace():
    """Two chunks of one batch move BatchNorm's running mean as far as one whole-batch update
    did, and the momentum is the module's own again afterwards."""
    norm = nn.BatchNorm1d(1, momentum=0.4)
    chunk = torch.full((4, 1), 1.0) + torch.tensor([[-1.0], [1.0], [-1.0], [1.0]])  # mean 1
    with ghost_batches(norm, chunks=2):
        assert norm.momentum == pytest.approx(1 - 0.6**0.5)
        norm(chunk)
        norm(chunk)
    assert norm.momentum == 0.4
    assert norm.running_mean.item() == pytest.approx(0.4)  # one update of 0.4 towards 1


def test_one_chunk_leaves_the_momentum_exactly_alone():
    norm = nn.BatchNorm2d(3, momentum=0.1)  # 1 - (1 - 0.1) is not exactly 0.1 in floats
    with ghost_batches(norm, chunks=1):
        assert norm.momentum == 0.1


def test_a_run_records_its_micro_batch_and_refuses_a_negative_one(cifar_folder, tmp_path):
    config = tiny_config(
        cifar_folder, tmp_path, epochs=1, micro_batch=8, model_options={"batch_norm": True}
    )
    run = fit(config, run_dir=tmp_path / "run").run_dir
    assert json.loads((run / "config.json").read_text())["micro_batch"] == 8
    assert recipes.resolve("default", "net", {})["micro_batch"] == 0  # off unless asked
    with pytest.raises(ToolkitError, match="--micro-batch must be zero"):
        tiny_config(cifar_folder, tmp_path, micro_batch=-1)
