"""The optimizer, the learning-rate schedule and the lookahead a resolved TrainConfig names."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from toolkit.models.registry import head_prefix
from toolkit.train.config import TrainConfig
from toolkit.train.muon import Muon

# Decoupled SGD's lr and decay are per this many examples (airbench's convention).
DECOUPLED_EXAMPLES = 1024
LOOKAHEAD_EVERY = 5  # optimizer steps between two lookahead pulls
# The triangle schedule: lr factor 0.2 at the start, 1 at 23 % of training, 0.07 at the end.
TRIANGLE = (0.2, 0.23, 0.07)


def freeze_bn_scales(net: nn.Module) -> None:
    """--freeze-bn-scale: every BatchNorm keeps its scale (weight) at its init."""
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            module.weight.requires_grad_(False)


def _param_groups(config: TrainConfig, net: nn.Module, lr: float, decay: float) -> list[dict]:
    """One group, two when the BatchNorm biases take a scaled lr (--bias-lr-scale), the
    classifier head in a group of its own when the rest moves slower or waits
    (--backbone-lr-scale, --freeze-epochs): --lr is then the head's, and with --optimizer
    muon the conv filters in a Muon group (toolkit.train.muon).

    Decoupled decay is applied as torch's coupled `weight_decay` divided by the group's lr,
    so the decay per step (lr x weight_decay) is the same in both groups. Each group says
    the head's is marked (`head`): the schedule freezes the others (lr_factors).
    """
    head: list = []
    head_lr, params = lr, list(net.parameters())
    filters = [p for p in params if p.ndim > 2] if config.optimizer == "muon" else []
    if filters:
        params = [p for p in params if p.ndim <= 2]
    if config.backbone_lr_scale != 1.0 or config.freeze_epochs:
        prefix = head_prefix(net)
        head = [p for name, p in net.named_parameters() if name.startswith(prefix)]
        taken = {id(p) for p in head}
        params = [p for p in params if id(p) not in taken]
        filters = [p for p in filters if id(p) not in taken]  # a conv head stays the head's
        lr = lr * config.backbone_lr_scale
    groups = [{"params": params, "lr": lr, "weight_decay": decay}]
    if config.bias_lr_scale != 1.0:
        if filters:  # airbench94_muon: every vector (BatchNorm shifts, biases) at the bias lr
            scaled = {id(p) for p in params if p.ndim == 1}
        else:
            scaled = {
                id(p)
                for m in net.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters(recurse=False)
            }
        scale = config.bias_lr_scale
        groups = [
            {**groups[0], "params": [p for p in params if id(p) not in scaled]},
            {
                "params": [p for p in params if id(p) in scaled],
                "lr": lr * scale,
                "weight_decay": decay / scale if config.decoupled else decay,
            },
        ]
    if head:
        groups.append({"params": head, "lr": head_lr, "weight_decay": decay, "head": True})
    if filters:  # no decay: Muon keeps each filter bank at a fixed norm instead
        muon_lr = config.muon_lr * (config.backbone_lr_scale if head else 1.0)
        groups.append(
            {
                "params": filters,
                "lr": muon_lr,
                "momentum": config.muon_momentum,
                "weight_decay": 0.0,
                "muon": True,
            }
        )
    return groups


def make_optimizer(config: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    """The optimizer a resolved config names, over all of `net`'s parameters (frozen ones
    included: they get no gradient, so no step, and may be unfrozen later). `muon` is SGD
    (--lr, --momentum, --l2, --decoupled) for all but the conv filters, which Muon trains
    (--muon-lr, --muon-momentum)."""
    if config.optimizer in ("sgd", "muon"):
        lr, decay = config.lr, config.l2
        if config.decoupled:
            # With Nesterov momentum m a constant gradient moves the weights by about
            # lr x (1 + 1/(1 - m)) per step: dividing by that keeps --lr the step size
            # whatever m; x batch/1024 restates airbench's summed loss for the mean loss.
            gain = 1 + 1 / (1 - config.momentum) if config.momentum < 1 else 1.0
            lr = config.lr * config.batch_size / (DECOUPLED_EXAMPLES * gain)
            decay = config.l2 / config.lr  # per-step decay lr x this = l2 x batch / (1024 gain)
        kind = Muon if config.optimizer == "muon" else torch.optim.SGD
        return kind(
            _param_groups(config, net, lr, decay),
            lr=lr,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
        )
    groups = _param_groups(config, net, config.lr, config.l2)
    if config.optimizer == "adam":  # coupled L2, as the reference's Adam(weight_decay=...)
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factors(
    config: TrainConfig, steps_per_epoch: int, optimizer: torch.optim.Optimizer
) -> list[Callable[[int], float]]:
    """LambdaLR's factor for each of the optimizer's groups: the schedule, and 0 for all but
    the head during the first --freeze-epochs (a zero lr moves nothing, decay included;
    unlike requires_grad it leaves DDP's and the checkpoints' view of the model alone)."""
    schedule = lr_factor(config, steps_per_epoch)
    frozen_steps = config.freeze_epochs * steps_per_epoch

    def waiting(step: int) -> float:
        return 0.0 if step < frozen_steps else schedule(step)

    return [
        schedule if group.get("head") or not frozen_steps else waiting
        for group in optimizer.param_groups
    ]


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
        if config.schedule == "triangle":
            start, at, end = TRIANGLE
            peak = max(1, int(at * total))
            if step < peak:
                return start + (1 - start) * step / peak
            return 1 + (end - 1) * min(1.0, (step - peak) / max(1, total - peak))
        # cosine, with an optional linear warm-up
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Lookahead:
    """--lookahead D: every LOOKAHEAD_EVERY steps, ema <- lerp(ema, w, 1 - d) and w <- ema,
    with d = D^LOOKAHEAD_EVERY x progress^3 (no pull early on, a strong one late); at the
    last step w <- ema, so the final weights are the average.

    The EMA lives in the optimizer's per-parameter state ("lookahead"), so it is saved in
    every checkpoint and a resumed run continues it exactly. It starts at the first pull
    (the weights after LOOKAHEAD_EVERY steps, where the pull is ~0 anyway): created earlier
    it would make Adam take the state for initialised.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, decay: float, total_steps: int):
        self.optimizer, self.decay, self.total = optimizer, decay, total_steps

    def _params(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Call after optimizer step number `step` (1-based, counted over the whole run)."""
        if not self.decay:
            return
        if step >= self.total:
            self.pull(1.0)
        elif step % LOOKAHEAD_EVERY == 0:
            self.pull(self.decay**LOOKAHEAD_EVERY * (step / self.total) ** 3)

    @torch.no_grad()
    def pull(self, decay: float) -> None:
        for p in self._params():
            state = self.optimizer.state[p]
            if "lookahead" not in state:
                state["lookahead"] = p.detach().clone()
            ema = state["lookahead"]
            ema.lerp_(p.detach(), 1 - decay)
            p.copy_(ema)
