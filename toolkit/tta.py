"""Test-time augmentation as part of the model: logits averaged over fixed views.

Level 1 averages the image and its mirror; level 2 (airbench's) also the two 1-pixel
diagonal translations (reflect padding), each with its mirror:

    0.5 * mirror(x) + 0.25 * mirror(x shifted up-left) + 0.25 * mirror(x shifted down-right)

where mirror(v) = (f(v) + f(flip(v))) / 2. Flips and reflect padding commute with the
per-channel normalisation, so the wrapper gives the same logits around the normalised net
(evaluation) or the [0, 1] classifier (the ONNX export, toolkit export --tta): the served
model is the evaluated one. All views go through the net as one batch.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.train.recipes import TTA_LEVELS


def tta_views(images: torch.Tensor, level: int) -> tuple[torch.Tensor, list[float]]:
    """The N×C×H×W batch's views stacked on the batch axis (view-major), and each view's
    weight in the average."""
    if level not in TTA_LEVELS:
        raise ValueError(f"TTA level must be one of {TTA_LEVELS}, got {level}")
    if level == 0:
        return images, [1.0]
    views, weights = [images], [1.0]
    if level == 2:
        views += [_shift(images, 1), _shift(images, -1)]
        weights = [0.5, 0.25, 0.25]
    views += [v.flip(3) for v in views]
    weights = [x / 2 for x in weights] * 2
    return torch.cat(views), weights


def _shift(x: torch.Tensor, by: int) -> torch.Tensor:
    """x moved 1 px down-right (by=1) or up-left (by=-1), the edge reflected: the crop of the
    1-px reflect-padded image at (0, 0) or (2, 2). Slices and concats, not a Pad: the ONNX
    converter cannot take opset 18's Pad down to 17."""
    for dim in (2, 3):
        n = x.shape[dim]
        if by > 0:
            x = torch.cat([x.narrow(dim, 1, 1), x.narrow(dim, 0, n - 1)], dim)
        else:
            x = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 2, 1)], dim)
    return x


class TTAClassifier(nn.Module):
    """`classifier` with its logits averaged over the views of `tta_views(level)`."""

    def __init__(self, classifier: nn.Module, level: int = 2):
        super().__init__()
        if level not in TTA_LEVELS:
            raise ValueError(f"TTA level must be one of {TTA_LEVELS}, got {level}")
        self.classifier = classifier
        self.level = level

    @property
    def views(self) -> int:
        return {0: 1, 1: 2, 2: 6}[self.level]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        batch, weights = tta_views(image, self.level)
        logits = self.classifier(batch)
        per_view = logits.reshape(len(weights), -1, logits.shape[-1])
        weight = torch.tensor(weights, dtype=logits.dtype, device=logits.device)
        return (per_view * weight[:, None, None]).sum(0)
