"""Muon (issue #25): the Newton–Schulz iteration orthogonalises, the step is its definition,
the SGD groups are torch's SGD, and the `muon` recipe trains speedrun and resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.training import fit_interrupted_in_second_epoch, tiny_config
from toolkit.errors import ToolkitError
from toolkit.models import create_model
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import read_metrics
from toolkit.train import TrainConfig, fit, recipes, resume
from toolkit.train.muon import Muon, orthogonalise
from toolkit.train.optim import make_optimizer


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    """U Vᵀ of matrix = U S Vᵀ: what the iteration approximates."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def _ill_conditioned(rows: int, cols: int, condition: float) -> torch.Tensor:
    """A random matrix whose singular values spread log-evenly from 1 down to 1/condition
    (a gradient's are dominated by a few directions)."""
    g = torch.Generator().manual_seed(rows * cols)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    return u @ torch.diag(torch.logspace(0, -math.log10(condition), k)) @ v.T


@pytest.mark.parametrize("shape", [(64, 576), (256, 2304), (576, 64), (16, 16)])
@pytest.mark.parametrize("condition, steps", [(10, 3), (100, 5)])
def test_newton_schulz_takes_every_singular_value_near_one(shape, condition, steps):
    matrix = _ill_conditioned(*shape, condition)
    result = orthogonalise(matrix, steps)
    singular = torch.linalg.svdvals(result)
    assert singular.min() > 0.5 and singular.max() < 1.25, (singular.min(), singular.max())
    polar = _polar(matrix)
    cosine = (result * polar).sum() / (result.norm() * polar.norm())
    assert cosine > 0.97
    # One step is not enough: the small directions are still far from 1.
    assert torch.linalg.svdvals(orthogonalise(matrix, 1)).min() < 0.5


def test_newton_schulz_is_scale_free_and_keeps_the_dtype():
    matrix = torch.randn(32, 72, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(orthogonalise(matrix), orthogonalise(1000 * matrix), atol=1e-5)
    assert orthogonalise(matrix.double()).dtype == torch.float64


def test_a_muon_step_is_its_definition():
    torch.manual_seed(0)
    filters = nn.Parameter(torch.randn(8, 3, 3, 3))
    lr, momentum = 0.24, 0.6
    optimizer = Muon([{"params": [filters], "muon": True}], lr=lr, momentum=momentum, nesterov=True)
    weights, buf = filters.detach().clone(), torch.zeros_like(filters)
    for _ in range(3):
        grad = torch.randn_like(filters)
        filters.grad = grad.clone()
        optimizer.step()
        # buf <- m buf + g; d <- g + m buf; W <- W sqrt(rows)/|W|; W <- W - lr NS(d)
        buf = momentum * buf + grad
        direction = (grad + momentum * buf).reshape(8, -1)
        weights = weights * math.sqrt(8) / weights.norm()
        weights = weights - lr * orthogonalise(direction).view_as(weights)
        assert torch.allclose(filters.detach(), weights, atol=1e-5)
    # The rescale before each step keeps the filter bank's norm near sqrt(rows).
    assert filters.norm().item() == pytest.approx(math.sqrt(8), rel=0.2)


def test_the_other_groups_are_torchs_sgd():
    torch.manual_seed(0)
    ours, theirs = (nn.Parameter(torch.randn(5)) for _ in range(2))
    theirs.data.copy_(ours.data)
    options = dict(lr=0.1, momentum=0.85, nesterov=True, weight_decay=0.01)
    muon, sgd = Muon([ours], **options), torch.optim.SGD([theirs], **options)
    for _ in range(4):
        grad = torch.randn(5)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        muon.step()
        sgd.step()
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="matrices"):
        Muon([{"params": [nn.Parameter(torch.zeros(3))], "muon": True}], lr=0.1)


def test_the_muon_recipe_groups_filters_head_and_vectors():
    net = create_model("speedrun", width=4)
    values = recipes.resolve("muon", "speedrun", {})
    optimizer = make_optimizer(TrainConfig(model="speedrun", data=None, **values), net)
    head, vectors, filters = optimizer.param_groups
    assert filters["muon"] and filters["lr"] == 0.24 and filters["momentum"] == 0.6
    assert filters["weight_decay"] == 0.0
    convs = [m.weight for m in net.modules() if type(m) is nn.Conv2d]  # not the whitening
    assert {id(p) for p in filters["params"]} == {id(p) for p in convs}
    assert {id(p) for p in head["params"]} == {id(net.head.weight)}
    assert all(p.ndim == 1 for p in vectors["params"]) and net.whiten.bias in vectors["params"]
    assert vectors["lr"] == pytest.approx(64 * head["lr"])
    # airbench94_muon's 0.67 per summed loss at batch 2000 and head scale 1/256, restated
    # for the mean loss and a 1/9 head: 0.67 x 2000 x (9/256)^2.
    assert head["lr"] == pytest.approx(0.67 * 2000 * (9 / 256) ** 2, rel=0.01)
    # Its decay per step, 2e-6 x batch, in both SGD groups.
    for group in (head, vectors):
        assert group["lr"] * group["weight_decay"] == pytest.approx(0.004, rel=0.01)
    every = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in net.parameters())


def test_the_speedrun_only_recipes_refuse_other_models():
    with pytest.raises(ToolkitError, match="for speedrun only"):
        recipes.resolve("muon", "net", {})
    assert recipes.resolve("default", "net", {"optimizer": "muon"})["optimizer"] == "muon"


def test_muon_trains_any_conv_net_and_its_run_resumes_exactly(tmp_path, cifar_folder):
    """--optimizer muon on `net` (filters by Muon, the rest SGD): the loss falls, and a stop
    after epoch 1 resumes to the same weights, momentum buffers included."""
    config = tiny_config(cifar_folder, tmp_path, optimizer="muon", muon_lr=0.05, epochs=2)
    straight = fit(config, run_dir=tmp_path / "straight").run_dir
    fit_interrupted_in_second_epoch(config, tmp_path / "resumed")
    resume(tmp_path / "resumed")
    a = Checkpoint.load(straight / "last.pt")
    b = Checkpoint.load(tmp_path / "resumed" / "last.pt")
    for key, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[key]), key
    rows = read_metrics(straight)
    assert len(rows) == 2 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert any("momentum_buffer" in s for s in a.optimizer["state"].values())


def test_the_muon_recipe_serves_selective_tta():
    values = recipes.resolve("muon", "speedrun", {})
    assert values["tta"] == 2 and 0.0 < values["tta_below"] < 1.0
    assert recipes.resolve("airbench94", "speedrun", {})["tta_below"] == 1.0
