"""--balance: what a class with few training images gets.

`weights` weighs each class's loss by the inverse of its share of train (a class with a
tenth of the images counts ten times as much per image); `sampler` draws each epoch's
batches with replacement so that every class is drawn equally often. Both leave a balanced
train split as it was.
"""

from __future__ import annotations

import torch


def balance_weights(balance: str, labels: torch.Tensor, num_classes: int, device) -> dict:
    """What --balance adds to each step (engine.StepOptions): the loss's `class_weights`, the
    order's `sample_weights`, or nothing."""
    if balance == "weights":
        return {"class_weights": class_weights(labels, num_classes).to(device)}
    if balance == "sampler":
        return {"sample_weights": sample_weights(labels, num_classes)}
    return {}


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """n / (classes x count) per class, so a balanced split weighs every class 1; a class
    with no training image gets 0 (it has no loss term anyway) and is not counted."""
    counts = labels.bincount(minlength=num_classes).float()
    weights = len(labels) / ((counts > 0).sum() * counts)
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def sample_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each image's chance of being drawn: 1 / its class's count (every class equally)."""
    counts = labels.bincount(minlength=num_classes).float()
    return (1.0 / counts)[labels]
