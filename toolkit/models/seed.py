"""The seed architectures, from ../shared/SEED_EXPERIMENTS.md: mlp, net, net2, resnet10, lenet5.

Option conventions (shared by every model of the registry): see toolkit.models.registry.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.data.specs import parse_size
from toolkit.models.registry import after_pools, register

# --- the seed architectures ------------------------------------------------------------------


@register(
    "mlp",
    "fully connected baseline: flatten -> 1024 -> 512 -> 128 -> classes, tanh",
    options=("dropout", "batch_norm"),
    input_rule="any size (the first layer is built for it)",
)
def build_mlp(num_classes, input_size, in_channels, dropout=0.0, batch_norm=False):
    layers: list[nn.Module] = [nn.Flatten()]
    height, width = parse_size(input_size)
    sizes = [in_channels * height * width, 1024, 512, 128]
    for fan_in, fan_out in zip(sizes, sizes[1:], strict=False):
        layers.append(nn.Linear(fan_in, fan_out))
        if batch_norm:
            layers.append(nn.BatchNorm1d(fan_out))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(sizes[-1], num_classes))
    return nn.Sequential(*layers)


def _tanh_conv_stage(cin, cout, dropout, batch_norm) -> list[nn.Module]:
    # The reference's conv, (BN), tanh, maxpool, (dropout2d), with the pool before the tanh:
    # tanh is increasing, so max-pooling commutes with it. The same function (and the same
    # state_dict keys), with a quarter of the tanh work, which dominates these nets' epochs.
    stage: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
    if batch_norm:
        stage.append(nn.BatchNorm2d(cout))
    stage += [nn.MaxPool2d(2), nn.Tanh()]
    if dropout:
        stage.append(nn.Dropout2d(dropout))
    return stage


def _small_cnn(num_classes, input_size, in_channels, width, stages, dropout, batch_norm, name):
    half = width // 2
    channels = [in_channels, width] + [half] * (stages - 1)
    layers: list[nn.Module] = []
    for cin, cout in zip(channels, channels[1:], strict=False):
        layers += _tanh_conv_stage(cin, cout, dropout, batch_norm)
    positions = after_pools(input_size, stages, name=name)
    layers += [
        nn.Flatten(),
        nn.Linear(half * positions, 32),
        nn.Tanh(),
        nn.Linear(32, num_classes),
    ]
    return nn.Sequential(*layers)


@register(
    "net",
    "small CNN: conv(w) tanh pool, conv(w/2) tanh pool, fc 32, fc classes",
    options=("dropout", "batch_norm", "width"),
    input_rule="at least 4 px",
    width=16,
)
def build_net(num_classes, input_size, in_channels, width=16, dropout=0.0, batch_norm=False):
    return _small_cnn(num_classes, input_size, in_channels, width, 2, dropout, batch_norm, "net")


@register(
    "net2",
    "`net` with a third conv(w/2) tanh pool stage",
    options=("dropout", "batch_norm", "width"),
    input_rule="at least 8 px",
    width=16,
)
def build_net2(num_classes, input_size, in_channels, width=16, dropout=0.0, batch_norm=False):
    return _small_cnn(num_classes, input_size, in_channels, width, 3, dropout, batch_norm, "net2")


class ResBlock(nn.Module):
    """conv3x3 (no bias) -> BatchNorm -> relu, plus an identity skip (the reference's block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        nn.init.constant_(self.bn.weight, 0.5)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))) + x


@register(
    "resnet10",
    "conv(w) relu pool, 10 x ResBlock(w), pool, fc 32 relu, fc classes "
    "(--batch-norm adds BN to the stem and fc; the blocks always have it)",
    options=("dropout", "batch_norm", "width"),
    input_rule="at least 4 px",
    width=32,
)
def build_resnet10(num_classes, input_size, in_channels, width=32, dropout=0.0, batch_norm=False):
    stem: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1)]
    if batch_norm:
        stem.append(nn.BatchNorm2d(width))
    stem += [nn.ReLU(), nn.MaxPool2d(2)]
    if dropout:
        stem.append(nn.Dropout2d(dropout))
    body: list[nn.Module] = [ResBlock(width) for _ in range(10)]
    body.append(nn.MaxPool2d(2))
    if dropout:
        body.append(nn.Dropout2d(dropout))
    positions = after_pools(input_size, 2, name="resnet10")
    head: list[nn.Module] = [nn.Flatten(), nn.Linear(width * positions, 32)]
    if batch_norm:
        head.append(nn.BatchNorm1d(32))
    head += [nn.ReLU(), nn.Linear(32, num_classes)]
    return nn.Sequential(*stem, *body, *head)


@register(
    "lenet5",
    "LeNet-5: conv5x5(6) relu pool, conv5x5(16) relu pool, fc 120, fc 84, fc "
    "classes (--batch-norm: BN after every relu, as the reference)",
    options=("dropout", "batch_norm"),
    input_rule="at least 16 px",
)
def build_lenet5(num_classes, input_size, in_channels, dropout=0.0, batch_norm=False):
    def act(n: int, dims: int) -> list[nn.Module]:
        out: list[nn.Module] = [nn.ReLU()]
        if batch_norm:
            out.append(nn.BatchNorm2d(n) if dims == 2 else nn.BatchNorm1d(n))
        return out

    def pool() -> list[nn.Module]:
        return [nn.MaxPool2d(2)] + ([nn.Dropout2d(dropout)] if dropout else [])

    positions = after_pools(input_size, 2, shrink_per_conv=4, name="lenet5")
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5),
        *act(6, 2),
        *pool(),
        nn.Conv2d(6, 16, 5),
        *act(16, 2),
        *pool(),
        nn.Flatten(),
        nn.Linear(16 * positions, 120),
        *act(120, 1),
        nn.Linear(120, 84),
        *act(84, 1),
        nn.Linear(84, num_classes),
    )
