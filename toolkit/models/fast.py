"""Beyond the seeds: the fast residual `resnet9` (DAWNBench) and `speedrun` (airbench)."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.data.specs import parse_size
from toolkit.models.registry import after_pools, register
from toolkit.speedrun import SpeedrunNet

# --- beyond the seeds ------------------------------------------------------------------------


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    # No conv bias: the BatchNorm right after it has its own shift.
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class Residual(nn.Module):
    """x + body(x): two conv-BN-relu layers around an identity skip."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(channels, channels), *_conv_bn_relu(channels, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Scale(nn.Module):
    """Multiply by a constant (exports as one Mul)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


# The linear head's output is scaled down: with BN everywhere the pooled features are O(1), and
# un-scaled logits make early training overconfident (the DAWNBench ResNet-9 uses 0.125 too).
RESNET9_HEAD_SCALE = 0.125


@register(
    "resnet9",
    "fast ResNet-9 (DAWNBench/airbench style): conv-BN-relu stages w, 2w (+residual), 4w, "
    "8w (+residual), each widening one max-pooled, global max pool, scaled linear head",
    options=("dropout", "width"),
    input_rule="at least 8 px",
    width=64,
)
def build_resnet9(num_classes, input_size, in_channels, width=64, dropout=0.0):
    after_pools(input_size, 3, name="resnet9")  # three 2x pools before the global pool
    w1, w2, w3, w4 = width, 2 * width, 4 * width, 8 * width
    layers: list[nn.Module] = [
        *_conv_bn_relu(in_channels, w1),
        *_conv_bn_relu(w1, w2),
        nn.MaxPool2d(2),
        Residual(w2),
        *_conv_bn_relu(w2, w3),
        nn.MaxPool2d(2),
        *_conv_bn_relu(w3, w4),
        nn.MaxPool2d(2),
        Residual(w4),
        # Global max pool: any input size (32 px CIFAR, 96 px STL-10) gives one vector.
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
    ]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(w4, num_classes, bias=False), Scale(RESNET9_HEAD_SCALE)]
    return nn.Sequential(*layers)


@register(
    "speedrun",
    "airbench-style fast net: frozen 2x2 patch-whitening conv (set from training images), "
    "GELU, 3 conv groups w, 4w, 4w (dirac init, max pool, BN with frozen scale), global max "
    "pool, linear head x 1/9",
    options=("width",),
    input_rule="at least 9 px",
    width=64,
)
def build_speedrun(num_classes, input_size, in_channels, width=64):
    # The whitening conv (2x2, no padding) takes a pixel off, then three 2x pools.
    height, image_width = parse_size(input_size)
    after_pools((height - 1, image_width - 1), 3, name="speedrun")
    return SpeedrunNet(num_classes=num_classes, in_channels=in_channels, width=width)
