"""Model registry: a model is a name mapped to a builder(num_classes, input_size, **options).

The seed architectures are taken from ../shared/SEED_EXPERIMENTS.md; `resnet9` is the fast
residual model that goes beyond them. The registered modules take *normalised* N×C×H×W float
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

from toolkit.errors import ToolkitError
from toolkit.speedrun import SpeedrunNet


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    options: tuple[str, ...]
    defaults: dict = field(default_factory=dict)


MODELS: dict[str, ModelEntry] = {}


def register(name: str, description: str, options: tuple[str, ...], **defaults):
    """Decorator adding a builder to the registry under `name`."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = ModelEntry(name, builder, description, options, defaults)
        return builder

    return wrap


def get_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ToolkitError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def resolve_options(name: str, **options) -> dict:
    """Fill in defaults and reject options the model does not support.

    Options left at None/False/0 mean "not asked for" and are dropped, so a CLI can pass every
    flag unconditionally.
    """
    entry = get_entry(name)
    asked = {k: v for k, v in options.items() if v not in (None, False, 0, 0.0)}
    unsupported = sorted(set(asked) - set(entry.options))
    if unsupported:
        flags = ", ".join("--" + k.replace("_", "-") for k in unsupported)
        supported = ", ".join("--" + k.replace("_", "-") for k in entry.options) or "none"
        raise ToolkitError(f"model '{name}' does not support {flags} (it supports: {supported})")
    if "dropout" in asked and not 0.0 < float(asked["dropout"]) < 1.0:
        raise ToolkitError(f"--dropout must be between 0 and 1, got {asked['dropout']}")
    if "width" in asked and int(asked["width"]) < 2:
        raise ToolkitError(f"--width must be at least 2, got {asked['width']}")
    return {**entry.defaults, **asked}


def create_model(
    name: str, num_classes: int = 10, input_size: int = 32, in_channels: int = 3, **options
) -> nn.Module:
    """Build a registered model; unknown names and unsupported options raise ToolkitError."""
    entry = get_entry(name)
    resolved = resolve_options(name, **options)
    try:
        return entry.builder(
            num_classes=num_classes, input_size=input_size, in_channels=in_channels, **resolved
        )
    except ValueError as exc:  # e.g. an input too small for the pooling stages
        raise ToolkitError(f"cannot build '{name}': {exc}") from exc


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _after_pools(input_size: int, pools: int, shrink_per_conv: int = 0, name: str = "") -> int:
    """Spatial size after `pools` (conv, maxpool2) stages; conv shrinks by `shrink_per_conv`."""
    size = input_size
    for _ in range(pools):
        size = (size - shrink_per_conv) // 2
        if size < 1:
            raise ValueError(f"input size {input_size} is too small for {name}")
    return size


class NormalizedClassifier(nn.Module):
    """Image in [0, 1] -> logits: the normalisation is part of the model that gets exported."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net((image - self.mean) / self.std)


# --- the seed architectures ------------------------------------------------------------------


@register(
    "mlp",
    "fully connected baseline: flatten -> 1024 -> 512 -> 128 -> classes, tanh",
    options=("dropout", "batch_norm"),
)
def build_mlp(num_classes, input_size, in_channels, dropout=0.0, batch_norm=False):
    layers: list[nn.Module] = [nn.Flatten()]
    sizes = [in_channels * input_size * input_size, 1024, 512, 128]
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
    # Reference order: conv, (BN), tanh, maxpool, (dropout2d).
    stage: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
    if batch_norm:
        stage.append(nn.BatchNorm2d(cout))
    stage += [nn.Tanh(), nn.MaxPool2d(2)]
    if dropout:
        stage.append(nn.Dropout2d(dropout))
    return stage


def _small_cnn(num_classes, input_size, in_channels, width, stages, dropout, batch_norm, name):
    half = width // 2
    channels = [in_channels, width] + [half] * (stages - 1)
    layers: list[nn.Module] = []
    for cin, cout in zip(channels, channels[1:], strict=False):
        layers += _tanh_conv_stage(cin, cout, dropout, batch_norm)
    side = _after_pools(input_size, stages, name=name)
    layers += [
        nn.Flatten(),
        nn.Linear(half * side * side, 32),
        nn.Tanh(),
        nn.Linear(32, num_classes),
    ]
    return nn.Sequential(*layers)


@register(
    "net",
    "small CNN: conv(w) tanh pool, conv(w/2) tanh pool, fc 32, fc classes",
    options=("dropout", "batch_norm", "width"),
    width=16,
)
def build_net(num_classes, input_size, in_channels, width=16, dropout=0.0, batch_norm=False):
    return _small_cnn(num_classes, input_size, in_channels, width, 2, dropout, batch_norm, "net")


@register(
    "net2",
    "`net` with a third conv(w/2) tanh pool stage",
    options=("dropout", "batch_norm", "width"),
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
    side = _after_pools(input_size, 2, name="resnet10")
    head: list[nn.Module] = [nn.Flatten(), nn.Linear(width * side * side, 32)]
    if batch_norm:
        head.append(nn.BatchNorm1d(32))
    head += [nn.ReLU(), nn.Linear(32, num_classes)]
    return nn.Sequential(*stem, *body, *head)


@register(
    "lenet5",
    "LeNet-5: conv5x5(6) relu pool, conv5x5(16) relu pool, fc 120, fc 84, fc "
    "classes (--batch-norm: BN after every relu, as the reference)",
    options=("dropout", "batch_norm"),
)
def build_lenet5(num_classes, input_size, in_channels, dropout=0.0, batch_norm=False):
    def act(n: int, dims: int) -> list[nn.Module]:
        out: list[nn.Module] = [nn.ReLU()]
        if batch_norm:
            out.append(nn.BatchNorm2d(n) if dims == 2 else nn.BatchNorm1d(n))
        return out

    def pool() -> list[nn.Module]:
        return [nn.MaxPool2d(2)] + ([nn.Dropout2d(dropout)] if dropout else [])

    side = _after_pools(input_size, 2, shrink_per_conv=4, name="lenet5")
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5),
        *act(6, 2),
        *pool(),
        nn.Conv2d(6, 16, 5),
        *act(16, 2),
        *pool(),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120),
        *act(120, 1),
        nn.Linear(120, 84),
        *act(84, 1),
        nn.Linear(84, num_classes),
    )


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
    width=64,
)
def build_resnet9(num_classes, input_size, in_channels, width=64, dropout=0.0):
    _after_pools(input_size, 3, name="resnet9")  # three 2x pools before the global pool
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
    width=64,
)
def build_speedrun(num_classes, input_size, in_channels, width=64):
    # The whitening conv (2x2, no padding) takes a pixel off, then three 2x pools.
    _after_pools(input_size - 1, 3, name="speedrun")
    return SpeedrunNet(num_classes=num_classes, in_channels=in_channels, width=width)
