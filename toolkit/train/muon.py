"""Muon (momentum orthogonalised by Newton–Schulz) for convolution filters, SGD for the rest.

Muon (Keller Jordan, 2024; airbench94_muon, modded-nanogpt) replaces SGD's step for a weight
matrix W (a conv's filters as out × in·k·k) by the nearest semi-orthogonal matrix to its
momentum: every direction the gradient points in moves by the same amount, so the rare ones
are not drowned by the dominant few. airbench94_muon trains CIFAR-10's filters with it, the
rest (biases, the head) with Nesterov SGD, and reaches airbench94's accuracy in 0.82x its
samples.

One optimizer holds both kinds of group (a group marked `muon`), so the schedule, the
checkpoints, resume and DDP see one optimizer as for every other recipe. torch.optim.Muon
exists (torch >= 2.9), but takes 2-D parameters only and keeps no second kind of group.
"""

from __future__ import annotations

import math

import torch

# The quintic iteration's coefficients (Jordan): chosen for the steepest slope at 0, so 3-5
# steps take every singular value into about [0.7, 1.2]; not to exactly 1, which costs more
# steps and, measured by its author, no accuracy.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 3  # airbench94_muon's; modded-nanogpt uses 5


def orthogonalise(matrix: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """≈ U Vᵀ for the 2-D `matrix` = U S Vᵀ: its singular values taken near 1 by `steps`
    quintic Newton–Schulz iterations, X ← aX + (b XXᵀ + c (XXᵀ)²) X, in fp32."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.float()
    x = x / (x.norm() + 1e-7)  # every singular value ≤ 1: inside the iteration's basin
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the short side's Gram matrix: cheaper, the same result
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Groups marked `muon: True` (≥ 2-D weights: conv filters): per step

        buf ← m·buf + g;  d ← g + m·buf (Nesterov) or buf;
        W ← W · √rows / ‖W‖;  W ← W − lr · orthogonalise(d as rows × rest)

    (the rescale keeps every filter bank at a fixed norm, so no weight decay is needed and
    the step's relative size stays lr / √rows; airbench94_muon's rule). Every other group is
    torch.optim.SGD's rule with coupled `weight_decay`, the same momentum buffer, Nesterov
    or not. The momentum buffers live in the state (`momentum_buffer`), so checkpoints and
    resume carry them.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        ns_steps: int = NEWTON_SCHULZ_STEPS,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            muon=False,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon orthogonalises matrices: a `muon` group takes ≥ 2-D weights")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, muon = group["momentum"], group["muon"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"] and not muon:
                    grad = grad.add(p, alpha=group["weight_decay"])
                direction = grad
                if momentum:
                    state = self.state[p]
                    if "momentum_buffer" not in state:  # as torch's SGD: the first step's g
                        state["momentum_buffer"] = grad.clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(grad)
                    buf = state["momentum_buffer"]
                    direction = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                if muon:
                    rows = p.shape[0]
                    p.mul_(math.sqrt(rows) / p.norm())
                    direction = orthogonalise(direction.reshape(rows, -1), group["ns_steps"])
                    direction = direction.view_as(p)
                p.add_(direction, alpha=-group["lr"])
        return loss
