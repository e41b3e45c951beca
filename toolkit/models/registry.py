"""Model registry: a model is a name mapped to a builder(num_classes, input_size, **options).

The toolkit's own networks register themselves (toolkit.models.seed, toolkit.models.fast);
`timm/<arch>` names any architecture of timm, resolved on demand
(toolkit.models.timm_backbones). The registered modules take *normalised* N×C×H×W float
input; normalisation lives in `NormalizedClassifier`, which is what gets exported, so no client
has to re-type mean/std.

Option conventions, kept uniform across models so both readings of the assignment can be run:
- ``dropout``: Dropout2d(p) after every pooling stage of a CNN, Dropout(p) after every hidden
  activation of the MLP and before resnet9's linear head;
- ``batch_norm``: BatchNorm where the reference put it for that model (see each builder);
- ``width``: the first stage's channel count, later stages scale with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from toolkit.data.specs import parse_size

TIMM_PREFIX = "timm/"  # `timm/resnet18`, `timm/resnet18.a1_in1k`: any timm architecture


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    options: tuple[str, ...]
    defaults: dict = field(default_factory=dict)
    # What input the builder accepts, for `toolkit models` (the builder enforces it).
    input_rule: str = "any size"
    # Where the mean/std the model is normalised with come from: "data" (the training
    # images', measured when they are decoded) or "weights" (a pretrained model's own).
    normalization: str = "data"


MODELS: dict[str, ModelEntry] = {}


def register(
    name: str, description: str, options: tuple[str, ...], input_rule: str = "any size", **defaults
):
    """Decorator adding a builder to the registry under `name`."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = ModelEntry(name, builder, description, options, defaults, input_rule)
        return builder

    return wrap


def head_prefix(net: nn.Module) -> str:
    """The module of the last parameter: the classifier head of every registered model (and
    of timm's: their classifier is created last)."""
    last = list(net.named_parameters())[-1][0]
    return last.rsplit(".", 1)[0] + "."


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, size: tuple[int, int], in_channels: int = 3) -> int:
    """Multiply-accumulates of one image's forward pass at `size` (torch's FLOP counter,
    which counts a multiply-add as two)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model.eval()(torch.zeros(1, in_channels, *size))
    return counter.get_total_flops() // 2


def after_pools(
    input_size: int | tuple[int, int], pools: int, shrink_per_conv: int = 0, name: str = ""
) -> int:
    """Positions (height x width) left after `pools` (conv, maxpool2) stages; each conv
    shrinks a side by `shrink_per_conv`."""
    sides = []
    for side in parse_size(input_size):
        for _ in range(pools):
            side = (side - shrink_per_conv) // 2
            if side < 1:
                raise ValueError(f"input size {input_size} is too small for {name}")
        sides.append(side)
    return sides[0] * sides[1]


class NormalizedClassifier(nn.Module):
    """Image in [0, 1] -> logits: the normalisation is part of the model that gets exported."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net((image - self.mean) / self.std)
