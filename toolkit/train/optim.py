"""The optimizer and the learning-rate schedule a resolved TrainConfig names."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from toolkit.train.config import TrainConfig


def make_optimizer(config: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    """The optimizer a resolved config names, over all of `net`'s parameters."""
    params = net.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.l2,
        )
    if config.optimizer == "adam":  # coupled L2, as the reference's Adam(weight_decay=...)
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.l2)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.l2)


def lr_factor(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step `step` (LambdaLR: resumes from a counter)."""
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if config.schedule == "none":
            return 1.0
        if config.schedule == "step":  # StepLR stepped per epoch, as the reference
            return config.gamma ** ((step // steps_per_epoch) // config.step_size)
        if config.schedule == "linear":  # linear warm-up, then linear decay to zero
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))
        if config.schedule == "onecycle":
            # Linear up to the peak at 25 % of training, linear down to zero.
            peak = max(1, int(0.25 * total))
            if step < peak:
                return 0.04 + 0.96 * step / peak
            return max(0.0, (total - step) / max(1, total - peak))
        # cosine, with an optional linear warm-up
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
